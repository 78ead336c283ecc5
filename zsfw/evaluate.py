"""Perplexity in the protocol of the SVD-compression papers.

The text is tokenized into one stream (documents joined by EOS, no BOS added), cut into
non-overlapping windows of ``window`` tokens starting at token ``offset``, and PPL is
exp(mean next-token NLL) over all scored tokens. A window whose logits are not finite is
reported in the result and left out of the mean, never silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int  # scored tokens
    windows: int  # windows evaluated
    window: int
    offset: int
    non_finite_windows: list[int] = field(default_factory=list)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int = 2048, windows: int | None = None,
               offset: int = 0, batch_size: int = 1, desc: str = "perplexity") -> PerplexityResult:
    """PPL of ``model`` over ``windows`` windows of ``window`` tokens of ``tokens[offset:]``."""
    stream = tokens[offset:]
    available = stream.numel() // window
    count = available if windows is None else windows
    if count < 1 or count > available:
        raise ValueError(f"{stream.numel()} tokens after offset {offset} hold {available} windows "
                         f"of {window}; {count} requested")
    chunks = stream[: count * window].view(count, window)
    device = next(model.parameters()).device
    total, scored, bad = 0.0, 0, []
    for start in tqdm(range(0, count, batch_size), desc=desc, unit="window"):
        batch = chunks[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="none").view(batch.shape[0], -1)
        for row, values in enumerate(nll):
            if torch.isfinite(values).all():
                total += values.sum().item()
                scored += values.numel()
            else:
                bad.append(start + row)
    mean = total / scored if scored else float("nan")
    return PerplexityResult(math.exp(mean) if scored else float("nan"), mean, scored, count,
                            window, offset, bad)
