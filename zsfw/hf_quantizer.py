"""``transformers`` integration: ``from_pretrained`` of a zsfw folder returns the compressed model.

``import zsfw`` registers ``ZsfwConfig`` and ``ZsfwHfQuantizer`` under ``quant_method: "zsfw"``.
Before weights load, the quantizer puts an empty placeholder at every compressed module (so
``transformers`` neither allocates nor initializes the original dense weight) and tells the
loader to leave those modules' tensors alone; after loading, ``zsfw.checkpoint.load_modules``
builds each module from its storage format's skeleton and its tensors.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from zsfw.checkpoint import QUANT_METHOD, CheckpointError, module_records, storage_format


class ZsfwConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a zsfw checkpoint (see ``zsfw.checkpoint``)."""

    def __init__(self, format_version: int | None = None, storage: dict | None = None,
                 modules: dict | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.storage = storage or {}
        self.modules = modules or {}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "storage": self.storage, "modules": self.modules}

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]


class _Pending(nn.Module):
    """Stands where a compressed module will be built once the other weights are loaded."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a zsfw module was never loaded (the checkpoint load did not finish)")


class ZsfwHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-compressed checkpoints can be loaded

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        records = module_records(self.quantization_config.to_dict())  # checks the version
        options = self.quantization_config.storage.get("options") or {}
        for name, record in records.items():
            storage_format(record, name, options)  # fails early, naming the module, if missing

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any):
        records = module_records(self.quantization_config.to_dict())
        self.checkpoint_files = checkpoint_files
        for name, record in records.items():
            try:
                original = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"compressed module {name!r} does not exist in "
                                      f"{type(model).__name__}") from None
            shape = (getattr(original, "out_features", None), getattr(original, "in_features", None))
            if not isinstance(original, nn.Linear) or shape != (record.out_features, record.in_features):
                raise CheckpointError(f"compressed module {name!r} is {record.out_features}x"
                                      f"{record.in_features} in the checkpoint, but the model has "
                                      f"{original!r} there")
            model.set_submodule(name, _Pending())
        ignore = set(model._keys_to_ignore_on_load_unexpected or [])
        model._keys_to_ignore_on_load_unexpected = ignore | {rf"^{re.escape(n)}\." for n in records}
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any):
        from zsfw.checkpoint import load_modules

        if not self.checkpoint_files:
            raise CheckpointError("transformers gave the zsfw quantizer no checkpoint files to read")
        load_modules(model, self.quantization_config.to_dict(), self.checkpoint_files)
        return model

    def is_serializable(self) -> bool:
        return False  # use zsfw.save: it writes atomically and records the bytes of every module

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer with ``transformers`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ZsfwConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ZsfwHfQuantizer)
