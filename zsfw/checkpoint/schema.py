"""What the ``quantization_config`` of a zsfw model records: per compressed module its format,
shape and rank. The config object itself, ``ZsfwConfig``, is registered with ``transformers`` and
lives in ``zsfw.checkpoint.hf_quantizer``.

In ``config.json`` it reads::

    "quantization_config": {"quant_method": "zsfw", "format_version": 1,
                            "storage": {"name": "bf16", "options": {}},
                            "modules": {"model.layers.0.self_attn.q_proj":
                                        {"format": "bf16", "out_features": 576, "in_features": 576,
                                         "rank": 301, "bias": false}, ...}}

``rank`` is null for a layer kept dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from zsfw.errors import CheckpointError

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
        if record.rank is not None and not 0 < record.rank < full:
            raise CheckpointError(f"quantization_config gives module {name!r} ({record.out_features}x"
                                  f"{record.in_features}) rank {record.rank}; a stored rank is in "
                                  f"1..{full - 1} (null for a dense layer)")
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
