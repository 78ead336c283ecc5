"""Where a ``save_pretrained`` folder keeps its weights: one safetensors file, or shards listed
in an index."""

from __future__ import annotations

import json
from pathlib import Path

from zsfw.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a saved model folder."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}")
