"""Perplexity in the protocol of the SVD-compression papers.

The text is tokenized into one stream (documents joined by EOS, no BOS added) and cut into
non-overlapping windows of ``window`` tokens starting at token ``offset``; PPL is
exp(mean next-token NLL) over all scored tokens (window − 1 per window: the first token of a
window is context only). BOS policy, explicit: ``bos="none"`` (the papers' protocol) feeds the
windows as they are; ``bos="each"`` puts the tokenizer's BOS in front of every window of
``window − 1`` text tokens, so every text token is scored. A window whose logits are not finite
is reported in the result and left out of the mean, never silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from zsfw.errors import EvaluationError

BOS_POLICIES = ("none", "each")


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int  # scored tokens
    windows: int  # windows evaluated
    window: int
    offset: int
    non_finite_windows: list[int] = field(default_factory=list)
    bos: str = "none"


def _windows(tokens: torch.Tensor, window: int, windows: int | None, offset: int,
             bos_token_id: int | None) -> torch.Tensor:
    if window < 2:
        raise EvaluationError(f"window must be at least 2 tokens (one of context, one scored), "
                              f"got {window}")
    text = window - (bos_token_id is not None)  # text tokens per window
    stream = tokens[offset:]
    available = stream.numel() // text
    count = available if windows is None else windows
    if count < 1 or count > available:
        raise EvaluationError(f"{stream.numel()} tokens after offset {offset} hold {available} windows "
                         f"of {text} text tokens; {count} requested")
    chunks = stream[: count * text].view(count, text)
    if bos_token_id is not None:
        chunks = torch.cat([torch.full((count, 1), bos_token_id, dtype=chunks.dtype), chunks], dim=1)
    return chunks


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 2048, windows: int | None = None,
               offset: int = 0, batch_size: int = 1, bos_token_id: int | None = None,
               desc: str = "perplexity") -> PerplexityResult:
    """PPL of ``model`` over ``windows`` windows of ``window`` tokens of ``tokens[offset:]``
    (all that fit when None); with ``bos_token_id``, each window starts with that token."""
    chunks = _windows(tokens, window, windows, offset, bos_token_id)
    device = next(model.parameters()).device
    total, scored, bad = 0.0, 0, []
    for start in tqdm(range(0, chunks.shape[0], batch_size), desc=desc, unit="window"):
        batch = chunks[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="none").view(batch.shape[0], -1)
        for row, values in enumerate(nll):
            if torch.isfinite(values).all():
                total += values.double().sum().item()
                scored += values.numel()
            else:
                bad.append(start + row)
    mean = total / scored if scored else float("nan")
    return PerplexityResult(math.exp(mean) if scored else float("nan"), mean, scored,
                            chunks.shape[0], window, offset, bad,
                            "none" if bos_token_id is None else "each")


def evaluate(model: nn.Module | str | Path, data: Any, tokenizer: Any = None, window: int = 2048,
             windows: int | None = None, offset: int = 0, bos: str = "none",
             batch_size: int = 1) -> PerplexityResult:
    """Perplexity of a model (in memory, or a folder / id / ``"default"`` to load, compressed or
    not) on ``data``: a tensor of token ids or text (anything ``zsfw.compression.calibration`` reads)."""
    if bos not in BOS_POLICIES:
        raise EvaluationError(f"bos must be one of {BOS_POLICIES}, got {bos!r}")
    if isinstance(model, (str, Path)):
        from zsfw.models import load_model

        model, loaded_tokenizer = load_model(model)
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None and (bos == "each" or not isinstance(data, torch.Tensor)):
        from zsfw.models import own_tokenizer

        tokenizer = own_tokenizer(model, "perplexity of text")
    if not isinstance(data, torch.Tensor):
        from zsfw.compression.calibration import load_texts, tokenize

        data = tokenize(tokenizer, load_texts(data))
    bos_token_id = None
    if bos == "each":
        bos_token_id = tokenizer.bos_token_id
        if bos_token_id is None:
            raise EvaluationError("bos='each' needs a tokenizer with a BOS token; this one has none")
    return perplexity(model, data, window, windows, offset, batch_size, bos_token_id)
