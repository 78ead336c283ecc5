"""``transformers`` integration: ``ZsfwConfig``, the one ``quantization_config`` object of a zsfw
model (the same after ``compress`` and after loading), and the quantizer that makes
``from_pretrained`` of a zsfw folder return the compressed model.

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

import json
import re
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from zsfw import plugins
from zsfw.checksums import check_checkpoint
from zsfw.checkpoint.schema import BASE_MODEL_TYPE, FORMAT_VERSION, MODEL_TYPE, QUANT_METHOD, ModuleRecord
from zsfw.errors import CheckpointError, PluginError


class ZsfwConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a zsfw model (registered with ``transformers``).

    ``checksums`` (weight file name -> SHA-256) describe the files a model was loaded from, not
    the model: ``to_dict`` leaves them out, and every save records its own files' digests.
    """

    def __init__(self, format_version: int | None = None, storage: dict | None = None,
                 modules: dict | None = None, checksums: dict | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.storage = storage or {}
        self.modules = modules or {}
        self.checksums = checksums or {}

    @classmethod
    def build(cls, storage: dict, records: dict[str, ModuleRecord]) -> "ZsfwConfig":
        """The config of a model ``compress`` just built."""
        return cls(FORMAT_VERSION, storage, {name: r.to_dict() for name, r in records.items()})

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "storage": self.storage, "modules": self.modules}

    def records(self) -> dict[str, ModuleRecord]:
        """The per-module records, after checking the format version."""
        if self.format_version != FORMAT_VERSION:
            raise CheckpointError(f"zsfw checkpoint format version {self.format_version!r} is not "
                                  f"supported; this zsfw reads version {FORMAT_VERSION} (upgrade "
                                  f"zsfw or re-compress)")
        return {name: ModuleRecord.from_dict(name, row) for name, row in self.modules.items()}

    def storage_format(self, name: str, record: ModuleRecord):
        """The installed storage format plugin module ``name`` needs, or an error naming both: the
        recorded storage itself, or the member of that name of a format chooser (``auto``)."""
        try:
            if self.storage.get("name", record.format) == record.format:
                return plugins.create("storage", record.format, self.storage.get("options") or {})
            members = getattr(plugins.create("storage", self.storage["name"], self.storage.get("options") or {}),
                              "members", {})
            if record.format not in members:
                raise CheckpointError(f"module {name!r} is stored as {record.format!r}, which storage "
                                      f"{self.storage['name']!r} does not hold (it holds {sorted(members)})")
            return members[record.format]
        except PluginError as e:
            raise CheckpointError(f"module {name!r} is stored as {record.format!r}, but {e}") from None


def zsfw_config(model_config: Any) -> ZsfwConfig | None:
    """The ``ZsfwConfig`` of a model's config (or of its ``quantization_config`` dict), or None."""
    config = getattr(model_config, "quantization_config", None)
    if isinstance(config, ZsfwConfig):
        return config
    if isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD:
        return ZsfwConfig(**{k: v for k, v in config.items() if k != "quant_method"})
    return None


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


def mark_config_file(path: str | Path, checksums: dict[str, str]) -> None:
    """Rewrite a saved ``config.json`` so that only zsfw can load its folder (see ``MODEL_TYPE``),
    with the SHA-256 ``checksums`` of its weight files in its ``quantization_config``."""
    path = Path(path)
    config = json.loads(path.read_text())
    config[BASE_MODEL_TYPE] = config["model_type"]
    config["model_type"] = MODEL_TYPE
    config["quantization_config"]["checksums"] = checksums
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
        register_quantization_config(QUANT_METHOD)(ZsfwConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ZsfwHfQuantizer)


register()
