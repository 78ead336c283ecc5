"""Correct: a corrector moves the truncated weights (e.g. truncate–correct–re-truncate), then
the low-rank layers are built in the storage format.

During correction each low-rank layer is a dense weight equal to its rank-k product, which the
corrector reads, steps and re-truncates at the plan's rank in the whitened norm; gradients come
from the driver, one pass for all layers. Steps are judged on validation windows: held-out
windows of the calibration text, never the gradient windows' own loss and never evaluation
text. Whatever the corrector does, the result is never worse there than the one-shot
truncation: if the corrector's final state is, the one-shot factors come back.

A corrector that trains may also train the weights of the normalization layers and of the
targets the plan keeps dense (``extra`` in ``factor_gradients``, ``set_weight``); weights are
replaced, never changed in place, so a snapshot holds references, not copies.

A corrector may also re-plan (``replan``): re-profile and re-factorize the corrected model,
re-score, re-allocate every rank from scratch at the recipe's ratio and truncate, as the Zero-Sum
SVD authors do between cycles. The plan is then part of the state that snapshots keep, and a
layer the new plan keeps dense gets the original (teacher) weights back.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from zsfw.budget import AllocationPlan
from zsfw.compression.driver import Driver
from zsfw.compression.linalg import truncate as best_rank
from zsfw.compression.sequential import PairedMoments, paired_moments
from zsfw.compression.statistics import autocast, distillation_loss, next_token_loss
from zsfw.compression.factor_store import FactorStore
from zsfw.compression.truncate import kept_factors
from zsfw.errors import RecipeError, one_of
from zsfw.protocols import Corrector
from zsfw.modules import LowRankLinear

if TYPE_CHECKING:
    from zsfw.compression.plan import Planner

log = logging.getLogger(__name__)

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
LOSSES = ("next_token", "distill")
"""What ``factor_gradients`` can differentiate: the model's next-token loss, or KL from the
uncompressed model's next-token distributions."""
WINDOWS = ("calibration", "training")
"""What ``factor_gradients`` can share out: the gradient windows, or the training windows held
out from the calibration text (``calibration.training_samples``)."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""What ``factor_gradients`` can run the forward passes in: fp32, or autocast to bf16."""


