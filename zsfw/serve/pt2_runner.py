"""Run a ``.pt2`` package exported by ``zsfw export``, checking every input first.

Standalone on purpose: it needs only ``torch`` (``zsfw export`` copies this file next to the
package as ``<name>_runner.py``), so a serving machine without zsfw or transformers can use it::

    import model_runner
    run = model_runner.load("model.pt2")
    logits = run(torch.tensor([[1, 2, 3]]))

A compiled package trusts its inputs: a float tensor or an id past the vocabulary aborts the
whole process, and shapes outside its compiled range are not always caught. This loader checks
dtype, rank, batch and sequence against the manifest (``model.json``) and the id range against
the vocabulary, raising ``ValueError`` with what was wrong and what is allowed. A batch below the
package's compiled minimum is padded with copies of its first row and cut back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


class Runner:
    """A loaded package and its manifest; call it with an int64 (batch × seq) tensor of ids."""

    def __init__(self, package: str | Path) -> None:
        package = Path(package)
        self.manifest = json.loads(package.with_suffix(".json").read_text())
        spec = self.manifest["inputs"]["input_ids"]
        self.batch, self.seq = spec["batch"], spec["seq"]
        self.compiled_batch = spec["compiled_batch"]
        self.vocab = self.manifest["outputs"]["logits"]["shape"][-1]
        self._run = torch._inductor.aoti_load_package(str(package))

    def check(self, input_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``input_ids`` is something the package can run."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64:
            got = input_ids.dtype if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an int64 tensor, got {got}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (batch × seq), got shape {tuple(input_ids.shape)}")
        (batch, seq), (b_lo, b_hi), (s_lo, s_hi) = input_ids.shape, self.batch, self.seq
        if not b_lo <= batch <= b_hi:
            raise ValueError(f"batch {batch} is outside the package's range {b_lo}..{b_hi}")
        if not s_lo <= seq <= s_hi:
            raise ValueError(f"sequence length {seq} is outside the package's range {s_lo}..{s_hi}")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab:
            raise ValueError(f"token ids must be in 0..{self.vocab - 1}, got {low}..{high}")

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.check(input_ids)
        batch = input_ids.shape[0]
        short = self.compiled_batch[0] - batch
        if short > 0:
            input_ids = torch.cat([input_ids, input_ids[:1].expand(short, -1)])
        return self._run(input_ids)[:batch]


def load(package: str | Path) -> Runner:
    """The package at ``package`` (``model.pt2``, with ``model.json`` beside it), checked on call."""
    return Runner(package)
