"""An on-disk cache of pre-compression stages' results, calibration statistics and factorizations:
another ratio, allocator or storage format skips the stages, the calibration pass and the SVDs.

The statistics (C per input group, G per target, token count, loss) depend only on the model's
weights (after any pre-compression stage), the calibration windows, the targets and the
statistics settings; the factorization (each layer's whitened SVD, S per group, the scores) also
on whitening, damping and the scorer. Neither depends on the ratio, allocator or storage format.
Keys are SHA-256 digests of all of those, so any change of a weight, a token or a setting misses.

A stage's result (the model's weights after it, and its summary) depends on the weights before
it, the stage's name and options, and the windows it is given (calibration, training, validation).

Statistics entries are folders of one safetensors file per input group plus an index, written
group by group as the pass yields them; factorization entries are ``FactorStore`` folders. Both
are written under a hidden temporary name and renamed into place when complete. Every entry lists
its files' SHA-256 digests (``zsfw.checksums``), and is checked against them when it is opened,
before anything of it is used (a factor store is read lazily, long after the cache said "hit").
An entry that cannot be read or does not match is a miss, with a warning naming the entry and the
file, and is removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import nn

from zsfw.checksums import check_sums, sha256_of, write_sums
from zsfw.compression.driver import StatisticsPass
from zsfw.compression.statistics import GroupStatistics
from zsfw._fs import publish, work_folder
from zsfw.checkpoint.destination import writing
from zsfw.compression.factor_store import CACHE_SETTING, FactorStore
from zsfw.residency import residency

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 4: entries list their files' SHA-256 digests
_UNREADABLE = (OSError, SafetensorError, KeyError, ValueError, json.JSONDecodeError)


def _update(hasher, tensor: torch.Tensor) -> None:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    hasher.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
    hasher.update(data.view(torch.uint8).numpy())


def _digest(header: dict, tensors: list[torch.Tensor | None], model: nn.Module) -> str:
    """SHA-256 of ``header`` (JSON), the tensors (None marks an absent one) and every weight of ``model``."""
    hasher = hashlib.sha256()
    hasher.update(json.dumps({"version": CACHE_VERSION, **header}, sort_keys=True, default=str).encode())
    for tensor in tensors:
        if tensor is None:
            hasher.update(b"none")
        else:
            _update(hasher, tensor)
    weights = residency(model)
    if weights.lazy:
        weights.fingerprint(hasher)
    else:
        for name, tensor in model.state_dict().items():
            hasher.update(name.encode())
            _update(hasher, tensor)
    return hasher.hexdigest()


def statistics_key(model: nn.Module, targets: list[str], windows: torch.Tensor, settings: dict) -> str:
    """SHA-256 of everything the statistics depend on."""
    return _digest({"targets": sorted(targets), "settings": settings}, [windows], model)


def stage_key(model: nn.Module, stage: dict, targets: list[str], windows: list[torch.Tensor | None]) -> str:
    """SHA-256 of everything a stage's result depends on: the weights before it, its name and
    options (``stage``), the targets and the windows it is given."""
    return _digest({"stage": stage, "targets": sorted(targets)}, windows, model)


def factorization_key(statistics_key: str, settings: dict) -> str:
    """SHA-256 of the statistics key and the settings the factorization adds."""
    text = json.dumps({"version": CACHE_VERSION, "statistics": statistics_key, "settings": settings},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _CachedPass:
    """A statistics entry read back group by group."""

    def __init__(self, directory: Path, index: dict) -> None:
        self.directory, self.index = directory, index
        self.tokens, self.loss = int(index["tokens"]), float(index["loss"])

    def __iter__(self) -> Iterator[GroupStatistics]:
        for entry in self.index["groups"]:
            with safe_open(self.directory / entry["file"], framework="pt") as f:
                keys = set(f.keys())
                yield GroupStatistics(
                    entry["group"], entry["members"], f.get_tensor("C") if "C" in keys else None,
                    {n: f.get_tensor(f"G:{n}") for n in entry["members"] if f"G:{n}" in keys})


def _writing(what: str, folder: Path):
    """Where a full or unwritable cache folder becomes a one-line error naming it."""
    return writing(what, folder, CACHE_SETTING)


class _RecordingPass:
    """Passes a statistics pass through, writing each group into a new cache entry."""

    def __init__(self, source: StatisticsPass, directory: Path, final: Path, key: str) -> None:
        self.source, self.directory, self.final, self.key = source, directory, final, key
        self.tokens, self.loss = 0, float("nan")

    def __iter__(self) -> Iterator[GroupStatistics]:
        tmp = work_folder(self.directory, ".statistics-")
        try:
            groups, digests = [], {}
            for i, stats in enumerate(self.source):
                tensors = {f"G:{n}": g.contiguous() for n, g in stats.gradients.items()}
                if stats.covariance is not None:
                    tensors["C"] = stats.covariance.contiguous()
                name = f"group-{i:05d}.safetensors"
                groups.append({"file": name, "group": stats.group, "members": stats.members})
                with _writing("statistics", self.directory):
                    save_file(tensors, tmp / name)
                    digests[name] = sha256_of(tmp / name)  # at once, while in the page cache
                yield stats
            self.tokens, self.loss = self.source.tokens, self.source.loss
            with _writing("statistics", self.directory):
                (tmp / "index.json").write_text(json.dumps(
                    {"key": self.key, "tokens": self.tokens, "loss": repr(self.loss), "groups": groups}))
                write_sums(tmp, digests | {"index.json": sha256_of(tmp / "index.json")})
                publish(tmp, self.final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place


def _read_entry(path: Path, what: str, instead: str, read: Callable[[Path], Any]) -> Any:
    """``read(path)`` of the entry at ``path`` once its files match their digests; None when there is
    none, or when it cannot be read or does not match (then a warning, and the entry is removed to
    be made again)."""
    if not path.is_dir():
        return None
    try:
        check_sums(path)
        return read(path)
    except _UNREADABLE as exc:
        log.warning("%s cache entry %s is unreadable (%s: %s); %s", what, path, type(exc).__name__, exc, instead)
        shutil.rmtree(path, ignore_errors=True)  # zsfw's own cache entry, not the user's data
        return None


def _indexed(key: str, read: Callable[[Path, dict], Any]) -> Callable[[Path], Any]:
    """A reader of an entry with an ``index.json``: ``read(path, index)`` when the index names
    ``key``, else None."""
    def reader(path: Path) -> Any:
        index = json.loads((path / "index.json").read_text())
        return read(path, index) if index.get("key") == key else None
    return reader


class CompressionCache:
    """Stage results, statistics and factorization entries in ``directory``, one per key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def statistics_path(self, key: str) -> Path:
        return self.directory / f"statistics-{key[:32]}"

    def factors_path(self, key: str) -> Path:
        return self.directory / f"factors-{key[:32]}"

    def stage_path(self, key: str) -> Path:
        return self.directory / f"stage-{key[:32]}"

    def stage(self, key: str, model: nn.Module) -> dict | None:
        """Load the cached result of a stage into ``model`` and return the stage's summary, or None
        (a miss, the model untouched; unreadable entries warn)."""
        def load(path: Path, index: dict) -> dict:
            with safe_open(path / "model.safetensors", framework="pt") as f:  # readable before loading
                stored = set(f.keys())
            missing = sorted(stored - model.state_dict().keys())  # the model's names, built once
            if missing:
                raise KeyError(f"{missing[0]} is not a weight of this model")
            load_model(model, path / "model.safetensors", strict=False,
                       device=str(next(model.parameters()).device))
            log.info("stage result from the cache: %s", path)
            return index["summary"]

        return _read_entry(self.stage_path(key), "stage", "running the stage again", _indexed(key, load))

    def record_stage(self, key: str, model: nn.Module, summary: dict) -> None:
        """Store the model's weights after a stage and its summary under ``key``."""
        tmp = work_folder(self.directory, ".stage-")
        try:
            with _writing("a stage's result", self.directory):
                save_model(model, str(tmp / "model.safetensors"))
                (tmp / "index.json").write_text(json.dumps({"key": key, "summary": summary}, default=str))
                write_sums(tmp, {name: sha256_of(tmp / name) for name in ("model.safetensors", "index.json")})
                publish(tmp, self.stage_path(key))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def statistics(self, key: str) -> StatisticsPass | None:
        """The cached statistics for ``key``, or None (a miss; unreadable entries warn)."""
        def read(path: Path, index: dict) -> StatisticsPass:
            log.info("calibration statistics from the cache: %s", path)
            return _CachedPass(path, index)

        return _read_entry(self.statistics_path(key), "statistics", "recomputing it",
                           _indexed(key, read))

    def record(self, key: str, source: StatisticsPass) -> StatisticsPass:
        """``source`` passed through, stored under ``key`` once it has been read to the end."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return _RecordingPass(source, self.directory, self.statistics_path(key), key)

    def factors(self, key: str) -> FactorStore | None:
        """The cached factorization for ``key``, or None (a miss; unreadable entries warn)."""
        return _read_entry(self.factors_path(key), "factorization", "recomputing it",
                           lambda path: FactorStore.open(path, key))

    def new_factors(self, key: str) -> FactorStore:
        """An empty store that becomes the entry for ``key`` when committed."""
        return FactorStore(work_folder(self.directory, ".factors-"), final=self.factors_path(key), key=key)


def open_cache(directory: Any) -> CompressionCache | None:
    return None if directory is None else CompressionCache(directory)
