"""The factor store: each layer's low-rank factors B = U Σ^½ and A = Σ^½ Vᵀ S⁻¹ of its whitened
SVD (every component, or those a top-k plan can keep) and, when a corrector needs them, each input
group's whitening factor S, kept on disk between factorization and truncation, with the spectra
and scores allocators need in memory.

A format with a quantized base (``has_base``) factorizes the residual W − Q(W) instead: its
*variant* (the format's ``base_key``) holds each layer's residual factors, spectrum and scores
and the quantized base itself; the plain factorization is variant "".

One object owns its folder, its keys and its cleanup. A temporary store lives in a fresh folder
and is removed by ``close``. A store created by the factorization cache is written in a hidden
folder of the cache and becomes an entry only when ``commit`` renames it into place; ``close``
of an uncommitted one removes it, so a failed or interrupted run never leaves a half entry. An
entry's files are hashed as they are written and listed in its ``SHA256SUMS`` (the cache checks
them when it opens the entry, see ``zsfw.compression.cache``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import ContextManager

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from zsfw._fs import publish, spill_root, work_folder
from zsfw.checkpoint.destination import probe, writing
from zsfw.checksums import sha256_of, write_sums
from zsfw.budget import useful_rank
from zsfw.compression.transfer import to_device, to_host
from zsfw.protocols import LayerScores, StorageFormat

log = logging.getLogger(__name__)

INDEX = "index.safetensors"
SPILL_SETTING = "point ZSFW_SPILL to it"
CACHE_SETTING = "give it as --statistics-cache (statistics_cache=)"


def check_spill() -> Path:
    """The spill folder, created and probed before any work: one that cannot be written (under a
    file, read-only, forbidden) is a one-line ``DestinationError`` now, not after the first pass."""
    root = spill_root()
    probe(root, SPILL_SETTING)
    return root


def spilling(what: str) -> ContextManager[None]:
    """Writes of ``what`` in the spill folder: a full or unwritable one is a one-line
    ``DestinationError`` naming it."""
    return writing(what, spill_root(), SPILL_SETTING)


class FactorStore:
    """U and Vᵀ per layer and S per whitening group on disk; σ, scores and notes in memory."""

    def __init__(self, directory: Path, final: Path | None = None, key: str = "",
                 spill: StorageFormat | None = None, whiteners: bool = True) -> None:
        self.directory = directory
        self.final = final  # where ``commit`` moves it (a cache entry), None: temporary
        self.key = key
        self.spill = spill  # keep each layer's components up to this format's useful rank; None: all
        self.whiteners = whiteners  # keep each group's S (a corrector re-truncates with it)
        self.layers: dict[str, LayerScores] = {}  # the plain factorization's (variant "")
        self.variants: dict[str, dict[str, LayerScores]] = {}  # base key -> the residuals'
        self.whitener_of: dict[str, str] = {}  # layer -> its whitening group
        self.notes: dict[str, str] = {}  # layer -> how S was obtained, when unusual
        self.tokens = 0
        self.loss = float("nan")
        self.committed = False
        self.digests: dict[str, str] = {}  # file -> its SHA-256, for a cache entry

    @classmethod
    def temporary(cls, spill: StorageFormat | None = None, whiteners: bool = True) -> "FactorStore":
        """A store in the spill folder (``spill_root``), removed by ``close``; ``spill`` and
        ``whiteners`` say what it keeps (see ``kept_rank``)."""
        with spilling("temporary factors"):
            return cls(work_folder(spill_root(), "factors-"), spill=spill, whiteners=whiteners)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    @staticmethod
    def _prefix(variant: str) -> str:
        return "factors" if not variant else f"residual.{variant}"

    def _save(self, tensors: dict[str, torch.Tensor], path: Path,
              metadata: dict[str, str] | None = None) -> None:
        """Write a file of the store; a cache entry's is hashed at once, while still in the page cache."""
        with self._writing():
            save_file(tensors, path, metadata=metadata)
        if self.final is not None:
            self.digests[path.name] = sha256_of(path)

    def _writing(self) -> ContextManager[None]:
        """Where a full or unwritable spill (or cache) folder becomes a one-line error naming it."""
        return writing("factors", self.directory.parent, SPILL_SETTING if self.final is None else CACHE_SETTING)

    def kept_rank(self, layer: LayerScores) -> int:
        """How many of the layer's top components are kept: every one, or with ``spill`` as many
        as that storage format keeps below its dense cost (no top-k plan keeps more; about the
        fp32 weights' size on disk instead of twice that)."""
        if self.spill is None:
            return layer.full_rank
        return useful_rank(self.spill, layer.out_features, layer.in_features, layer.has_bias)

    def put_whitener(self, group: str, S: torch.Tensor) -> None:
        if self.whiteners:
            self._save(to_host({"S": S}), self._path(f"S.{group}"))

    def put_layer(self, scores: LayerScores, B: torch.Tensor, A: torch.Tensor,
                  group: str | None, note: str = "", variant: str = "") -> None:
        """A layer's factors B = U Σ^½ and A = Σ^½ Vᵀ S⁻¹ of its kept components (to disk,
        fp32) and its spectrum and scores (kept in memory); of its residual on the base
        ``variant`` when one is named."""
        self._save(to_host({"B": B.float(), "A": A.float()}), self._path(f"{self._prefix(variant)}.{scores.name}"))
        (self.variants.setdefault(variant, {}) if variant else self.layers)[scores.name] = scores
        if group is not None:
            self.whitener_of[scores.name] = group
            self.notes[scores.name] = note

    def put_base(self, variant: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """The tensors of layer ``name``'s quantized base in the base ``variant``."""
        self._save(to_host({key: t.contiguous() for key, t in tensors.items()}), self._path(f"base.{variant}.{name}"))

    def base(self, variant: str, name: str, device: torch.device) -> dict[str, torch.Tensor]:
        """What ``put_base`` stored, on ``device`` (where the layer's module is built, like ``factors``)."""
        return {key: to_device(t, device) for key, t in load_file(self._path(f"base.{variant}.{name}")).items()}

    def spectrum(self, name: str, variant: str = "") -> LayerScores:
        """Layer ``name``'s spectrum and scores: of its weight, or of its residual on base ``variant``."""
        return self.variants[variant][name] if variant else self.layers[name]

    def factors(self, name: str, device: torch.device, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """B (out×r) and A (r×in), fp32, of the layer's top r kept components (of its residual on
        base ``variant`` when one is named)."""
        found = load_file(self._path(f"{self._prefix(variant)}.{name}"))
        return to_device(found["B"], device), to_device(found["A"], device)

    def whitener(self, name: str, device: torch.device) -> torch.Tensor | None:
        """The S that whitens layer ``name`` (None when it was not whitened)."""
        group = self.whitener_of.get(name)
        if group is not None and not self.whiteners:
            raise RuntimeError("this factor store keeps no whitening factors")  # a pipeline bug
        return None if group is None else to_device(load_file(self._path(f"S.{group}"))["S"], device)

    def commit(self) -> None:
        """Write the index and, for a cache entry, its ``SHA256SUMS`` and rename the folder into place."""
        tensors, shapes = {}, {}
        for variant, layers in (("", self.layers), *self.variants.items()):
            tag = f"{variant}:" if variant else ""
            for name, layer in layers.items():
                tensors[f"sigma:{tag}{name}"] = layer.sigma.contiguous()
                tensors[f"scores:{tag}{name}"] = layer.scores.contiguous()
                shapes[f"{tag}{name}"] = [layer.out_features, layer.in_features, layer.has_bias]
        self._save(tensors, self.directory / INDEX, metadata={
            "key": self.key, "shapes": json.dumps(shapes, sort_keys=True),
            "whitener_of": json.dumps(self.whitener_of, sort_keys=True),
            "notes": json.dumps(self.notes, sort_keys=True), "tokens": str(self.tokens),
            "loss": repr(self.loss)})
        if self.final is not None:
            write_sums(self.directory, self.digests)
            publish(self.directory, self.final)  # unless another run finished the same entry first
            self.directory = self.final
        self.committed = True

    @classmethod
    def open(cls, directory: Path, key: str) -> "FactorStore | None":
        """A committed store, or None when absent or written for another key."""
        index = directory / INDEX
        if not index.is_file():
            return None
        with safe_open(index, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            store = cls(directory, final=directory, key=key)
            store.whitener_of = json.loads(meta["whitener_of"])
            store.notes = json.loads(meta["notes"])
            store.tokens, store.loss = int(meta["tokens"]), float(meta["loss"])
            for tagged, (out_f, in_f, bias) in json.loads(meta["shapes"]).items():
                variant, _, name = tagged.rpartition(":")
                layer = LayerScores(name, out_f, in_f, bias, f.get_tensor(f"sigma:{tagged}"),
                                    f.get_tensor(f"scores:{tagged}"))
                (store.variants.setdefault(variant, {}) if variant else store.layers)[name] = layer
        store.committed = True
        log.info("whitened SVDs and scores from the cache: %s", directory)
        return store

    def close(self) -> None:
        """Remove the folder unless it is a committed cache entry."""
        if self.final is None or not self.committed:  # temporary, or an entry left unfinished
            shutil.rmtree(self.directory, ignore_errors=True)
