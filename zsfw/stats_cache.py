"""An on-disk cache of calibration statistics and factorizations: another ratio, allocator or
storage format skips the calibration pass and the SVDs.

The statistics (C per input group, G per target, token count, loss) depend only on the model's
weights, the calibration windows, the targets and the statistics settings; the factorization
(each layer's whitened SVD, S per group, and the scores) also on whitening, damping and the
scorer. Neither depends on the ratio, allocator or storage format. Keys are SHA-256 digests of
all of those, so any change of a weight, a token or a setting misses. Statistics entries are
safetensors files; factorization entries are folders (the SVD factors and S of every layer,
and an index of spectra and scores). Both are written under a temporary name and renamed into
place when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zsfw.interfaces import LayerScores
from zsfw.statistics import CalibrationStatistics

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def _update(hasher, tensor: torch.Tensor) -> None:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    hasher.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    hasher.update(data.view(torch.uint8).numpy())


def statistics_key(model: nn.Module, targets: list[str], windows: torch.Tensor, settings: dict) -> str:
    """SHA-256 of everything the statistics depend on."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps({"version": CACHE_VERSION, "targets": sorted(targets),
                              "settings": settings}, sort_keys=True, default=str).encode())
    _update(hasher, windows)
    for name, tensor in model.state_dict().items():
        hasher.update(name.encode())
        _update(hasher, tensor)
    return hasher.hexdigest()


@contextmanager
def _entry(path: Path, key: str) -> Iterator[Any]:
    """The open safetensors file of a cache entry, or None when absent or written for another key."""
    if not path.exists():
        yield None
        return
    with safe_open(path, framework="pt") as f:
        yield f if f.metadata().get("key") == key else None


def factorization_key(statistics_key: str, settings: dict) -> str:
    """SHA-256 of the statistics key and the settings the factorization adds."""
    text = json.dumps({"version": CACHE_VERSION, "statistics": statistics_key, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Factorization:
    """What the factorize phase hands on, besides the spilled factors: per layer its spectrum
    and scores, which group's S whitens it, how S was obtained; calibration tokens and loss."""

    layers: dict[str, LayerScores] = field(default_factory=dict)
    whitener_of: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    loss: float = float("nan")


class StatisticsCache:
    """Statistics files in ``directory``, one per key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"statistics-{key[:32]}.safetensors"

    def load(self, key: str) -> CalibrationStatistics | None:
        with _entry(self.path(key), key) as f:
            if f is None:
                return None
            meta = f.metadata()
            stats = CalibrationStatistics(groups=json.loads(meta["groups"]), tokens=int(meta["tokens"]),
                                          loss=float(meta["loss"]))
            for k in f.keys():
                kind, name = k.split(":", 1)
                (stats.covariances if kind == "C" else stats.gradients)[name] = f.get_tensor(k)
        log.info("calibration statistics from the cache: %s", self.path(key))
        return stats

    def save(self, key: str, stats: CalibrationStatistics) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"C:{g}": c.contiguous() for g, c in stats.covariances.items()}
        tensors.update({f"G:{n}": g.contiguous() for n, g in stats.gradients.items()})
        meta = {"key": key, "groups": json.dumps(stats.groups), "tokens": str(stats.tokens),
                "loss": repr(stats.loss)}
        fd, tmp = tempfile.mkstemp(prefix=".statistics-", suffix=".tmp", dir=self.directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.path(key)

    def factors_path(self, key: str) -> Path:
        return self.directory / f"factors-{key[:32]}"

    def new_factors_dir(self) -> Path:
        """A fresh folder for a factorization being computed (renamed by ``save_factors``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".factors-", dir=self.directory))

    def save_factors(self, key: str, directory: Path, factors: Factorization) -> Path:
        """Write the index into ``directory`` and rename it into place; returns its new path."""
        tensors = {}
        for name, layer in factors.layers.items():
            tensors[f"sigma:{name}"] = layer.sigma.contiguous()
            tensors[f"scores:{name}"] = layer.scores.contiguous()
        shapes = {name: [l.out_features, l.in_features, l.has_bias] for name, l in factors.layers.items()}
        save_file(tensors, directory / "index.safetensors", metadata={
            "key": key, "shapes": json.dumps(shapes), "whitener_of": json.dumps(factors.whitener_of),
            "notes": json.dumps(factors.notes), "tokens": str(factors.tokens), "loss": repr(factors.loss)})
        final = self.factors_path(key)
        if final.exists():  # another run finished the same entry first
            shutil.rmtree(directory)
            return final
        os.replace(directory, final)
        return final

    def load_factors(self, key: str) -> tuple[Path, Factorization] | None:
        """The folder and index of a cached factorization, or None."""
        index = self.factors_path(key) / "index.safetensors"
        with _entry(index, key) as f:
            if f is None:
                return None
            meta = f.metadata()
            factors = Factorization(whitener_of=json.loads(meta["whitener_of"]),
                                    notes=json.loads(meta["notes"]), tokens=int(meta["tokens"]),
                                    loss=float(meta["loss"]))
            for name, (out_f, in_f, bias) in json.loads(meta["shapes"]).items():
                factors.layers[name] = LayerScores(name, out_f, in_f, bias, f.get_tensor(f"sigma:{name}"),
                                                   f.get_tensor(f"scores:{name}"))
        log.info("whitened SVDs and scores from the cache: %s", index.parent)
        return index.parent, factors
