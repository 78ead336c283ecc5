"""Calibration text in, token windows out.

A source is a local text/jsonl/json/parquet file or a folder of them (read through
``datasets``), a ``datasets.Dataset``, the name of a hub dataset (when online), or any iterable
of strings. Documents are tokenized, joined with the EOS token, and cut into non-overlapping
windows; a seeded permutation picks which windows are used.
"""

from __future__ import annotations

import json
import logging
import os
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import torch
from torch import nn

from zsfw.errors import CalibrationError
from zsfw.recipe import CalibrationConfig

log = logging.getLogger(__name__)

DatasetLike = Union[str, os.PathLike, Iterable[str], Any]
_BUILDERS = {".txt": "text", ".text": "text", ".cor": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


def load_texts(source: DatasetLike, split: str = "train") -> list[str]:
    """All documents of ``source`` as a list of strings."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists():
            return _local_texts(path)
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


def _local_texts(path: Path) -> list[str]:
    """The documents of a local file or folder; for JSON lines that cannot be read, or whose
    ``text`` is not a string, the error names the file and the line."""
    import datasets

    files = sorted(p for p in path.rglob("*") if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(f"folder {str(path)!r} holds no {sorted(_BUILDERS)} files")
    builders = {_BUILDERS.get(p.suffix, "text") for p in files}
    if len(builders) > 1:
        raise CalibrationError(f"folder {str(path)!r} mixes file kinds {sorted(builders)}; "
                               f"use one kind per folder")
    if all(p.stat().st_size == 0 for p in files):
        raise CalibrationError(f"calibration data {str(path)!r} is empty; give a text file or folder")
    builder = builders.pop()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        return _texts_of(datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train"))
    except (datasets.exceptions.DatasetGenerationError, UnicodeDecodeError, ValueError, OSError) as exc:
        located = _json_lines_problem([p for p in files if p.suffix == ".jsonl"]) if builder == "json" else None
        if located:
            raise CalibrationError(f"calibration data {located}; each line must be a JSON object "
                                   f"with a string \"text\"") from None
        if isinstance(exc, CalibrationError):  # from _texts_of
            raise CalibrationError(f"calibration data {str(path)!r}: {exc}") from None
        cause = exc.__cause__ or exc.__context__ or exc
        first = (str(cause).strip().splitlines() or [""])[0]
        raise CalibrationError(f"calibration data {str(path)!r} cannot be read as "
                               f"{'/'.join(sorted(_BUILDERS))} text ({type(cause).__name__}: "
                               f"{first}); give UTF-8 text, JSON lines or parquet") from None


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", list: "array",
               dict: "object", type(None): "null"}


def _json_lines_problem(files: list[Path]) -> str | None:
    """Where the first line of JSON-lines ``files`` that is not a JSON object with a string (or
    null, or no) ``text`` is, and what it holds; None when every line is one."""
    for path in files:
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                where = f"{str(path)!r} line {number}"
                try:
                    record = json.loads(line.decode("utf-8").rstrip("\r\n")) if line.strip() else {}
                except UnicodeDecodeError as exc:
                    return f"{where} is not UTF-8 (at byte offset {exc.start} of the line)"
                except ValueError as exc:
                    return f"{where} is not valid JSON ({exc.msg}: column {exc.colno})"
                if not isinstance(record, dict):
                    return f"{where} is a JSON {_JSON_TYPES[type(record)]}, not an object"
                text = record.get("text")
                if text is not None and not isinstance(text, str):
                    return f"{where}: \"text\" is a JSON {_JSON_TYPES[type(text)]}, not a string"
    return None


def _texts_of(dataset) -> list[str]:
    columns = dataset.column_names
    column = "text" if "text" in columns else next(
        (c for c in columns if getattr(dataset.features[c], "dtype", None) == "string"), None)
    if column is None:
        raise CalibrationError(f"dataset has no text column; columns: {columns}")
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CalibrationError(f"dataset column {column!r} holds {feature}, not strings; give the "
                               f"documents as strings")
    return [t for t in dataset[column] if t and t.strip()]


PIECE_CHARS = 1 << 16
"""About how many characters ``encode`` tokenizes at a time."""
_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a lone newline between two non-space characters


def _cuts(text: str, size: int) -> list[int]:
    """Where ``encode`` cuts ``text``: about every ``size`` characters, just after a newline with
    a non-space character on either side (byte-level BPE pre-tokenizers end a piece with such a
    newline and start the next with the character after it; a longer run of whitespace could
    be split differently at the end of a text, so none is cut)."""
    cuts: list[int] = []
    while (found := _CUT.search(text, (cuts[-1] if cuts else 0) + size)) is not None:
        cuts.append(found.end())
    return cuts


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_into(ids: array, tokenizer, text: str, piece_chars: int) -> None:
    cuts = _cuts(text, piece_chars)
    if cuts:  # a tokenizer that marks the start of every text (a prefix space) must take it whole
        left, right = text[max(0, cuts[0] - 256):cuts[0]], text[cuts[0]:cuts[0] + 256]
        if _ids(tokenizer, left + right) != _ids(tokenizer, left) + _ids(tokenizer, right):
            cuts = []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        ids.extend(_ids(tokenizer, text[start:end]))


def encode(tokenizer, text: str, piece_chars: int = PIECE_CHARS) -> torch.Tensor:
    """The token ids of ``text`` (no special tokens), the same as tokenizing it at once, but
    tokenized ``piece_chars`` characters at a time (cut where ``_cuts`` says; taken whole when
    a probe of the first cut shows the tokenizer would tokenize the pieces differently), so a
    long text's encoding (strings, offsets: hundreds of bytes a token) is never whole in memory."""
    ids = array("q")
    _encode_into(ids, tokenizer, text, piece_chars)
    return _as_tensor(ids)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids: documents joined by EOS (each tokenized as ``encode`` does)."""
    ids = array("q")
    eos = tokenizer.eos_token_id
    for text in texts:
        _encode_into(ids, tokenizer, text, PIECE_CHARS)
        if eos is not None:
            ids.append(eos)
    return _as_tensor(ids)


def _as_tensor(ids: array) -> torch.Tensor:
    return torch.frombuffer(ids, dtype=torch.int64).clone() if ids else torch.zeros(0, dtype=torch.long)


def _shuffled_chunks(tokens: torch.Tensor, samples: int, sequence_length: int, seed: int,
                     max_tokens: int | None, held_out: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-overlapping chunks of the first ``max_tokens`` tokens and their seeded order."""
    pool = tokens if max_tokens is None else tokens[:max_tokens]
    available = pool.numel() // sequence_length
    if available < samples + held_out:
        raise CalibrationError(
            f"calibration text has {pool.numel()} tokens"
            f"{'' if max_tokens is None else f' within max_tokens={max_tokens}'}, enough for "
            f"{available} windows of {sequence_length}; {samples} were requested"
            f"{f' and {held_out} held out' if held_out else ''}. Give more text, or lower "
            f"calibration.samples, sequence_length{', validation_samples or training_samples' if held_out else ''}")
    chunks = pool[: available * sequence_length].view(available, sequence_length)
    return chunks, torch.randperm(available, generator=torch.Generator().manual_seed(seed))


def sample_windows(tokens: torch.Tensor, samples: int, sequence_length: int, seed: int = 0,
                   max_tokens: int | None = None) -> torch.Tensor:
    """``samples`` distinct windows of ``sequence_length`` tokens (samples × sequence_length).

    Windows are the non-overlapping chunks of the first ``max_tokens`` tokens; the seed picks
    which ones, so the same seed always gives the same windows.
    """
    chunks, order = _shuffled_chunks(tokens, samples, sequence_length, seed, max_tokens)
    return chunks[order[:samples]].clone()


def held_out_windows(tokens: torch.Tensor, count: int, samples: int, sequence_length: int,
                     seed: int = 0, max_tokens: int | None = None, skip: int = 0) -> torch.Tensor:
    """``count`` windows of the same text that ``sample_windows`` with these arguments never
    picks, after ``skip`` others held out before them (validation windows, then windows for
    measuring what a compression lost: disjoint sets)."""
    chunks, order = _shuffled_chunks(tokens, samples, sequence_length, seed, max_tokens, skip + count)
    return chunks[order[samples + skip:samples + skip + count]].clone()


def text_tokens(tokenizer, source: DatasetLike) -> torch.Tensor:
    """Load and tokenize ``source`` into one stream; an error when it holds no text."""
    texts = load_texts(source)
    if not texts:
        raise CalibrationError(f"calibration data {str(source)[:200]!r} holds no text")
    return tokenize(tokenizer, texts)


def calibration_windows(tokenizer, source: DatasetLike, samples: int, sequence_length: int,
                        seed: int = 0, max_tokens: int | None = None) -> torch.Tensor:
    """Load, tokenize and sample: the calibration batch of ``source``."""
    return sample_windows(text_tokens(tokenizer, source), samples, sequence_length, seed, max_tokens)


@dataclass
class Windows:
    """The disjoint window sets of one text: calibration, then held out: validation (a
    corrector's), training (a training stage's) and measurement (what a compression lost)."""

    calibration: torch.Tensor
    validation: torch.Tensor | None = None
    training: torch.Tensor | None = None
    measurement: torch.Tensor | None = None


def drawn_windows(tokens: torch.Tensor, calibration: CalibrationConfig, validation: int = 0, training: int = 0,
                  measurement: int = 0) -> Windows:
    """Calibration windows and that many of each held-out set (None for none), all disjoint."""
    c = calibration

    def held(count: int, skip: int) -> torch.Tensor | None:
        return held_out_windows(tokens, count, c.samples, c.sequence_length, c.seed, c.max_tokens,
                                skip) if count else None

    return Windows(sample_windows(tokens, c.samples, c.sequence_length, c.seed, c.max_tokens),
                   held(validation, 0), held(training, validation), held(measurement, validation + training))


def windows_for(model: nn.Module, dataset: DatasetLike | torch.Tensor | None, tokenizer: Any,
                calibration: CalibrationConfig, validation: int = 0, training: int = 0) -> Windows:
    """The calibration windows of a ``compress`` call and ``validation`` and ``training``
    held-out windows of the same text: ``dataset`` itself when it is a (windows × tokens) tensor
    of ids (no held-out windows: the caller gives them), else drawn from its text as
    ``calibration`` says (with ``tokenizer``, default: the model's own)."""
    if isinstance(dataset, torch.Tensor):
        return Windows(token_ids(dataset, "a tensor dataset", vocabulary(model)))
    if dataset is None:
        raise CalibrationError("compress needs calibration data: a text file/folder, a "
                               "datasets.Dataset, an iterable of strings, or a tensor of token ids")
    if tokenizer is None:
        from zsfw.models import own_tokenizer

        tokenizer = own_tokenizer(model, "calibration on text")
    return drawn_windows(text_tokens(tokenizer, dataset), calibration, validation, training)


def vocabulary(model: nn.Module) -> int:
    """How many token ids ``model`` embeds (rows of its input embedding)."""
    return model.get_input_embeddings().num_embeddings


def token_ids(ids: torch.Tensor, what: str, vocab: int) -> torch.Tensor:
    """``ids`` when it is a (windows × tokens) int64 tensor of ids in 0..``vocab`` − 1, else an
    error naming ``what`` (an id out of range would be a bare ``IndexError`` in the embedding)."""
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise CalibrationError(f"{what} must be (windows × tokens) int64 ids, got "
                               f"{tuple(ids.shape)} {ids.dtype}")
    outside = (ids < 0) | (ids >= vocab)
    if outside.any():
        raise CalibrationError(f"{what} holds token id {int(ids[outside][0])}, outside the model's "
                               f"vocabulary of {vocab}: ids must be in 0..{vocab - 1}")
    return ids


COVERAGE_FLOOR = 8
"""Calibration tokens below a target's input width divided by this are refused: C would have
rank below 1/8 of its size and the whitened SVD would mostly fit the damping."""


def coverage_warnings(targets: dict[str, nn.Linear], windows: torch.Tensor) -> list[str]:
    """A warning (also logged) for targets whose input is wider than the calibration tokens, so
    their C = E[x xᵀ] is rank-deficient; a ``CalibrationError`` far below that."""
    tokens = windows.numel()
    narrow = {name: t.in_features for name, t in targets.items() if t.in_features > tokens}
    if not narrow:
        return []
    widest = max(narrow.values())
    example = next(name for name, width in narrow.items() if width == widest)
    if tokens * COVERAGE_FLOOR < widest:
        raise CalibrationError(f"{tokens} calibration tokens for {example!r}, whose input is {widest} "
                               f"wide: at least {widest // COVERAGE_FLOOR} are needed, {widest} or "
                               f"more for a full-rank C; raise calibration.samples or "
                               f"calibration.sequence_length")
    message = (f"only {tokens} calibration tokens: {len(narrow)} target(s) have wider inputs (e.g. "
               f"{example!r}, {widest} wide), so their statistics are rank-deficient and quality "
               f"may collapse; use at least {widest} tokens")
    log.warning(message)
    return [message]
