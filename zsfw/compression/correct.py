"""Correct: a corrector moves the truncated weights (e.g. truncate–correct–re-truncate), then
the low-rank layers are built in the storage format.

During correction each low-rank layer is a dense weight equal to its rank-k product, which the
corrector reads, steps and re-truncates at the plan's rank in the whitened norm; gradients come
from the driver, one pass for all layers. Steps are judged on validation windows: held-out
windows of the calibration text, never the gradient windows' own loss and never evaluation
text. Whatever the corrector does, the result is never worse there than the one-shot
truncation: if the corrector's final state is, the one-shot factors come back.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from zsfw.allocation import AllocationPlan
from zsfw.compression.driver import Driver
from zsfw.compression.linalg import truncate as best_rank
from zsfw.compression.store import FactorStore
from zsfw.interfaces import Corrector, StorageFormat
from zsfw.modules import LowRankLinear

log = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Correction:
    """The truncated model as a corrector sees it (implements ``CorrectionProblem``)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
                 store: FactorStore, driver: Driver, validation: torch.Tensor, gradient_windows: int) -> None:
        self.model, self.targets, self.plan, self.store, self.driver = model, targets, plan, store, driver
        self.validation, self.gradient_windows = validation, gradient_windows
        self.layers = plan.lowrank()
        self.factors: Factors = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []  # the corrector's measured steps, for the report
        self.result: dict[str, Any] = {}  # validation loss one-shot vs final, set by ``correct``
        self._version = 0  # bumped by every install: the cached validation loss is of this state
        self._measured: tuple[int, float] | None = None

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Make ``B @ A`` layer ``name``'s weight; the factors are kept as given (cast to the
        weight's dtype), so pass tensors nothing will change afterwards."""
        weight = self.targets[name].weight
        self.originals.setdefault(name, weight.detach().clone())
        B, A = self.factors[name] = (B.to(weight.dtype), A.to(weight.dtype))
        with torch.no_grad():  # the product of the factors as kept: a restored state is the same
            torch.mm(B, A, out=weight)
        self._version += 1

    def original(self, name: str) -> torch.Tensor:
        return self.originals[name]

    def weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.detach()

    def gradients(self, share: tuple[int, int] = (0, 1)) -> tuple[float, dict[str, torch.Tensor]]:
        return self.driver.gradients({n: self.targets[n] for n in self.layers}, share)

    def factor_gradients(self, share: tuple[int, int] = (0, 1)
                         ) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The loss and (∂L/∂B, ∂L/∂A) of every layer's current factors, from one pass with the
        layers run as their factors (cheaper than the dense weights and their gradients)."""
        factored = {name: LowRankLinear.from_factors(*self.factors[name], self.targets[name].bias,
                                                     self.targets[name].weight.dtype) for name in self.layers}
        for name, module in factored.items():
            self.model.set_submodule(name, module)
        try:
            loss, grads = self.driver.gradients({f"{name}.{part}": getattr(module, part)
                                                 for name, module in factored.items() for part in "BA"}, share)
        finally:
            for name in factored:
                self.model.set_submodule(name, self.targets[name])
        return loss, {name: (grads.pop(f"{name}.B"), grads.pop(f"{name}.A")) for name in factored}

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        S = self.store.whitener(name, weight.device)
        self.install(name, *best_rank(weight, S, self.plan.rank(name)))

    def validation_loss(self) -> float:
        """Mean next-token loss of the current weights on the validation windows (measured once
        per state)."""
        if self._measured is None or self._measured[0] != self._version:
            self._measured = (self._version, self.driver.loss(self.validation))
        return self._measured[1]

    def snapshot(self) -> Factors:
        """The current factors of every layer (cheap: installs replace factors, never change them)."""
        return dict(self.factors)

    def restore(self, snapshot: Factors) -> None:
        """Install the factors of an earlier ``snapshot``."""
        for name, (B, A) in snapshot.items():
            self.install(name, B, A)

    def record(self, **entry: Any) -> None:
        """Note one measured step (cycle, scale, losses, accepted) for the report."""
        self.history.append(entry)


def correct(corrector: Corrector, problem: Correction, storage: StorageFormat) -> list[float]:
    """Run ``corrector``, keep its result only if it is no worse than the one-shot truncation on
    the validation windows, then build the low-rank modules; returns its calibration losses."""
    one_shot, before = problem.snapshot(), problem.validation_loss()
    losses = corrector.correct(problem)
    after = problem.validation_loss()
    if after > before:
        log.warning("correction raised the validation loss (%.4f -> %.4f): the one-shot factors are kept",
                    before, after)
        problem.restore(one_shot)
    problem.result = {"result": "kept" if after <= before else "reverted to one-shot", "one_shot": before,
                      "final": min(after, before)}
    for name, (B, A) in problem.factors.items():
        problem.model.set_submodule(name, storage.lowrank_module(B, A, problem.targets[name].bias))
    return losses
