"""An on-disk cache of calibration statistics, so another ratio or allocator skips the pass.

The statistics (C per input group, G per target, token count, loss) depend only on the model's
weights, the calibration windows, the targets and the statistics settings, not on the ratio,
scorer options, allocator or storage format. The key is a SHA-256 of all of those, so any change
of a weight, a token or a setting misses the cache. Entries are safetensors files written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

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


class StatisticsCache:
    """Statistics files in ``directory``, one per key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"statistics-{key[:32]}.safetensors"

    def load(self, key: str) -> CalibrationStatistics | None:
        path = self.path(key)
        if not path.exists():
            return None
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            if meta.get("key") != key:
                return None
            stats = CalibrationStatistics(groups=json.loads(meta["groups"]), tokens=int(meta["tokens"]),
                                          loss=float(meta["loss"]))
            for k in f.keys():
                kind, name = k.split(":", 1)
                (stats.covariances if kind == "C" else stats.gradients)[name] = f.get_tensor(k)
        log.info("calibration statistics from the cache: %s", path)
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
