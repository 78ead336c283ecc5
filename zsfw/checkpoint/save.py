"""Writing a compressed model as a ``save_pretrained`` folder, atomically.

The folder holds ``config.json`` (with the model's ``ZsfwConfig`` as ``quantization_config``),
safetensors weights (sharded above ``max_shard_bytes``), the tokenizer, the effective
``recipe.yaml`` and the ``report.json``. A compressed module's tensors are its state dict as its
storage format keeps it; torchao tensor subclasses are stored through torchao's flatten/unflatten
helpers (their layout goes into the safetensors header as JSON). Nothing is pickled.

Writes go to a hidden temporary folder next to the destination, renamed into place only when
complete: an interrupted save leaves no output and does not touch an existing one (see
``zsfw.checkpoint.destination`` for what may be replaced). The same model, tokenizer, recipe and
report always give byte-identical files.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from zsfw.checkpoint.destination import check_destination, honour_umask, new_folder, replace
from zsfw.checkpoint.hf_quantizer import mark_config_file, zsfw_config
from zsfw.checkpoint.schema import owner_of
from zsfw.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

def module_tensors(name: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A compressed module's state dict as plain tensors (torchao subclasses flattened) and the
    header metadata that restores them; keys are prefixed with ``name``."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(module.state_dict(prefix=f"{name}."))
    return {k: v.detach().contiguous() for k, v in tensors.items()}, metadata


def _other_tensors(model: nn.Module, compressed: set[str]) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the compressed modules, each shared storage once (tied
    embeddings are saved under their first name and re-tied by ``transformers`` on load)."""
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if owner_of(key, compressed) is not None:
            continue
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out


def _units(model: nn.Module, compressed: set[str]) -> Iterator[tuple[str | None, dict, dict]]:
    """What is written, unit by unit (a unit never spans two shards): each compressed module
    with its metadata, then the model's other tensors one by one."""
    modules = dict(model.named_modules())
    for name in sorted(compressed):
        yield (name, *module_tensors(name, modules[name]))
    for key, tensor in _other_tensors(model, compressed).items():
        yield None, {key: tensor}, {}


def _shards(units: list[tuple[str | None, dict, dict]], max_bytes: int) -> list[list]:
    shards, size = [[]], 0
    for unit in units:
        nbytes = sum(t.nbytes for t in unit[1].values())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def header_bytes(path: str | Path) -> int:
    """Bytes of a safetensors file that are not tensor data (length prefix and JSON header)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def expected_bytes(model: nn.Module, targets: dict[str, nn.Linear], ratio: float) -> int:
    """About what saving ``model`` compressed at ``ratio`` writes: its other tensors as they are
    (shared ones once) and the targets at ``ratio`` of 16 bits per weight."""
    target_params = {id(t.weight) for t in targets.values()}
    others = {p.untyped_storage().data_ptr(): p.numel() * p.element_size()
              for p in model.parameters() if id(p) not in target_params}
    return sum(others.values()) + int(ratio * sum(2 * t.weight.numel() for t in targets.values()))


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


def write_weights(model: nn.Module, directory: Path, max_shard_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """Write the model's weights as safetensors shards in ``directory``.

    Returns the bytes written per compressed module (its tensors' data) and the size of each file.
    """
    compressed = set(zsfw_config(model.config).modules)
    shards = _shards(list(_units(model, compressed)), max_shard_bytes)
    written: dict[str, int] = {}
    files: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        filename = SINGLE_FILE if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        metadata: dict[str, str] = {"format": "pt"}
        names: list[str] = []
        for module, unit_tensors, unit_metadata in shard:
            tensors.update(unit_tensors)
            names += json.loads(unit_metadata.pop("tensor_names", "[]"))
            metadata.update(unit_metadata)
            if module is not None:
                written[module] = sum(t.nbytes for t in unit_tensors.values())
        if names:
            metadata["tensor_names"] = json.dumps(names)
        write_safetensors(tensors, directory / filename, metadata)
        files[filename] = (directory / filename).stat().st_size
        weight_map.update(dict.fromkeys(tensors, filename))
    if len(shards) > 1:
        total = sum(t.nbytes for shard in shards for unit in shard for t in unit[1].values())
        (directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return written, files


def save(model: nn.Module, output_dir: str | Path, tokenizer: Any = None, recipe: Any = None,
         report: Any = None, overwrite: bool = False,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a compressed ``model`` as a ``save_pretrained`` folder at ``output_dir``, atomically.

    ``report`` (a ``zsfw.compression.report.Report``) gets the bytes written per module and per file before
    it is saved next to the weights. An existing ``output_dir`` is replaced only with ``overwrite``.
    """
    out = check_destination(output_dir, overwrite)
    if zsfw_config(getattr(model, "config", None)) is None:
        raise CheckpointError("save() writes models compressed by zsfw.compress (their config has "
                              "a zsfw quantization_config); use model.save_pretrained for others")
    tmp = new_folder(out.parent, f".{out.name}.zsfw-tmp-")
    try:
        model.config.save_pretrained(tmp)
        mark_config_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        written, files = write_weights(model, tmp, max_shard_bytes)
        if recipe is not None:
            recipe.save(tmp / "recipe.yaml")
        if report is not None:
            report.record_written(written, {f: (size, header_bytes(tmp / f)) for f, size in files.items()})
            report.save(tmp / "report.json")
            (tmp / "report.txt").write_text(report.table() + "\n")
        honour_umask(tmp)
        replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
