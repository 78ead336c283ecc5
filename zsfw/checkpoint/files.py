"""Where a ``save_pretrained`` folder keeps its weights (one safetensors file, or shards listed
in an index) and its ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from zsfw.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"


def read_config(directory: str | Path) -> dict:
    """A model folder's ``config.json`` as a dict, or a one-line ``CheckpointError`` saying why
    it cannot be: missing, unreadable, not JSON (where it breaks) or not a JSON object."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {CONFIG_FILE}: not a saved model folder")
    try:
        config = json.loads(path.read_bytes())
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        where = (f"{exc.msg}: line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError)
                 else str(exc))
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({where}); the folder's config is "
                              f"damaged: save or copy the model again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(config).__name__}, not an object; the "
                              f"folder's config is damaged: save or copy the model again")
    return config


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a saved model folder."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {str(directory)!r}")
