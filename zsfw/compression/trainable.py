"""Trainable: the truncated model's weights as a corrector moves them.

During correction each low-rank layer is a dense weight equal to its rank-k product (``install``),
which the corrector reads, steps and re-truncates at the plan's rank in the whitened norm
(``retruncate``). A corrector that trains may also move the weights of the normalization layers
and of the targets the plan keeps dense (``set_weight``). Weights are replaced, never changed in
place, so a ``snapshot`` holds references, not copies; the originals are kept for the teacher and
for re-plans.
"""

from __future__ import annotations

import torch
from torch import nn

from zsfw.budget import AllocationPlan
from zsfw.compression.factor_store import FactorStore
from zsfw.compression.linalg import truncate as best_rank
from zsfw.errors import RecipeError

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
Snapshot = tuple[AllocationPlan, FactorStore, Factors, dict[str, torch.Tensor]]


def normalizations(model: nn.Module) -> dict[str, nn.Module]:
    """The model's normalization layers with a weight (LayerNorm and the RMSNorm classes of
    transformers' models), by name: what ``factor_gradients(extra=…)`` may also differentiate."""
    return {name: module for name, module in model.named_modules()
            if (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"))
            and isinstance(getattr(module, "weight", None), nn.Parameter)}


def plain_float(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a plain floating-point tensor (not a quantized format's subclass):
    what a corrector can train and a snapshot keeps."""
    return type(weight) is torch.Tensor and weight.is_floating_point()


class TrainableState:
    """The plan, the factors of its low-rank layers and the trainable weights of ``model``."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
                 store: FactorStore) -> None:
        self.model, self.targets, self.plan, self.store = model, targets, plan, store
        self.layers = plan.lowrank()
        self.factors: Factors = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.norms = list(normalizations(model))
        self._version = 0  # bumped by every change of a weight: what a measurement was of

    @property
    def dense(self) -> list[str]:
        """The targets the plan keeps dense (in their storage format's dense module)."""
        return [name for name in self.targets if self.plan.is_dense(name)]

    def original(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight before truncation."""
        return self.originals[name]

    def weight(self, name: str) -> torch.Tensor:
        """Low-rank layer ``name``'s current (dense rank-k) weight."""
        return self.targets[name].weight.detach()

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Make ``B @ A`` layer ``name``'s weight; the factors are kept as given (cast to the
        weight's dtype), so pass tensors nothing will change afterwards."""
        weight = self.targets[name].weight
        self.originals.setdefault(name, weight.detach())
        B, A = self.factors[name] = (B.to(weight.dtype), A.to(weight.dtype))
        weight.data = B @ A  # the product of the factors as kept: a restored state is the same
        self._version += 1

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        """Install the best rank-k approximation of ``weight`` in the whitened norm (k: the plan's)."""
        S = self.store.whitener(name, weight.device)
        self.install(name, *best_rank(weight, S, self.plan.rank(name)))

    def module_weight(self, name: str) -> torch.Tensor:
        """The current weight of normalization layer or dense layer ``name``."""
        return self.trainable_module(name).weight.detach()

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Make a copy of ``weight`` (in its dtype) the weight of normalization layer or dense
        layer ``name``; ``originals`` keeps the first."""
        module = self.trainable_module(name)
        if name in self.norms or module is self.targets.get(name):  # else the target linear keeps it
            self.originals.setdefault(name, module.weight.detach())
        module.weight.data = weight.to(module.weight.dtype, copy=True)
        self._version += 1

    def trainable_module(self, name: str) -> nn.Module:
        """Normalization layer or dense layer ``name``, refused when its weight is not a plain
        floating-point tensor (a quantized storage format's)."""
        module = self.model.get_submodule(name)
        if name not in self.norms and not (name in self.targets and self.plan.is_dense(name)):
            raise RuntimeError(f"{name!r} is neither a normalization layer nor a dense layer")  # a corrector bug
        weight = module.weight.detach()
        if not plain_float(weight):
            raise RecipeError(f"layer {name!r} is stored as {type(weight).__name__} by storage "
                              f"{self.plan.format(name).name!r}, which cannot be trained; train only the "
                              f"factors (no dense: true) or use storage bf16 or fp32")
        return module

    def adopt(self, plan: AllocationPlan, store: FactorStore) -> None:
        """Make ``plan`` current: its dense layers get their original weights in their storage
        format's dense module, its low-rank layers their dense ``nn.Linear`` (factors to install)."""
        for name, linear in self.targets.items():
            if plan.is_dense(name):
                if name in self.originals:
                    linear.weight.data = self.originals[name]
                self.model.set_submodule(name, plan.format(name).dense_module(linear))
            else:
                self.model.set_submodule(name, linear)
        self.plan, self.store, self.layers, self.factors = plan, store, plan.lowrank(), {}
        self._version += 1

    def snapshot(self) -> Snapshot:
        """The current plan, the factors of every layer and the weights of the normalization
        layers and of the dense layers that can be trained (cheap: weights and factors are
        replaced, never changed)."""
        weights = {name: self.model.get_submodule(name).weight.detach() for name in (*self.norms, *self.dense)}
        return self.plan, self.store, dict(self.factors), {n: w for n, w in weights.items() if plain_float(w)}

    def restore(self, snapshot: Snapshot) -> None:
        """Go back to an earlier ``snapshot``: its plan (when a re-plan changed it), factors and
        the weights of the normalization and dense layers."""
        plan, store, factors, weights = snapshot
        if plan is not self.plan:
            self.adopt(plan, store)
        for name, (B, A) in factors.items():
            self.install(name, B, A)
        for name, weight in weights.items():
            if self.module_weight(name).data_ptr() != weight.data_ptr():  # replaced since: put it back
                self.set_weight(name, weight)

    def restore_originals(self, weights: dict[str, torch.Tensor]) -> None:
        """Make ``weights`` the dense weights of the plan's low-rank layers and give every other
        target its original weight, each in its ``nn.Linear`` (what a re-plan profiles)."""
        for name, linear in self.targets.items():
            self.model.set_submodule(name, linear)  # the statistics hooks are on these modules
            if name in weights:
                linear.weight.data = weights[name].to(linear.weight.dtype, copy=True)
            elif name in self.originals:
                linear.weight.data = self.originals[name]
