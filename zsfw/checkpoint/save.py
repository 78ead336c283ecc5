"""Writing a compressed model as a ``save_pretrained`` folder, atomically.

The folder holds ``config.json`` (with the model's ``ZsfwConfig`` as ``quantization_config``),
safetensors weights (sharded above ``max_shard_bytes``), the tokenizer, the effective
``recipe.yaml`` and the ``report.json``; config.json records each weight file's SHA-256, hashed
right after the file is written (``zsfw.checksums``). A compressed module's tensors are its state
dict as its storage format keeps it; torchao tensor subclasses are stored through torchao's
flatten/unflatten helpers (their layout goes into the safetensors header as JSON). Nothing is
pickled.

Writes go to a hidden temporary folder next to the destination, renamed into place only when
complete: an interrupted or failed save (a full or read-only disk: a one-line
``DestinationError``) leaves no output and does not touch an existing one (see
``zsfw.checkpoint.destination`` for what may be replaced). The same model, tokenizer, recipe and
report always give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, ContextManager, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from zsfw._fs import honour_umask, new_folder
from zsfw.checkpoint.destination import (OUTPUT_SETTING, check_destination, replace,
                                         writing)
from zsfw.checkpoint.files import INDEX_FILE, SINGLE_FILE
from zsfw.budget import REFERENCE_BYTES_PER_WEIGHT
from zsfw.checkpoint.schema import mark_config_file, owner_of, zsfw_config
from zsfw.checksums import sha256_of
from zsfw.errors import CheckpointError
from zsfw.residency import layer_prefixes

DEFAULT_MAX_SHARD_BYTES = 1024**3
LAZY_MAX_SHARD_BYTES = 256 * 1024**2
"""Shards of a lazily loaded model, written as its layers are compressed: a shard waits in memory
until full, and that memory must stay small next to one decoder layer's."""


def module_tensors(name: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A compressed module's state dict as plain tensors (torchao subclasses flattened) and the
    header metadata that restores them; keys are prefixed with ``name``."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(module.state_dict(prefix=f"{name}."))
    return {k: v.detach().contiguous() for k, v in tensors.items()}, metadata


Unit = tuple[str | None, dict[str, torch.Tensor], dict[str, str]]
"""What is written together (a unit never spans two shards): a compressed module's tensors and
header metadata, with its name, or one other tensor (name None)."""


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key.startswith(prefix + ".") for prefix in prefixes)


def _units(model: nn.Module, compressed: set[str], state: dict[str, torch.Tensor]) -> Iterator[Unit]:
    """The compressed modules (by name) among ``compressed``, then the tensors of ``state`` outside
    them, each shared storage once (tied embeddings are saved under their first name and re-tied
    by ``transformers`` on load)."""
    for name in sorted(compressed):
        yield (name, *module_tensors(name, model.get_submodule(name)))
    seen = set()
    for key, tensor in state.items():
        if owner_of(key, compressed) is not None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if ident not in seen:
            seen.add(ident)
            yield None, {key: tensor.detach().contiguous()}, {}


