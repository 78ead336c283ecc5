"""Correct: a corrector moves the truncated weights (e.g. truncate–correct–re-truncate), then
the low-rank layers are built in the storage format.

A corrector sees a ``Correction`` (the ``CorrectionProblem`` of ``zsfw.protocols``): the state
it may move (``zsfw.compression.trainable``: factors, norms, dense layers, snapshots), what it
can measure (``zsfw.compression.feedback``: gradients, validation loss), a keep-best tracker,
and re-planning. Whatever the corrector does, the result is never worse on the validation
windows than the one-shot truncation: if the corrector's final state is, the one-shot factors
come back.

A corrector may re-plan (``replan``): re-profile and re-factorize the corrected model, re-score,
re-allocate every rank from scratch at the recipe's ratio and truncate, as the Zero-Sum SVD
authors do between cycles. The plan is then part of the state that snapshots keep, and a layer
the new plan keeps dense gets the original (teacher) weights back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from zsfw.budget import AllocationPlan
from zsfw.compression.factor_store import FactorStore
from zsfw.compression.feedback import Feedback
from zsfw.compression.sequential import PairedMoments
from zsfw.compression.trainable import TrainableState
from zsfw.compression.truncate import kept_factors
from zsfw.protocols import Corrector

if TYPE_CHECKING:
    from zsfw.compression.plan import Planner

log = logging.getLogger(__name__)


class KeepBest:
    """The best state of a correction on the validation windows, from the state it starts in:
    ``offer`` after each step, ``settle`` at the end."""

    def __init__(self, problem: Correction) -> None:
        self.problem = problem
        self.loss, self.state = problem.validation_loss(), problem.snapshot()

    def offer(self) -> bool:
        """Keep the current state if its validation loss is lower than the best so far; whether it was."""
        value = self.problem.validation_loss()
        if value < self.loss:
            self.loss, self.state = value, self.problem.snapshot()
            return True
        return False

    def settle(self) -> bool:
        """Go back to the best state unless the current one is as good (a NaN loss is not);
        whether the current state was kept."""
        kept = self.problem.validation_loss() <= self.loss
        if not kept:
            self.problem.restore(self.state)
        return kept


class Correction(TrainableState):
    """The truncated model as a corrector sees it (implements ``CorrectionProblem``): the state,
    measured through ``feedback``, re-planned through ``planner``."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
                 store: FactorStore, feedback: Feedback, planner: Planner | None = None) -> None:
        super().__init__(model, targets, plan, store)
        self.feedback, self.planner = feedback, planner
        self.gradient_windows, self.training_windows = feedback.gradient_windows, feedback.training_windows
        self.stores: list[FactorStore] = []  # those re-plans made, closed by ``close``
        self.history: list[dict[str, Any]] = []  # the corrector's measured steps, for the report
        self.result: dict[str, Any] = {}  # validation loss one-shot vs final, set by ``correct``

    def gradients(self, share: tuple[int, int] = (0, 1)) -> tuple[float, dict[str, torch.Tensor]]:
        return self.feedback.gradients(self, share)

    def factor_gradients(self, share: tuple[int, int] = (0, 1), loss: str = "next_token",
                         windows: str = "calibration", precision: str = "fp32", extra: Sequence[str] = ()
                         ) -> tuple[float, dict[str, tuple[torch.Tensor, ...]]]:
        return self.feedback.factor_gradients(self, share, loss, windows, precision, extra)

    def teacher(self, dtype: torch.dtype | None = None) -> nn.Module:
        return self.feedback.teacher(self, dtype)

    def paired_moments(self) -> Iterator[PairedMoments]:
        return self.feedback.paired_moments(self)

    def validation_loss(self) -> float:
        return self.feedback.validation_loss(self._version)

    def keep_best(self) -> KeepBest:
        return KeepBest(self)

    def replan(self, weights: dict[str, torch.Tensor]) -> None:
        if self.planner is None:
            raise RuntimeError("this correction was built without a planner")  # a pipeline bug
        self.restore_originals(weights)
        store, plan = self.planner.replan()
        self.stores.append(store)
        self.adopt(plan, store)
        for name in self.layers:
            self.install(name, *kept_factors(store, name, plan[name], self.targets[name].weight.device))

    def record(self, **entry: Any) -> None:
        self.history.append(entry)

    def close(self) -> None:
        """Drop the teachers and remove the factor stores re-plans made."""
        self.feedback.close()
        for store in self.stores:
            store.close()


def correct(corrector: Corrector, problem: Correction) -> list[float]:
    """Run ``corrector``, keep its result only if it is no worse than the one-shot truncation on
    the validation windows, then build the low-rank modules (each in the plan's format for it);
    returns its calibration losses. A plan without low-rank layers has nothing to correct."""
    if not problem.layers:
        log.info("every layer is dense: nothing for the corrector to do")
        problem.close()
        return []
    one_shot = problem.keep_best()
    try:
        losses = corrector.correct(problem)
        before, after = one_shot.loss, problem.validation_loss()
        kept = one_shot.settle()
        if not kept:
            log.warning("correction raised the validation loss (%.4f -> %.4f): the one-shot factors are kept",
                        before, after)
        problem.result = {"result": "kept" if kept else "reverted to one-shot", "one_shot": before,
                          "final": after if kept else before}
        for name, (B, A) in problem.factors.items():
            problem.model.set_submodule(name, problem.plan.format(name).lowrank_module(
                B, A, problem.targets[name].bias))
    finally:
        problem.close()
    return losses
