"""What a compression gained and lost, in a few lines a person reads in five seconds.

``snapshot`` measures a model before and after: perplexity on held-out windows (never the
calibration windows) and one prompt's greedy continuation. ``summary`` puts two snapshots and the
report side by side: bytes before and after, perplexity before and after, both continuations and
where the output went.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsfw.eval.perplexity import perplexity

PROMPT = "The history of the city"


@dataclass
class Snapshot:
    perplexity: float
    continuation: str


def snapshot(model: nn.Module, tokenizer: Any, windows: torch.Tensor, prompt: str = PROMPT,
             new_tokens: int = 24) -> Snapshot:
    """Perplexity over ``windows`` (windows × tokens) and the greedy continuation of ``prompt``."""
    from zsfw.serve.generate import generate

    ppl = perplexity(model, windows.reshape(-1), window=windows.shape[1], windows=windows.shape[0],
                     desc="held-out perplexity").perplexity
    text = generate(model, tokenizer, prompt, max_new_tokens=new_tokens, compile=False)[0]
    return Snapshot(ppl, " ".join(text.split()))


def summary(report: Any, output: Path | None, before: Snapshot | None = None,
            after: Snapshot | None = None, windows: torch.Tensor | None = None,
            prompt: str = PROMPT) -> str:
    """The lines that end ``zsfw compress`` (perplexity and continuations when measured)."""
    mb = 1e6
    lines = [f"compressed {len(report.layers)} layers in {sum(report.timings.values()):.0f} s: "
             f"{report.reference_bytes / mb:.1f} MB at 16 bits -> {report.total_bytes / mb:.1f} MB "
             f"(kept {report.total_bytes / report.reference_bytes:.2f}, "
             f"{sum(l.dense for l in report.layers)} layers left dense)"]
    if before is not None and after is not None and windows is not None:
        change = after.perplexity / before.perplexity - 1
        lines += [f"perplexity on {windows.shape[0]} held-out windows of {windows.shape[1]} tokens: "
                  f"{_figure(before.perplexity)} -> {_figure(after.perplexity)}"
                  f"{f' ({change:+.0%})' if math.isfinite(change) else ''}",
                  f"{prompt!r} ->",
                  f"  before: {before.continuation!r}",
                  f"  after:  {after.continuation!r}"]
    lines += [f"warning: {w}" for w in report.warnings]
    if output is not None:
        files = sum(f["bytes"] for f in report.files.values())
        lines.append(f"saved to {output} ({files / mb:.1f} MB of weights; per-layer table in "
                     f"{output / 'report.txt'}; `zsfw inspect {output}` shows where the bytes went)")
    else:
        lines.append("not saved (no --output)")
    return "\n".join(lines)


def _figure(perplexity: float) -> str:
    """``perplexity`` to two decimals, or "not finite" for NaN and Inf (a model whose logits
    are): a summary never shows ``nan`` as a figure."""
    return f"{perplexity:.2f}" if math.isfinite(perplexity) else "not finite"
