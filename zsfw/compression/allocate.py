"""Allocate: the allocator spends the byte budget over the layers' scored spectra.

A plain allocator gets ``(layers, budget)``; one that declares ``needs_model = True`` gets an
``AllocationProblem`` that can also evaluate the soft-truncated model through the driver. Either
way the result becomes an ``AllocationPlan``, checked against the layers and the budget here, so
an invalid plan is an error naming the allocator before anything is truncated. A format chooser
(``storage: auto``) first picks each layer's storage format, which then prices it in the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Sequence

import torch
from torch import nn

from zsfw.budget import AllocationPlan, ByteBudget, has_base, variant_of
from zsfw.compression.driver import Driver
from zsfw.compression.factor_store import FactorStore
from zsfw.errors import AllocationError
from zsfw.protocols import LayerScores, StorageFormat


class StoredFactors:
    """The ``LayerFactors`` a format chooser reads: the factor store's B, A and S, the targets' biases."""

    def __init__(self, store: FactorStore, targets: dict[str, nn.Linear]) -> None:
        self.store, self.targets = store, targets

    def factors(self, name: str, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        B, A = self.store.factors(name, torch.device("cpu"), variant)
        return B.to(torch.float64), A.to(torch.float64)

    def spectrum(self, name: str, variant: str = "") -> LayerScores:
        return self.store.spectrum(name, variant)

    def whitener(self, name: str) -> torch.Tensor | None:
        S = self.store.whitener(name, torch.device("cpu"))
        return None if S is None else S.to(torch.float64)

    def bias(self, name: str) -> torch.Tensor | None:
        bias = self.targets[name].bias
        return None if bias is None else bias.detach().cpu()


class SoftTruncation:
    """The ``AllocationProblem`` of the in-pipeline model: layers, budget and soft gradients."""

    def __init__(self, layers: Sequence[LayerScores], budget: ByteBudget, store: FactorStore,
                 targets: dict[str, nn.Linear], driver: Driver, validation: torch.Tensor | None = None) -> None:
        self.layers, self.budget = list(layers), budget
        self.store, self.targets, self.driver, self.validation = store, targets, driver, validation
        self.gradient_windows = driver.gradient_windows

    def _factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """B_full = U Σ^½ and A_full = Σ^½ Vᵀ S⁻¹ (float64): every component of the layer (a
        model-aware allocator's store keeps them all)."""
        B, A = self.store.factors(name, device)
        return B.to(torch.float64), A.to(torch.float64)

    def soft_gradients(self, occupations: dict[str, torch.Tensor], share: tuple[int, int] = (0, 1)
                       ) -> tuple[float, dict[str, torch.Tensor]]:
        with self._soft(occupations):
            loss, grads = self.driver.gradients({n: self.targets[n] for n in occupations}, share)
        out = {}
        for name in occupations:  # ∂L/∂f_i = b_iᵀ G a_i, G = ∂L/∂W at the soft weight
            B, A = self._factors(name, grads[name].device)
            out[name] = ((B.mT @ grads.pop(name).to(torch.float64)) * A).sum(dim=1).cpu()
        return loss, out

    def validation_loss(self, occupations: dict[str, torch.Tensor]) -> float:
        if self.validation is None:
            raise RuntimeError("this allocation problem has no validation windows")  # a pipeline bug
        with self._soft(occupations):
            return self.driver.loss(self.validation)

    @contextmanager
    def _soft(self, occupations: dict[str, torch.Tensor]) -> Iterator[None]:
        """The layers of ``occupations`` at their soft weights B diag(f) A, restored after."""
        originals = {}
        try:
            for name, f in occupations.items():
                weight = self.targets[name].weight
                B, A = self._factors(name, weight.device)
                originals[name] = weight.detach().clone()
                with torch.no_grad():
                    weight.copy_((B * f.to(B)) @ A)
            yield
        finally:
            with torch.no_grad():
                for name, weight in originals.items():
                    self.targets[name].weight.copy_(weight)


def allocate(allocator: Any, name: str, ratio: float, storage: StorageFormat, store: FactorStore,
             targets: dict[str, nn.Linear], driver: Driver, validation: torch.Tensor | None = None
             ) -> AllocationPlan:
    """Run ``allocator`` (registered as ``name``) on the stored layers, in target order, under the
    budget of ``ratio`` priced by ``storage``; returns its plan, checked. A model-aware
    allocator judges its states on the ``validation`` windows; a format chooser ``storage`` picks
    each layer's format first."""
    formats = None
    if chooses_formats(storage):
        formats = storage.choose([store.layers[t] for t in targets], ratio, StoredFactors(store, targets))
    layers = [store.spectrum(t, variant_of((formats or {}).get(t, storage))) for t in targets]
    budget = ByteBudget(layers, ratio, storage, formats)
    try:
        if getattr(allocator, "needs_model", False):
            result = allocator.allocate(SoftTruncation(layers, budget, store, targets, driver, validation))
        else:
            result = allocator.allocate(layers, budget)
        if not isinstance(result, (AllocationPlan, Mapping)):
            raise AllocationError(f"returned {type(result).__name__}; expected an AllocationPlan "
                                  f"(or a mapping of layer name to rank or kept indices)")
        plan = result if isinstance(result, AllocationPlan) else AllocationPlan(layers, budget, result)
        plan.check_budget()
    except AllocationError as exc:
        raise AllocationError(f"allocator {name!r}: {exc}") from None
    return plan


def chooses_formats(storage: Any) -> bool:
    """Whether ``storage`` is a format chooser (``storage: auto``) rather than one format."""
    return callable(getattr(storage, "choose", None))


def based_formats(storage: Any) -> dict[str, StorageFormat]:
    """The formats with a quantized base ``storage`` may store a layer in, by base key: whose
    residuals the factorization must hold."""
    members = storage.members.values() if chooses_formats(storage) else [storage]
    return {member.base_key: member for member in members if has_base(member)}


def needs_plain(storage: Any) -> bool:
    """Whether a layer may be truncated from its own weight's factorization (any format but a
    single one with a base; a format chooser also reads the plain scores)."""
    return chooses_formats(storage) or not has_base(storage)