class CheckpointWriter:
    """A compressed model's folder, made in a hidden temporary folder beside the destination and
    renamed into place by ``finish`` (``abort`` removes it).

    Weights go in decoder layer by decoder layer (``add_layer``), so a model held one layer at a
    time is written as its layers are made; a shard is written as soon as the next unit would
    overflow it. ``finish`` adds everything outside the layers, names the shards and writes the
    config, tokenizer, recipe and report.

    ``checked``: ``output_dir`` is the path ``check_destination`` gave when the run began
    (``compress``); what appeared there since is judged by ``finish``, which then keeps the work
    beside it instead of losing it.
    """

    def __init__(self, output_dir: str | Path, overwrite: bool = False, max_shard_bytes: int | None = None,
                 checked: bool = False) -> None:
        self.out = Path(output_dir) if checked else check_destination(output_dir, overwrite)
        self.overwrite = overwrite
        with self._writing():
            self.tmp = new_folder(self.out.parent, f".{self.out.name}.zsfw-tmp-")
        self.max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        self.pending: list[Unit] = []
        self.pending_bytes = 0
        self.parts: list[tuple[str, list[str], int, str]] = []  # temporary file, tensors, data bytes, SHA-256
        self.written: dict[str, int] = {}  # compressed module -> bytes of its tensors

    def add_layer(self, model: nn.Module, prefix: str) -> None:
        """Decoder layer ``prefix``'s tensors: its compressed modules, then the rest of it."""
        compressed = {n for n in _compressed(model) if n.startswith(prefix + ".")}
        self._add(_units(model, compressed, model.get_submodule(prefix).state_dict(prefix=prefix + ".")))

    def _add(self, units: Iterator[Unit]) -> None:
        for unit in units:
            nbytes = sum(t.nbytes for t in unit[1].values())
            if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
                self._flush()
            self.pending.append(unit)
            self.pending_bytes += nbytes
            if unit[0] is not None:
                self.written[unit[0]] = nbytes

    def _writing(self) -> ContextManager[None]:
        """Where a full or read-only disk becomes a one-line error naming the destination."""
        return writing("the compressed model", self.out, OUTPUT_SETTING,
                       "nothing was saved and an existing folder there is untouched")

    def _flush(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {"format": "pt"}
        names: list[str] = []
        for _, unit_tensors, unit_metadata in self.pending:
            tensors.update(unit_tensors)
            names += json.loads(unit_metadata.get("tensor_names", "[]"))
            metadata.update({k: v for k, v in unit_metadata.items() if k != "tensor_names"})
        if names:
            metadata["tensor_names"] = json.dumps(names)
        part = f"part-{len(self.parts) + 1:05d}.safetensors"
        with self._writing():
            write_safetensors(tensors, self.tmp / part, metadata)
            # hashed at once, while in the page cache (a lazily loaded model's layers are gone by ``finish``)
            digest = sha256_of(self.tmp / part)
        self.parts.append((part, list(tensors), self.pending_bytes, digest))
        self.pending, self.pending_bytes = [], 0

    def finish(self, model: nn.Module, tokenizer: Any = None, recipe: Any = None, report: Any = None) -> Path:
        """Write the rest and rename the folder into place (see ``save``)."""
        layers = layer_prefixes(model)
        rest = {k: v for k, v in model.state_dict().items() if not _under(k, layers)}
        self._add(_units(model, {n for n in _compressed(model) if not _under(n, layers)}, rest))
        if self.pending or not self.parts:
            self._flush()
        with self._writing():
            files = self._name_shards()
            model.config.save_pretrained(self.tmp)
            mark_config_file(self.tmp / "config.json", {name: digest for name, (_, digest) in files.items()})
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            if recipe is not None:
                recipe.save(self.tmp / "recipe.yaml")
            if report is not None:
                report.record_written(self.written, {f: (size, header_bytes(self.tmp / f))
                                                     for f, (size, _) in files.items()})
                report.save(self.tmp / "report.json")
                (self.tmp / "report.txt").write_text(report.table() + "\n")
            honour_umask(self.tmp)
            replace(self.tmp, self.out, self.overwrite)
        return self.out

    def _name_shards(self) -> dict[str, tuple[int, str]]:
        """The parts renamed as ``save_pretrained`` names shards (with an index when several): per
        file its size and SHA-256."""
        files: dict[str, tuple[int, str]] = {}
        weight_map: dict[str, str] = {}
        for i, (part, keys, _, digest) in enumerate(self.parts, 1):
            name = SINGLE_FILE if len(self.parts) == 1 else f"model-{i:05d}-of-{len(self.parts):05d}.safetensors"
            os.replace(self.tmp / part, self.tmp / name)
            files[name] = ((self.tmp / name).stat().st_size, digest)
            weight_map.update(dict.fromkeys(keys, name))
        if len(self.parts) > 1:
            total = sum(nbytes for _, _, nbytes, _ in self.parts)
            (self.tmp / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        return files

    def abort(self) -> None:
        """Remove the unfinished folder (the destination is untouched)."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def _compressed(model: nn.Module) -> set[str]:
    config = zsfw_config(getattr(model, "config", None))
    if config is None:
        raise CheckpointError("save() writes models compressed by zsfw.compress (their config has "
                              "a zsfw quantization_config); use model.save_pretrained for others")
    return set(config.modules)


def header_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file that are not tensor data (length prefix and JSON header)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def expected_bytes(model: nn.Module, targets: dict[str, nn.Linear], ratio: float) -> int:
    """About what saving ``model`` compressed at ``ratio`` writes: its other tensors as they are
    (shared ones once) and the targets at ``ratio`` of the budget's reference bytes per weight."""
    target_params = {id(t.weight) for t in targets.values()}
    others = {p.untyped_storage().data_ptr() if not p.is_meta else id(p): p.numel() * p.element_size()
              for p in model.parameters() if id(p) not in target_params}
    return sum(others.values()) + int(ratio * sum(REFERENCE_BYTES_PER_WEIGHT * t.weight.numel()
                                                          for t in targets.values()))


def tokenizer_bytes(tokenizer: Any, scratch: Path) -> int:
    """The bytes ``tokenizer``'s files take in a saved folder (0 without one): it is saved in a
    temporary folder in ``scratch`` and measured, the only sure size for any tokenizer class."""
    if tokenizer is None:
        return 0
    with tempfile.TemporaryDirectory(prefix=".zsfw-tokenizer-", dir=scratch) as folder:
        tokenizer.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors`` ``save_file``, then its JSON header rewritten in sorted key order.

    safetensors writes the metadata map in hash order, so identical inputs gave files that
    differ on every run; sorted, the same tensors and metadata always give the same bytes. The
    header keeps its length (same content, compact JSON), so the data is not moved.
    """
    save_file(tensors, path, metadata=metadata)
    with open(path, "r+b") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:
            raise CheckpointError(f"safetensors header of {path.name} grew when sorted "
                                  f"({len(text)} > {length} bytes)")
        f.seek(8)
        f.write(text.ljust(length))


def save(model: nn.Module, output_dir: str | Path, tokenizer: Any = None, recipe: Any = None,
         report: Any = None, overwrite: bool = False, max_shard_bytes: int | None = None,
         writer: CheckpointWriter | None = None, checked: bool = False) -> Path:
    """Write a compressed ``model`` as a ``save_pretrained`` folder at ``output_dir``, atomically.

    ``report`` (a ``zsfw.compression.report.Report``) gets the bytes written per module and per file before
    it is saved next to the weights. An existing ``output_dir`` is replaced only with ``overwrite``.
    Shards hold at most ``max_shard_bytes`` (default ``DEFAULT_MAX_SHARD_BYTES``) of tensors, or one
    bigger unit. ``writer``: the one truncation already wrote the decoder layers to (a lazily
    loaded model). ``checked``: see ``CheckpointWriter``.
    """
    _compressed(model)  # refuses a model zsfw did not compress before anything is written
    fresh = writer is None
    writer = writer or CheckpointWriter(output_dir, overwrite, max_shard_bytes, checked)
    try:
        if fresh:
            for prefix in layer_prefixes(model):
                writer.add_layer(model, prefix)
        return writer.finish(model, tokenizer, recipe, report)
    except BaseException:
        writer.abort()
        raise
