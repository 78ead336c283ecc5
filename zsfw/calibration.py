"""Calibration text in, token windows out.

A source is a local text/jsonl/json/parquet file or a folder of them (read through
``datasets``), a ``datasets.Dataset``, the name of a hub dataset (when online), or any iterable
of strings. Documents are tokenized, joined with the EOS token, and cut into non-overlapping
windows; a seeded permutation picks which windows are used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Union

import torch

DatasetLike = Union[str, os.PathLike, Iterable[str], Any]
_BUILDERS = {".txt": "text", ".text": "text", ".cor": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


class CalibrationError(ValueError):
    """The calibration source is unreadable or holds too little text."""


def load_texts(source: DatasetLike, split: str = "train") -> list[str]:
    """All documents of ``source`` as a list of strings."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            return _texts_of(_load_local(path))
        if not isinstance(source, str) or path.suffix in _BUILDERS or source.startswith((".", "/", "~")):
            raise CalibrationError(f"calibration data {str(source)!r} does not exist")
        import datasets

        try:
            return _texts_of(datasets.load_dataset(source, split=split))
        except Exception as exc:
            raise CalibrationError(f"calibration data {source!r} is not a local path and could "
                                   f"not be loaded as a hub dataset: {exc}") from exc
    if hasattr(source, "column_names"):
        return _texts_of(source)
    texts = list(source)
    if not all(isinstance(t, str) for t in texts):
        raise CalibrationError("an iterable calibration source must yield strings")
    return texts


def _load_local(path: Path):
    import datasets

    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(f"folder {str(path)!r} holds no {sorted(_BUILDERS)} files")
    builders = {_BUILDERS.get(p.suffix, "text") for p in files}
    if len(builders) > 1:
        raise CalibrationError(f"folder {str(path)!r} mixes file kinds {sorted(builders)}; "
                               f"use one kind per folder")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def _texts_of(dataset) -> list[str]:
    columns = dataset.column_names
    column = "text" if "text" in columns else next(
        (c for c in columns if dataset.features[c].dtype == "string"), None)
    if column is None:
        raise CalibrationError(f"dataset has no text column; columns: {columns}")
    return [t for t in dataset[column] if t and t.strip()]


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids: documents joined by EOS."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(
    tokens: torch.Tensor,
    samples: int,
    sequence_length: int,
    seed: int = 0,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """``samples`` distinct windows of ``sequence_length`` tokens (samples × sequence_length).

    Windows are the non-overlapping chunks of the first ``max_tokens`` tokens; the seed picks
    which ones, so the same seed always gives the same windows.
    """
    pool = tokens if max_tokens is None else tokens[:max_tokens]
    available = pool.numel() // sequence_length
    if available < samples:
        raise CalibrationError(
            f"calibration text has {pool.numel()} tokens"
            f"{'' if max_tokens is None else f' within max_tokens={max_tokens}'}, enough for "
            f"{available} windows of {sequence_length}; {samples} were requested. Give more "
            f"text, or lower calibration.samples or calibration.sequence_length")
    chunks = pool[: available * sequence_length].view(available, sequence_length)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return chunks[order[:samples]].clone()


def calibration_windows(tokenizer, source: DatasetLike, samples: int, sequence_length: int,
                        seed: int = 0, max_tokens: int | None = None) -> torch.Tensor:
    """Load, tokenize and sample: the calibration batch the pipeline runs."""
    texts = load_texts(source)
    if not texts:
        raise CalibrationError("calibration source holds no text")
    return sample_windows(tokenize(tokenizer, texts), samples, sequence_length, seed, max_tokens)
