"""Feedback: what a corrector measures on the truncated model — gradients of the calibration loss
(through the driver, one pass for all layers), the validation loss, and the uncompressed teacher.

Steps are judged on validation windows: held-out windows of the calibration text, never the
gradient windows' own loss and never evaluation text.
"""

from __future__ import annotations

import copy
from typing import Iterator, Sequence

import torch
from torch import nn

from zsfw.compression.driver import Driver
from zsfw.compression.sequential import PairedMoments, paired_moments
from zsfw.compression.statistics import autocast, distillation_loss, next_token_loss
from zsfw.compression.trainable import TrainableState
from zsfw.errors import one_of
from zsfw.modules import LowRankLinear

LOSSES = ("next_token", "distill")
"""What ``factor_gradients`` can differentiate: the model's next-token loss, or KL from the
uncompressed model's next-token distributions."""
WINDOWS = ("calibration", "training")
"""What ``factor_gradients`` can share out: the gradient windows, or the training windows held
out from the calibration text (``calibration.training_samples``)."""
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
"""What ``factor_gradients`` can run the forward passes in: fp32, or autocast to bf16."""


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


class Feedback:
    """Measurements of a ``TrainableState`` through ``driver``: on its gradient windows, on the
    ``training`` windows, on the ``validation`` windows; ``windows`` (the calibration windows)
    for the paired moments of sequential compensation."""

    def __init__(self, driver: Driver, validation: torch.Tensor, training: torch.Tensor | None = None,
                 windows: torch.Tensor | None = None, batch_size: int = 1) -> None:
        self.driver, self.validation, self.training = driver, validation, training
        self.windows, self.batch_size = windows, batch_size
        self.gradient_windows = driver.gradient_windows
        self.training_windows = 0 if training is None else training.shape[0]
        self._measured: tuple[int, float] | None = None
        self._teachers: dict[torch.dtype | None, nn.Module] = {}

    def validation_loss(self, version: int) -> float:
        """Mean next-token loss on the validation windows, measured once per ``version`` of the state."""
        if self._measured is None or self._measured[0] != version:
            self._measured = (version, self.driver.loss(self.validation))
        return self._measured[1]

    def gradients(self, state: TrainableState, share: tuple[int, int]) -> tuple[float, dict[str, torch.Tensor]]:
        """The calibration loss and ∂L/∂W of every low-rank layer of ``state``, one pass."""
        return self.driver.gradients({n: state.targets[n] for n in state.layers}, share)

    def factor_gradients(self, state: TrainableState, share: tuple[int, int], loss: str, windows: str,
                         precision: str, extra: Sequence[str]) -> tuple[float, dict[str, tuple[torch.Tensor, ...]]]:
        """The loss and (∂L/∂B, ∂L/∂A) of every layer's current factors, from one pass with the
        layers run as their factors (cheaper than the dense weights and their gradients); also
        (∂L/∂weight,) of each normalization layer or dense layer named in ``extra``.
        ``loss``: ``next_token`` (the model's own) or ``distill`` (KL from the uncompressed
        model's predictions, see ``teacher``); ``windows``: a share of the gradient windows
        (``calibration``) or of the training windows (``training``); ``precision``: ``fp32``,
        or ``bf16`` (the forward passes autocast to bf16; the gradients stay fp32)."""
        other = self._windows(windows)
        dtype = PRECISIONS[one_of("precision", precision, tuple(PRECISIONS))]
        objective = distillation_loss(self.teacher(state, dtype)) if one_of("loss", loss, LOSSES) == "distill" else None
        if dtype is not None:
            objective = autocast(objective or next_token_loss, dtype)
        extras = {name: state.trainable_module(name) for name in extra}
        factored = {name: LowRankLinear.from_factors(*state.factors[name], state.targets[name].bias,
                                                     dtype or state.targets[name].weight.dtype) for name in state.layers}
        for name, module in factored.items():
            state.model.set_submodule(name, module)
        try:
            value, grads = self.driver.gradients({**{f"{name}.{part}": getattr(module, part)
                                                     for name, module in factored.items() for part in "BA"},
                                                  **extras},
                                                 share, objective, other)
        finally:
            for name in factored:
                state.model.set_submodule(name, state.targets[name])
        return value, {**{name: (grads.pop(f"{name}.B"), grads.pop(f"{name}.A")) for name in factored},
                       **{name: (grads.pop(name),) for name in extras}}

    def _windows(self, windows: str) -> torch.Tensor | None:
        """The windows ``factor_gradients`` shares out: None for the gradient windows."""
        if one_of("windows", windows, WINDOWS) == "training" and self.training is None:
            raise RuntimeError("this correction was built without training windows")  # a pipeline bug
        return self.training if windows == "training" else None

    def teacher(self, state: TrainableState, dtype: torch.dtype | None = None) -> nn.Module:
        """The uncompressed model, for distillation: a copy of ``state``'s model (built once,
        dropped by ``close``) with every target's and every normalization layer's original
        weight; it doubles the model's memory. With ``dtype`` its linear layers' weights are
        stored in ``dtype`` (for autocast to that dtype: cast once, not at every forward; half
        the copy's memory in bf16); embeddings and norms keep theirs."""
        if dtype not in self._teachers:
            teacher = copy.deepcopy(state.model)
            for name, linear in state.targets.items():
                original = copy.deepcopy(linear)
                if name in state.originals:
                    with torch.no_grad():
                        original.weight.copy_(state.originals[name])
                teacher.set_submodule(name, original)
            with torch.no_grad():
                for name in state.norms:
                    if name in state.originals:
                        teacher.get_submodule(name).weight.copy_(state.originals[name])
            if dtype is not None:
                for module in teacher.modules():
                    if isinstance(module, nn.Linear) and type(module.weight.data) is torch.Tensor:  # a tied head is untied
                        module.weight = nn.Parameter(module.weight.detach().to(dtype))
                        if module.bias is not None:
                            module.bias = nn.Parameter(module.bias.detach().to(dtype))
            self._teachers[dtype] = teacher.eval().requires_grad_(False)
        return self._teachers[dtype]

    def paired_moments(self, state: TrainableState) -> Iterator[PairedMoments]:
        """For each group of ``state``'s low-rank layers that read one input, decoder layer by
        decoder layer: E[x x̂ᵀ] and E[x̂ x̂ᵀ] of the uncompressed model's inputs x and the
        truncated model's x̂ over the calibration windows (forward only), each group's computed
        with what was installed before it was asked for (``zsfw.compression.sequential``;
        in-memory driver only: it runs the uncompressed copy ``teacher`` beside the model)."""
        if self.windows is None:
            raise RuntimeError("this correction was built without its calibration windows")  # a pipeline bug
        return paired_moments(state.model, self.teacher(state), list(state.layers), self.windows, self.batch_size)

    def close(self) -> None:
        """Drop the teachers."""
        self._teachers.clear()
