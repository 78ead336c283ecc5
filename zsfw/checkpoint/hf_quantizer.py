"""``transformers`` integration: adapts ``zsfw.checkpoint.schema.ZsfwConfig``, the one
``quantization_config`` of a zsfw model, to a ``transformers`` quantization config, and adds the
quantizer that makes ``from_pretrained`` of a zsfw folder return the compressed model.

Importing this module registers both under ``quant_method: "zsfw"``; ``import zsfw`` imports it as
soon as ``transformers`` is imported. It imports nothing of zsfw that imports ``transformers``, so
it can load in the middle of any import of ``transformers``.
Before weights load, the quantizer puts an empty placeholder at every compressed module (so
``transformers`` neither allocates nor initializes the original dense weight) and tells the
loader to leave those modules' tensors alone; after loading, ``zsfw.checkpoint.load.load_modules``
builds each module from its storage format's skeleton and its tensors. Before anything is read, the
weight files are checked against the SHA-256 digests config.json records (``zsfw.checksums``).
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from zsfw.checksums import check_checkpoint
from zsfw.checkpoint.schema import BASE_MODEL_TYPE, MODEL_TYPE, QUANT_METHOD, ZsfwConfig
from zsfw.errors import CheckpointError


class ZsfwQuantizationConfig(ZsfwConfig, QuantizationConfigMixin):
    """``ZsfwConfig`` as ``transformers`` registers a quantization config: ``from_pretrained``
    builds this one from a zsfw folder's ``config.json``; the loaded model's config gets the plain
    ``ZsfwConfig`` back (the same object type as after ``compress``)."""

    def plain(self) -> ZsfwConfig:
        return ZsfwConfig(self.format_version, self.storage, self.modules, self.checksums)


class ZsfwModelConfig(PreTrainedConfig):
    """What ``model_type: "zsfw"`` in a saved folder's ``config.json`` reads as: the model's own
    config class (``zsfw_base_model_type``), built from the same dictionary."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        config_dict = dict(config_dict)
        base = config_dict.pop(BASE_MODEL_TYPE, None)
        if base not in CONFIG_MAPPING or base == MODEL_TYPE:
            raise CheckpointError(f"config.json of a zsfw model has {BASE_MODEL_TYPE} {base!r}, which "
                                  f"is not a model type this transformers knows")
        config_dict["model_type"] = base
        return CONFIG_MAPPING[base].from_dict(config_dict, **kwargs)


class _Pending(nn.Module):
    """Stands where a compressed module will be built once the other weights are loaded."""

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a zsfw module was never loaded (the checkpoint load did not finish)")


class ZsfwHfQuantizer(HfQuantizer):
    requires_calibration = True  # only pre-compressed checkpoints can be loaded

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        config = self.quantization_config
        for name, record in config.records().items():  # checks the version
            config.storage_format(name, record)  # fails early, naming the module, if missing

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any):
        records = self.quantization_config.records()
        check_checkpoint(checkpoint_files or [], self.quantization_config.checksums)
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
        from zsfw.checkpoint.load import load_modules  # not at import: this module loads with transformers

        if not self.checkpoint_files:
            raise CheckpointError("transformers gave the zsfw quantizer no checkpoint files to read")
        load_modules(model, self.quantization_config, self.checkpoint_files)
        model.config.quantization_config = self.quantization_config.plain()
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        raise CheckpointError("save_pretrained cannot write a zsfw model; use zsfw.save(model, "
                              "folder): it writes the compressed modules atomically")

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register the configs and the quantizer with ``transformers`` (idempotent)."""
    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, ZsfwModelConfig)
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ZsfwQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ZsfwHfQuantizer)


register()
