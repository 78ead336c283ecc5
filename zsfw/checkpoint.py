"""Compressed models on disk: a ``save_pretrained`` folder written atomically, and read back.

The folder holds ``config.json`` (with a ``quantization_config`` of ``quant_method: "zsfw"``
that lists every compressed module's storage format, shape and rank), safetensors weights
(sharded above ``max_shard_bytes``), the tokenizer, the effective ``recipe.yaml`` and the
``report.json``. A compressed module's tensors are its state dict as its storage format keeps it;
torchao tensor subclasses are stored through torchao's flatten/unflatten helpers (their layout
goes into the safetensors header as JSON). Nothing is pickled.

Writes go to a hidden temporary folder next to the destination, renamed into place only when
complete: an interrupted save leaves no output and does not touch an existing one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from zsfw import plugins

log = logging.getLogger(__name__)

QUANT_METHOD = "zsfw"
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class CheckpointError(Exception):
    """A saved compressed model cannot be read back as its config describes it."""


@dataclass(frozen=True)
class ModuleRecord:
    """How one target layer is stored: its format, shape and rank (None: kept dense)."""

    format: str
    out_features: int
    in_features: int
    rank: int | None
    bias: bool

    @classmethod
    def from_dict(cls, name: str, row: dict) -> "ModuleRecord":
        try:
            return cls(row["format"], int(row["out_features"]), int(row["in_features"]),
                       None if row["rank"] is None else int(row["rank"]), bool(row["bias"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config entry of module {name!r} is malformed "
                                  f"({e!r}); expected format, out_features, in_features, rank, "
                                  f"bias, got {row}") from None

    def to_dict(self) -> dict:
        return {"format": self.format, "out_features": self.out_features,
                "in_features": self.in_features, "rank": self.rank, "bias": self.bias}


def quantization_config(storage: dict, modules: dict[str, ModuleRecord]) -> dict:
    """The ``quantization_config`` entry of ``config.json`` for a compressed model."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "storage": storage,
            "modules": {name: record.to_dict() for name, record in modules.items()}}


def module_records(config: dict) -> dict[str, ModuleRecord]:
    """The per-module records of a ``quantization_config``, after checking its version."""
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"zsfw checkpoint format version {version!r} is not supported; this "
                              f"zsfw reads version {FORMAT_VERSION} (upgrade zsfw or re-compress)")
    return {name: ModuleRecord.from_dict(name, row) for name, row in config.get("modules", {}).items()}


def storage_format(record: ModuleRecord, name: str, options: dict | None = None):
    """The installed storage format plugin a module needs, or an error naming both."""
    try:
        return plugins.create("storage", record.format, options or {})
    except (KeyError, plugins.PluginError, ValueError) as e:
        raise CheckpointError(f"module {name!r} is stored as {record.format!r}, but {e}") from None


# --------------------------------------------------------------------------------------- saving

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


def write_weights(model: nn.Module, directory: Path, max_shard_bytes: int) -> tuple[dict[str, int], dict[str, int]]:
    """Write the model's weights as safetensors shards in ``directory``.

    Returns the bytes written per compressed module (its tensors' data) and the size of each file.
    """
    compressed = set(model.config.quantization_config["modules"])
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
        save_file(tensors, directory / filename, metadata=metadata)
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

    ``report`` (a ``zsfw.report.Report``) gets the bytes written per module and per file before
    it is saved next to the weights. An existing ``output_dir`` is replaced only with ``overwrite``.
    """
    out = Path(output_dir)
    check_destination(out, overwrite)
    if _quant_method(getattr(model, "config", None)) != QUANT_METHOD:
        raise ValueError("save() writes models compressed by zsfw.compress (their config has a "
                         "zsfw quantization_config); use model.save_pretrained for others")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.zsfw-tmp-", dir=out.parent))
    try:
        model.config.save_pretrained(tmp)
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
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite``; call it before long work."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(out)!r} already exists; pass overwrite=True "
                              f"(CLI: --overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {str(out)!r} exists and is not a folder")


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.zsfw-old-{os.getpid()}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _quant_method(model_config: Any) -> str | None:
    config = getattr(model_config, "quantization_config", None)
    if config is None:
        return None
    return config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)


# -------------------------------------------------------------------------------------- loading

def load_modules(model: nn.Module, config: dict, files: list[str | Path]) -> None:
    """Build every compressed module that ``config`` lists from the safetensors ``files`` and
    put it in ``model``; errors name the module and what is missing or mis-shaped."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    records = module_records(config)
    options = (config.get("storage") or {}).get("options") or {}
    formats = {name: storage_format(record, name, options) for name, record in records.items()}
    state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in records}
    for path in files:  # each file's header is parsed once, whatever the number of modules
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if owner_of(k, records) is not None}
            metadata = {"tensor_names": "[]", **(f.metadata() or {})}
        if not tensors:
            continue
        try:
            restored, _ = unflatten_tensor_state_dict(tensors, metadata)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"compressed-module tensors in {Path(path).name} cannot be "
                                  f"restored: {e}") from None
        for key, tensor in restored.items():
            owner = owner_of(key, records)
            state[owner][key[len(owner) + 1:]] = tensor
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, record in records.items():
        if not state[name]:
            raise CheckpointError(f"no tensors for compressed module {name!r} in the checkpoint")
        module = formats[name].skeleton(record.out_features, record.in_features, record.rank, record.bias)
        try:
            result = module.load_state_dict(state.pop(name), strict=False, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"tensors of module {name!r} do not fit its {record.format} "
                                  f"layout: {e}") from None
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f"module {name!r} ({record.format}, rank {record.rank}): missing "
                                  f"tensors {result.missing_keys}, unexpected {result.unexpected_keys}")
        model.set_submodule(name, module.to(device))


def owner_of(key: str, modules: dict | set) -> str | None:
    """The module among ``modules`` whose state dict holds ``key``."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a saved model folder."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}")


def load(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a saved compressed model: ``AutoModelForCausalLM.from_pretrained`` with zsfw's
    quantizer registered (``import zsfw`` does that too). ``kwargs`` go to ``from_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zsfw.hf_quantizer import register

    register()
    config = AutoConfig.from_pretrained(path)
    if _quant_method(config) != QUANT_METHOD:
        raise CheckpointError(f"{str(path)!r} is not a zsfw checkpoint (its config.json has no "
                              f"quantization_config with quant_method 'zsfw')")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
