"""Correct: a corrector moves the truncated weights (e.g. truncate–correct–re-truncate), then
the low-rank layers are built in the storage format.

During correction each low-rank layer is a dense weight equal to its rank-k product, which the
corrector reads, steps and re-truncates at the plan's rank in the whitened norm; gradients come
from the driver, one pass for all layers.
"""

from __future__ import annotations

import torch
from torch import nn

from zsfw.allocation import AllocationPlan
from zsfw.compression.driver import Driver
from zsfw.compression.linalg import truncate as best_rank
from zsfw.compression.store import FactorStore
from zsfw.interfaces import Corrector, StorageFormat


class Correction:
    """The truncated model as a corrector sees it (implements ``CorrectionProblem``)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
                 store: FactorStore, driver: Driver) -> None:
        self.model, self.targets, self.plan, self.store, self.driver = model, targets, plan, store, driver
        self.layers = plan.lowrank()
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        weight = self.targets[name].weight
        self.originals.setdefault(name, weight.detach().clone())
        self.factors[name] = (B.to(weight.dtype), A.to(weight.dtype))
        with torch.no_grad():
            weight.copy_(B @ A)

    def original(self, name: str) -> torch.Tensor:
        return self.originals[name]

    def weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.detach()

    def gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        return self.driver.gradients({n: self.targets[n] for n in self.layers})

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        S = self.store.whitener(name, weight.device)
        self.install(name, *best_rank(weight, S, self.plan.rank(name)))


def correct(corrector: Corrector, problem: Correction, storage: StorageFormat) -> list[float]:
    """Run ``corrector``, then build the corrected low-rank modules; returns its losses."""
    losses = corrector.correct(problem)
    for name, (B, A) in problem.factors.items():
        problem.model.set_submodule(name, storage.lowrank_module(B, A, problem.targets[name].bias))
    return losses
