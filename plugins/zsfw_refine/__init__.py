"""Refinement: light training of the truncated factors with the model's own next-token loss, or
by distillation from the uncompressed model."""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch

import zsfw
from zsfw import CorrectionProblem
from zsfw import (CORRECTION_LOSSES as LOSSES, CORRECTION_PRECISIONS as PRECISIONS,
                  CORRECTION_WINDOWS as WINDOWS, native_precision)
from zsfw import option_of
from zsfw.errors import one_of


SCHEDULES = {"constant": lambda progress: 1.0,
             "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress))}
"""The learning rate's factor at ``progress`` (0 at the start, 1 at the end) of training."""


def progress(done: int, steps: int, elapsed: float, seconds: float | None) -> float:
    """How far training is, from 0 to 1: ``done`` of ``steps`` steps, or ``elapsed`` of a time
    budget of ``seconds`` when that runs out first (so a schedule ends where training does)."""
    return min(1.0, max(done / steps, elapsed / seconds if seconds else 0.0))


class RefineCorrector:
    """Adam on the factors (B, A) of every low-rank layer, at the plan's ranks.

    Each step takes the loss and the factors' gradients over one of P disjoint shares of the
    gradient windows (``windows_per_step`` windows each; every share once an epoch, in an order
    drawn with ``seed``) from one pass of the driver with the layers run as their factors, and
    moves the factors. The validation loss is measured every ``validate_every`` steps
    and after the last one; with ``keep_best`` the best state measured, the one-shot truncation
    included, is the result. Training stops after ``steps`` steps or, with ``seconds``, after
    the first step that ends past that budget. ``schedule: cosine`` lowers the learning rate
    from ``lr`` to 0 over ``steps``, or over ``seconds`` when the time budget runs out first (a
    slower machine then takes fewer steps down the same curve instead of stopping at a high
    rate). Adam's moments take twice the factors' memory.

    ``loss: distill`` trains on KL(uncompressed ‖ compressed) of the next-token distributions at
    every position instead of the next-token loss: the teacher's whole prediction per token, not
    one target, which over-fits a few calibration windows far less. It keeps a copy of the
    uncompressed model (twice the model's memory) and runs it forward on every step's windows
    (about a third more time a step); in-memory driver only. Validation stays the next-token loss.

    ``windows: training`` trains on the training windows instead of the gradient windows:
    ``calibration.training_samples`` windows of the same text held out from the calibration and
    validation windows. With distillation they need no labels beyond the text, so many fresh
    windows (one per step) replace epochs over the few calibration windows that over-fit.

    ``precision: bf16`` runs each step's forward passes (the teacher's too) under bf16 autocast:
    the factors, Adam's state and the gradients stay fp32. On CPUs with AVX-512-BF16 or AMX, and
    on GPUs, a step takes about half the time, so twice the steps fit a time budget; CPUs without
    bf16 units have nothing to gain. ``precision: auto`` chooses bf16 where the device has bf16
    units and fp32 elsewhere (the report's steps say which). In-memory driver only. Validation
    stays fp32.

    ``norms: true`` trains the weights of the normalization layers too (RMSNorm/LayerNorm: a few
    thousand numbers per layer, which rescale what the factors see), and ``dense: true`` those of
    the targets the plan keeps dense (they cost the same bytes whatever their values; an fp32
    master copy and Adam's moments take 12 bytes a weight; float storage formats only), with the
    same optimizer and schedule; they are part of every kept state. In-memory driver only.
    """

    name: ClassVar[str] = "refine"

    def __init__(self, steps: int = 64, lr: float = 1e-4, windows_per_step: int = 1,
                 validate_every: int = 8, seconds: float | None = None, keep_best: bool = True,
                 seed: int = 0, schedule: str = "constant", loss: str = "next_token",
                 windows: str = "calibration", precision: str = "fp32", norms: bool = False,
                 dense: bool = False) -> None:
        for option, value in (("steps", steps), ("windows_per_step", windows_per_step),
                              ("validate_every", validate_every)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be > 0 (or null: no time budget), got {seconds}")
        self.steps, self.lr, self.windows_per_step = steps, lr, windows_per_step
        self.validate_every, self.seconds, self.keep_best, self.seed = validate_every, seconds, keep_best, seed
        self.schedule, self.loss = one_of("schedule", schedule, tuple(SCHEDULES)), one_of("loss", loss, LOSSES)
        self.windows = one_of("windows", windows, WINDOWS)
        self.precision = one_of("precision", precision, (*PRECISIONS, "auto"))
        self.norms, self.dense = norms, dense

    @classmethod
    def needs_for(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Training windows with ``windows: training``; the in-memory driver with another loss or
        precision, ``norms`` or ``dense`` (refused before any work otherwise)."""
        memory_only = [f"{name}: {str(options[name]).lower()}" for name in ("loss", "precision", "norms", "dense")
                       if name in options and options[name] != option_of(cls, {}, name)]
        return {"needs_training": option_of(cls, options, "windows") == "training",
                "needs_memory_driver": " and ".join(memory_only) or None}

    def correct(self, problem: CorrectionProblem) -> list[float]:
        count = problem.training_windows if self.windows == "training" else problem.gradient_windows
        shares = max(1, count // self.windows_per_step)
        params = {name: [t.detach().to(torch.float32, copy=True) for t in problem.factors[name]]
                  for name in problem.layers}
        extra = [*(problem.norms if self.norms else ()), *(problem.dense if self.dense else ())]
        weights = {name: problem.module_weight(name).to(torch.float32, copy=True) for name in extra}
        device = params[problem.layers[0]][0].device
        optimizer = torch.optim.Adam([*(p for pair in params.values() for p in pair), *weights.values()], lr=self.lr,
                                     fused=device.type in ("cpu", "cuda"))  # one kernel: ~3× faster than the loop
        precision = native_precision(device) if self.precision == "auto" else self.precision
        best = problem.keep_best()
        generator = torch.Generator().manual_seed(self.seed)
        order = [int(i) for _ in range(-(-self.steps // shares)) for i in torch.randperm(shares, generator=generator)]
        start, losses = time.perf_counter(), []
        for step in range(1, self.steps + 1):
            loss, grads = problem.factor_gradients((order[step - 1], shares), self.loss, self.windows, precision,
                                                   extra)
            losses.append(loss)
            for name, (B, A) in params.items():
                B.grad, A.grad = (g.to(torch.float32) for g in grads.pop(name))
            for name, weight in weights.items():
                weight.grad = grads.pop(name)[0].to(torch.float32)
            done = progress(step - 1, self.steps, time.perf_counter() - start, self.seconds)
            for group in optimizer.param_groups:
                group["lr"] = self.lr * SCHEDULES[self.schedule](done)
            optimizer.step()
            for name, (B, A) in params.items():
                problem.install(name, B.clone(), A.clone())
            for name, weight in weights.items():
                problem.set_weight(name, weight)
            out_of_time = self.seconds is not None and time.perf_counter() - start > self.seconds
            last = step == self.steps or out_of_time
            if step % self.validate_every == 0 or last:
                value, recent = problem.validation_loss(), losses[-self.validate_every:]
                trained = {("calibration_kl" if self.loss == "distill" else "calibration_loss"):
                           sum(recent) / len(recent)}  # what the steps minimised, named as such
                problem.record(cycle=step, **trained, validation_loss=value, accepted=best.offer(),
                               precision=precision)
            if last:
                break
        if self.keep_best:
            best.settle()
        return losses


@zsfw.hookimpl
def zsfw_register_correctors(register) -> None:
    register(RefineCorrector)
