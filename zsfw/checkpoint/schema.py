"""What the ``quantization_config`` of a zsfw model records: per compressed module its format,
shape and rank, and the config object itself, ``ZsfwConfig`` (``zsfw.checkpoint.hf_quantizer``
adapts it to ``transformers``; nothing here imports ``transformers``).

In ``config.json`` it reads::

    "quantization_config": {"quant_method": "zsfw", "format_version": 1,
                            "storage": {"name": "bf16", "options": {}},
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"format": "bf16", "out_features": 576, "in_features": 576,
                                         "rank": 301, "bias": false}, ...}}

``rank`` is null for a layer kept dense.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zsfw import plugins
from zsfw.errors import CheckpointError, PluginError

QUANT_METHOD = "zsfw"
FORMAT_VERSION = 1
MODEL_TYPE = "zsfw"
"""The ``model_type`` of a saved zsfw folder's ``config.json``: only zsfw registers it, so
``from_pretrained`` without ``import zsfw`` refuses the folder instead of building random dense
layers where the compressed ones are. The model's own type is kept under ``BASE_MODEL_TYPE``."""
BASE_MODEL_TYPE = "zsfw_base_model_type"


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
            record = cls(row["format"], int(row["out_features"]), int(row["in_features"]),
                         None if row["rank"] is None else int(row["rank"]), bool(row["bias"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config entry of module {name!r} is malformed "
                                  f"({e!r}); expected format, out_features, in_features, rank, "
                                  f"bias, got {row}") from None
        full = min(record.out_features, record.in_features)
        if record.rank is not None and not 0 <= record.rank < full:  # 0: a quantized base alone
            raise CheckpointError(f"quantization_config gives module {name!r} ({record.out_features}x"
                                  f"{record.in_features}) rank {record.rank}; a stored rank is in "
                                  f"0..{full - 1} (0 only in a format with a quantized base; null for a dense layer)")
        return record

    def to_dict(self) -> dict:
        return {"format": self.format, "out_features": self.out_features,
                "in_features": self.in_features, "rank": self.rank, "bias": self.bias}


def owner_of(key: str, modules: dict | set) -> str | None:
    """The module among ``modules`` whose state dict holds ``key``."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


class ZsfwConfig:
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


def mark_config_file(path: str | Path, checksums: dict[str, str]) -> None:
    """Rewrite a saved ``config.json`` so that only zsfw can load its folder (see ``MODEL_TYPE``),
    with the SHA-256 ``checksums`` of its weight files in its ``quantization_config``."""
    path = Path(path)
    config = json.loads(path.read_text())
    config[BASE_MODEL_TYPE] = config["model_type"]
    config["model_type"] = MODEL_TYPE
    config["quantization_config"]["checksums"] = checksums
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
