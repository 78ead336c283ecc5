"""What a saved compressed model holds, read from its config and safetensors headers, after its
weight files are checked against the checksums its config records."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from zsfw.budget import REFERENCE_BYTES_PER_WEIGHT
from zsfw.checkpoint.files import checkpoint_files, read_config
from zsfw.checkpoint.schema import ZsfwConfig
from zsfw.checkpoint.schema import QUANT_METHOD, owner_of
from zsfw.checksums import check_checkpoint
from zsfw.errors import CheckpointError


@dataclass
class SavedModule:
    name: str
    format: str
    shape: tuple[int, int]
    rank: int | None  # None: kept dense
    bytes: int  # tensor bytes in the files

    @property
    def kept(self) -> float:
        """Bytes kept against the layer at 16 bits per weight (weights only)."""
        return self.bytes / (self.shape[0] * self.shape[1] * REFERENCE_BYTES_PER_WEIGHT)


def saved_modules(directory: str | Path) -> list[SavedModule]:
    """Every compressed module of a saved model, with the bytes its tensors take on disk."""
    config = read_config(directory).get("quantization_config")
    if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{str(directory)!r} is not a zsfw checkpoint (no zsfw "
                              f"quantization_config in its config.json)")
    zsfw = ZsfwConfig(**{k: v for k, v in config.items() if k != "quant_method"})
    records = zsfw.records()
    files = checkpoint_files(directory)
    check_checkpoint(files, zsfw.checksums)
    sizes = dict.fromkeys(records, 0)
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                owner = owner_of(key, records)
                if owner is not None:
                    piece = f.get_slice(key)
                    sizes[owner] += _numel(piece.get_shape()) * _itemsize(piece.get_dtype())
    return [SavedModule(name, r.format, (r.out_features, r.in_features), r.rank, sizes[name])
            for name, r in records.items()]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1,
             "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def table(modules: list[SavedModule]) -> str:
    head = f"{'module':<44} {'shape':>11} {'format':>7} {'rank':>11} {'kept':>6} {'bytes':>10}"
    rows = [head, "-" * len(head)]
    for m in modules:
        rank = "dense" if m.rank is None else f"{m.rank}/{min(m.shape)}"
        rows.append(f"{m.name[-44:]:<44} {m.shape[0]:>5}x{m.shape[1]:<5} {m.format:>7} {rank:>11} "
                    f"{m.kept:>6.3f} {m.bytes:>10}")
    total = sum(m.bytes for m in modules)
    reference = sum(m.shape[0] * m.shape[1] * REFERENCE_BYTES_PER_WEIGHT for m in modules)
    rows += ["-" * len(head), f"total: {total} bytes in {len(modules)} compressed modules, "
                              f"{total / reference:.3f} of their 16-bit size ({reference} bytes)"]
    return "\n".join(rows)


def plot(modules: list[SavedModule], path: str | Path, title: str = "") -> Path:
    """A PNG of the kept fraction per block, one line per module type (q_proj, down_proj, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for m in modules:
        block = re.findall(r"\.(\d+)\.", f".{m.name}.")
        series.setdefault(m.name.rsplit(".", 1)[-1], []).append(
            (int(block[-1]) if block else 0, m.kept))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for kind, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=kind)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_xlabel("block")
    ax.set_ylabel("kept bytes / 16-bit bytes")
    ax.set_title(title)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