def normalizations(model: nn.Module) -> dict[str, nn.Module]:
    """The model's normalization layers with a weight (LayerNorm and the RMSNorm classes of
    transformers' models), by name: what ``factor_gradients(norms=True)`` also differentiates."""
    return {name: module for name, module in model.named_modules()
            if (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm"))
            and isinstance(getattr(module, "weight", None), nn.Parameter)}


def native_precision(device: torch.device) -> str:
    """``bf16`` where ``device`` multiplies bf16 natively (a CUDA GPU that supports it, a CPU with
    AVX-512-BF16 or AMX), else ``fp32``: what ``precision: auto`` runs in."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        units = (getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                           "_is_amx_tile_supported"))
        return "bf16" if any(units) else "fp32"
    return "fp32"


def _plain_float(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a plain floating-point tensor (not a quantized format's subclass):
    what a corrector can train and a snapshot keeps."""
    return type(weight) is torch.Tensor and weight.is_floating_point()


class Correction:
    """The truncated model as a corrector sees it (implements ``CorrectionProblem``)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
                 store: FactorStore, driver: Driver, validation: torch.Tensor,
                 planner: Planner | None = None, training: torch.Tensor | None = None,
                 windows: torch.Tensor | None = None, batch_size: int = 1) -> None:
        self.model, self.targets, self.plan, self.store, self.driver = model, targets, plan, store, driver
        self.windows, self.batch_size = windows, batch_size  # the calibration windows, for paired_moments
        self.validation, self.gradient_windows = validation, driver.gradient_windows
        self.training = training
        self.training_windows = 0 if training is None else training.shape[0]
        self.planner = planner
        self.layers = plan.lowrank()
        self.factors: Factors = {}
        self.originals: dict[str, torch.Tensor] = {}
        self.stores: list[FactorStore] = []  # those re-plans made, closed by ``close``
        self.history: list[dict[str, Any]] = []  # the corrector's measured steps, for the report
        self.result: dict[str, Any] = {}  # validation loss one-shot vs final, set by ``correct``
        self._version = 0  # bumped by every install: the cached validation loss is of this state
        self._measured: tuple[int, float] | None = None
        self._teachers: dict[torch.dtype | None, nn.Module] = {}
        self.norms = list(normalizations(model))

    @property
    def dense(self) -> list[str]:
        """The targets the plan keeps dense (in their storage format's dense module)."""
        return [name for name in self.targets if self.plan.is_dense(name)]

    def module_weight(self, name: str) -> torch.Tensor:
        """The current weight of normalization layer or dense layer ``name``."""
        return self._trainable(name).weight.detach()

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Make a copy of ``weight`` (in its dtype) the weight of normalization layer or dense
        layer ``name``; the teacher and ``_adopt`` keep its original."""
        module = self._trainable(name)
        if name in self.norms or module is self.targets.get(name):  # else the target linear keeps it
            self.originals.setdefault(name, module.weight.detach())
        module.weight.data = weight.to(module.weight.dtype, copy=True)
        self._version += 1

    def _trainable(self, name: str) -> nn.Module:
        """Normalization layer or dense layer ``name``, refused when its weight is not a plain
        floating-point tensor (a quantized storage format's)."""
        module = self.model.get_submodule(name)
        if name not in self.norms and not (name in self.targets and self.plan.is_dense(name)):
            raise RuntimeError(f"{name!r} is neither a normalization layer nor a dense layer")  # a corrector bug
        weight = module.weight.detach()
        if not _plain_float(weight):
            raise RecipeError(f"layer {name!r} is stored as {type(weight).__name__} by storage "
                              f"{self.plan.format(name).name!r}, which cannot be trained; train only the "
                              f"factors (no dense: true) or use storage bf16 or fp32")
        return module

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Make ``B @ A`` layer ``name``'s weight; the factors are kept as given (cast to the
        weight's dtype), so pass tensors nothing will change afterwards."""
        weight = self.targets[name].weight
        self.originals.setdefault(name, weight.detach())
        B, A = self.factors[name] = (B.to(weight.dtype), A.to(weight.dtype))
        weight.data = B @ A  # the product of the factors as kept: a restored state is the same
        self._version += 1

    def original(self, name: str) -> torch.Tensor:
        return self.originals[name]

    def weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.detach()

    def gradients(self, share: tuple[int, int] = (0, 1)) -> tuple[float, dict[str, torch.Tensor]]:
        return self.driver.gradients({n: self.targets[n] for n in self.layers}, share)

    def factor_gradients(self, share: tuple[int, int] = (0, 1), loss: str = "next_token",
                         windows: str = "calibration", precision: str = "fp32", extra: Sequence[str] = ()
                         ) -> tuple[float, dict[str, tuple[torch.Tensor, ...]]]:
        """The loss and (∂L/∂B, ∂L/∂A) of every layer's current factors, from one pass with the
        layers run as their factors (cheaper than the dense weights and their gradients); also
        (∂L/∂weight,) of each normalization layer or dense layer named in ``extra``.
        ``loss``: ``next_token`` (the model's own) or ``distill`` (KL from the uncompressed
        model's predictions, see ``teacher``); ``windows``: a share of the gradient windows
        (``calibration``) or of the training windows (``training``); ``precision``: ``fp32``,
        or ``bf16`` (the forward passes autocast to bf16; the gradients stay fp32)."""
        other = self._windows(windows)
        dtype = PRECISIONS[one_of("precision", precision, tuple(PRECISIONS))]
        objective = distillation_loss(self.teacher(dtype)) if one_of("loss", loss, LOSSES) == "distill" else None
        if dtype is not None:
            objective = autocast(objective or next_token_loss, dtype)
        extras = {name: self._trainable(name) for name in extra}
        factored = {name: LowRankLinear.from_factors(*self.factors[name], self.targets[name].bias,
                                                     dtype or self.targets[name].weight.dtype) for name in self.layers}
        for name, module in factored.items():
            self.model.set_submodule(name, module)
        try:
            value, grads = self.driver.gradients({**{f"{name}.{part}": getattr(module, part)
                                                     for name, module in factored.items() for part in "BA"},
                                                  **extras},
                                                 share, objective, other)
        finally:
            for name in factored:
                self.model.set_submodule(name, self.targets[name])
        return value, {**{name: (grads.pop(f"{name}.B"), grads.pop(f"{name}.A")) for name in factored},
                       **{name: (grads.pop(name),) for name in extras}}

    def _windows(self, windows: str) -> torch.Tensor | None:
        """The windows ``factor_gradients`` shares out: None for the gradient windows."""
        if one_of("windows", windows, WINDOWS) == "training" and self.training is None:
            raise RuntimeError("this correction was built without training windows")  # a pipeline bug
        return self.training if windows == "training" else None

    def teacher(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The uncompressed model, for distillation: a copy (built once, dropped by ``close``)
        with every target's and every normalization layer's original weight; it doubles the
        model's memory. With ``dtype`` its
        linear layers' weights are stored in ``dtype`` (for autocast to that dtype: cast once, not
        at every forward; half the copy's memory in bf16); embeddings and norms keep theirs."""
        if dtype not in self._teachers:
            teacher = copy.deepcopy(self.model)
            for name, linear in self.targets.items():
                original = copy.deepcopy(linear)
                if name in self.originals:
                    with torch.no_grad():
                        original.weight.copy_(self.originals[name])
                teacher.set_submodule(name, original)
            with torch.no_grad():
                for name in self.norms:
                    if name in self.originals:
                        teacher.get_submodule(name).weight.copy_(self.originals[name])
            if dtype is not None:
                for module in teacher.modules():
                    if isinstance(module, nn.Linear) and type(module.weight.data) is torch.Tensor:  # a tied head is untied
                        module.weight = nn.Parameter(module.weight.detach().to(dtype))
                        if module.bias is not None:
                            module.bias = nn.Parameter(module.bias.detach().to(dtype))
            self._teachers[dtype] = teacher.eval().requires_grad_(False)
        return self._teachers[dtype]

    def paired_moments(self) -> Iterator[PairedMoments]:
        """For each group of the plan's low-rank layers that read one input, decoder layer by
        decoder layer: E[x x̂ᵀ] and E[x̂ x̂ᵀ] of the uncompressed model's inputs x and this model's
        x̂ over the calibration windows (forward only), each group's computed with what was
        installed before it was asked for (``zsfw.compression.sequential``; in-memory driver only:
        it runs the uncompressed copy ``teacher`` beside the model)."""
        if self.windows is None:
            raise RuntimeError("this correction was built without its calibration windows")  # a pipeline bug
        return paired_moments(self.model, self.teacher(), list(self.layers), self.windows, self.batch_size)

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        S = self.store.whitener(name, weight.device)
        self.install(name, *best_rank(weight, S, self.plan.rank(name)))

    def validation_loss(self) -> float:
        """Mean next-token loss of the current weights on the validation windows (measured once
        per state)."""
        if self._measured is None or self._measured[0] != self._version:
            self._measured = (self._version, self.driver.loss(self.validation))
        return self._measured[1]

    def replan(self, weights: dict[str, torch.Tensor]) -> None:
        """Make ``weights`` the dense weights of the plan's low-rank layers (every other target
        keeps its original weights), then re-profile, re-factorize, re-score, re-allocate at the
        recipe's ratio and install the new plan's truncation."""
        if self.planner is None:
            raise RuntimeError("this correction was built without a planner")  # a pipeline bug
        for name, linear in self.targets.items():
            self.model.set_submodule(name, linear)  # the statistics hooks are on these modules
            if name in weights:
                linear.weight.data = weights[name].to(linear.weight.dtype, copy=True)
            elif name in self.originals:
                linear.weight.data = self.originals[name]
        store, plan = self.planner.replan()
        self.stores.append(store)
        self._adopt(plan, store)
        for name in self.layers:
            self.install(name, *kept_factors(store, name, plan[name], self.targets[name].weight.device))

    def _adopt(self, plan: AllocationPlan, store: FactorStore) -> None:
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

    def snapshot(self) -> tuple[AllocationPlan, FactorStore, Factors, dict[str, torch.Tensor]]:
        """The current plan, the factors of every layer and the weights of the normalization
        layers and of the dense layers that can be trained (cheap: weights and factors are
        replaced, never changed)."""
        weights = {name: self.model.get_submodule(name).weight.detach() for name in (*self.norms, *self.dense)}
        return self.plan, self.store, dict(self.factors), {n: w for n, w in weights.items() if _plain_float(w)}

    def restore(self, snapshot: tuple[AllocationPlan, FactorStore, Factors, dict[str, torch.Tensor]]) -> None:
        """Go back to an earlier ``snapshot``: its plan (when a re-plan changed it), factors and
        the weights of the normalization and dense layers."""
        plan, store, factors, weights = snapshot
        if plan is not self.plan:
            self._adopt(plan, store)
        for name, (B, A) in factors.items():
            self.install(name, B, A)
        for name, weight in weights.items():
            if self.module_weight(name).data_ptr() != weight.data_ptr():  # replaced since: put it back
                self.set_weight(name, weight)

    def close(self) -> None:
        """Remove the factor stores re-plans made and the teacher."""
        self._teachers.clear()
        for store in self.stores:
            store.close()

    def record(self, **entry: Any) -> None:
        """Note one measured step (cycle, scale, losses, accepted) for the report."""
        self.history.append(entry)


def correct(corrector: Corrector, problem: Correction) -> list[float]:
    """Run ``corrector``, keep its result only if it is no worse than the one-shot truncation on
    the validation windows, then build the low-rank modules (each in the plan's format for it);
    returns its calibration losses. A plan without low-rank layers has nothing to correct."""
    if not problem.layers:
        log.info("every layer is dense: nothing for the corrector to do")
        problem.close()
        return []
    one_shot, before = problem.snapshot(), problem.validation_loss()
    try:
        losses = corrector.correct(problem)
        after = problem.validation_loss()
        kept = after <= before  # not a NaN
        if not kept:
            log.warning("correction raised the validation loss (%.4f -> %.4f): the one-shot factors are kept",
                        before, after)
            problem.restore(one_shot)
        problem.result = {"result": "kept" if kept else "reverted to one-shot", "one_shot": before,
                          "final": after if kept else before}
        for name, (B, A) in problem.factors.items():
            problem.model.set_submodule(name, problem.plan.format(name).lowrank_module(
                B, A, problem.targets[name].bias))
    finally:
        problem.close()
    return losses
