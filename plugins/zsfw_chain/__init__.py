"""Correctors in turn: e.g. sequential compensation, then refinement, on the same truncated model.

    corrector: {name: chain, correctors: [{name: compensate}, {name: refine, steps: 24}]}

Each corrector starts from the state the one before it left (each keeps its own best state);
the pipeline keeps the end result only if it is no worse than the one-shot truncation on the
validation windows, as for any corrector.
"""

from __future__ import annotations

from typing import Any, ClassVar

import zsfw
from zsfw import CorrectionProblem


class ChainCorrector:
    """The correctors of ``correctors`` (each a name or ``{name, options…}``), in order."""

    name: ClassVar[str] = "chain"
    members_option: ClassVar[str] = "correctors"  # it needs what any of them needs (``zsfw.capabilities``)

    def __init__(self, correctors: list[Any]) -> None:
        if not correctors:
            raise ValueError("correctors must list at least one corrector, e.g. [{name: compensate}, {name: refine}]")
        self.correctors = [zsfw.create_component("corrector", spec) for spec in correctors]

    def correct(self, problem: CorrectionProblem) -> list[float]:
        losses: list[float] = []
        for corrector in self.correctors:
            losses += corrector.correct(problem)
        return losses


@zsfw.hookimpl
def zsfw_register_correctors(register) -> None:
    register(ChainCorrector)
