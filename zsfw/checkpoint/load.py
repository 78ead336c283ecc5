"""Reading a saved compressed model back: ``zsfw.load`` and the module builder that the
``transformers`` quantizer calls after the other weights are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from zsfw.budget import has_base
from zsfw.checkpoint.schema import ZsfwConfig, zsfw_config
from zsfw.checkpoint.schema import owner_of
from zsfw.errors import CheckpointError


def load_modules(model: nn.Module, config: ZsfwConfig, files: list[str | Path]) -> None:
    """Build every compressed module that ``config`` lists from the safetensors ``files`` and
    put it in ``model``; errors name the module and what is missing or mis-shaped."""
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    records = config.records()
    formats = {name: config.storage_format(name, record) for name, record in records.items()}
    state: dict[str, dict[str, torch.Tensor]] = {name: {} for name in records}
    known = set(model.state_dict())
    for path in files:  # each file's header is parsed once, whatever the number of modules
        with safe_open(path, framework="pt", device="cpu") as f:
            stray = [k for k in f.keys() if k not in known and owner_of(k, records) is None]
            if stray:
                raise CheckpointError(f"{Path(path).name} holds {stray[0]!r}, which belongs to no "
                                      f"module of the model nor to a compressed module of its "
                                      f"quantization_config (was an entry removed from it?)")
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
        if record.rank == 0 and not has_base(formats[name]):
            raise CheckpointError(f"quantization_config gives module {name!r} rank 0 in format {record.format!r}, "
                                  f"which has no quantized base; a stored rank there is 1 or more")
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


def load(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a saved compressed model: ``AutoModelForCausalLM.from_pretrained`` with zsfw's
    quantizer registered (``import zsfw`` does that too). ``kwargs`` go to ``from_pretrained``.
    Weight files that differ from the checksums config.json records are a ``CheckpointError``
    (``ZSFW_SKIP_CHECKSUM=1`` loads them as they are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if zsfw_config(config) is None:
        raise CheckpointError(f"{str(path)!r} is not a zsfw checkpoint (its config.json has no "
                              f"quantization_config with quant_method 'zsfw')")
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
