"""Low-Rank Prehab (Qin et al., arXiv 2512.01980): a few training steps that make the targets
easier to truncate, before the statistics pass.

Reconstructed from the authors' BERT/ViT code and the abstract (their LLaMA path is a stub; this
is not their code for causal LMs). Each target's weight is reparametrised in its whitened
coordinates, W = (W S + Δ) S⁻¹ with S Sᵀ = C (C from the calibration windows), and only the Δ are
trained, with Adam, on

    next-token loss on the training windows + λ_t · mean over targets of rank(W S + Δ)

where ``rank`` is a surrogate: the stable rank ‖M‖_F² / ‖M‖_2² (‖M‖_2 by power iteration,
warm-started across steps), or with ``surrogate: tail`` the share of M's energy beyond the rank k
the target keeps, 1 − ‖U_kᵀM‖²/‖M‖² (what truncation pays; the stable rank can also fall by raising
σ₁), with U_k M's top-k left singular vectors tracked by one step of subspace iteration per training
step from an exact SVD at the start (its gradient is the exact tail's wherever U_k is exact). λ_t
rises from ``lambda_init`` to ``lambda_max`` over the first ``warmup`` steps. The rank k each target
keeps is, with ``ranks: uniform`` (the default), the one rank at ``ratio`` of its bytes as bf16
factors; with ``ranks: plan``, the rank the recipe's own allocator gives it (zero_sum's plan, say,
of the model before prehab, at the recipe's ratio and storage), so prehab trains toward the
truncation that compression will make rather than a uniform one; targets the plan keeps dense are
left out of the rank term. With ``shrink`` s > 0 (tail surrogate) the rank term also takes a
proximal step after every Adam step: M's tail beyond rank k is scaled by 1 − s_t (s_t warming up
like λ), the proximal operator of a penalty on the tail energy. Adam moves every entry of Δ by about
its learning rate whatever the penalty's size, so λ alone turns the step more than it lengthens it;
the proximal step removes a set share of the tail per step. The training windows are held out from
the calibration and validation windows. Every ``validate_every`` steps the state is judged by what
it is for: the validation loss of the model with every target truncated to that rank k in whitened
coordinates; the best state, Δ = 0 included, is kept, so prehab never makes that truncation worse on
the validation windows. At the end Δ is folded into the weights (in float64); the pipeline's
statistics pass then runs on the prehabbed model (the published code reuses the stale whitening: not
here). With ``ranks: plan`` the whitening S is the one the plan was made with (the recipe's damping),
handed over by the pipeline, so prehab runs no calibration pass of its own; with ``ranks: uniform``,
or an explicit ``damping``, it computes S from the calibration windows.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import zsfw
from zsfw import AllocationPlan, next_token_loss, whitening_factor
from zsfw import collect_statistics as collect
from zsfw import option_of

SURROGATES = ("stable_rank", "tail")
RANKS = ("uniform", "plan")
DAMPING = 1e-4  # its own whitening's, relative to the mean diagonal of C (the recipe's default)


class _Whitened(nn.Module):
    """The parametrization W ↦ W + Δ S⁻¹ (Δ trained, S fixed lower-triangular)."""

    def __init__(self, S: torch.Tensor, out_features: int) -> None:
        super().__init__()
        self.register_buffer("S", S)
        self.delta = nn.Parameter(torch.zeros(out_features, S.shape[0], dtype=S.dtype, device=S.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shift = torch.linalg.solve_triangular(self.S, self.delta, upper=False, left=False)
        return weight + shift.to(weight.dtype)


@contextmanager
def reparametrized(targets: dict[str, nn.Linear], whiteners: dict[str, torch.Tensor]
                   ) -> Iterator[dict[str, nn.Parameter]]:
    """Each target's weight as W + Δ S⁻¹ with a trainable Δ = 0 (the model is unchanged until Δ
    moves); yields the Δ by target. On exit Δ S⁻¹ is folded into the weights in float64 and the
    parametrizations are removed."""
    whitened = {}
    try:
        for name, linear in targets.items():  # Δ in float64 for a float64 model, else fp32
            S = whiteners[name].to(torch.promote_types(linear.weight.dtype, torch.float32))
            whitened[name] = _Whitened(S, linear.out_features)
            parametrize.register_parametrization(linear, "weight", whitened[name], unsafe=True)
        yield {name: w.delta for name, w in whitened.items()}
    finally:
        for name, w in whitened.items():
            linear = targets[name]
            parametrize.remove_parametrizations(linear, "weight", leave_parametrized=False)
            with torch.no_grad():
                S, delta = w.S.to(torch.float64), w.delta.detach().to(torch.float64)
                shift = torch.linalg.solve_triangular(S, delta, upper=False, left=False)
                linear.weight.copy_(linear.weight.to(torch.float64) + shift)


class PrehabStage:
    """Low-Rank Prehab: train the targets toward low rank before compression (reconstructed from the authors' BERT/ViT code)."""

    name: ClassVar[str] = "prehab"
    needs_training: ClassVar[bool] = True
    needs_plan: ClassVar[bool] = False  # True with ranks: plan (``needs_for``)

    def __init__(self, steps: int = 32, lr: float = 2e-5, lambda_init: float = 0.0, lambda_max: float = 1e-3,
                 warmup: int = 8, surrogate: str = "stable_rank", ratio: float = 0.8, damping: float | None = None,
                 power_iterations: int = 2, validate_every: int = 8, seed: int = 0, shrink: float = 0.0,
                 ranks: str = "uniform") -> None:
        checks = [(steps >= 1, f"steps must be >= 1, got {steps}"), (lr > 0, f"lr must be > 0, got {lr}"),
                  (0 <= lambda_init <= lambda_max, f"need 0 <= lambda_init <= lambda_max, got {lambda_init}, "
                                                   f"{lambda_max}"),
                  (warmup >= 0, f"warmup must be >= 0, got {warmup}"),
                  (surrogate in SURROGATES, f"surrogate must be one of {list(SURROGATES)}, got {surrogate!r}"),
                  (0 < ratio <= 1, f"ratio must be in (0, 1], got {ratio}"),
                  (damping is None or damping > 0, f"damping must be > 0, got {damping}"),
                  (power_iterations >= 1, f"power_iterations must be >= 1, got {power_iterations}"),
                  (validate_every >= 1, f"validate_every must be >= 1, got {validate_every}"),
                  (0 <= shrink < 1, f"shrink must be in [0, 1), got {shrink}"),
                  (ranks in RANKS, f"ranks must be one of {list(RANKS)}, got {ranks!r}"),
                  (shrink == 0 or surrogate == "tail", f"shrink needs surrogate 'tail', not {surrogate!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.steps, self.lr, self.lambda_init, self.lambda_max = steps, lr, lambda_init, lambda_max
        self.warmup, self.surrogate, self.ratio, self.damping = warmup, surrogate, ratio, damping
        self.power_iterations, self.validate_every, self.seed = power_iterations, validate_every, seed
        self.shrink, self.ranks = shrink, ranks

    @classmethod
    def needs_for(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The plan with ``ranks: plan``."""
        return {"needs_plan": option_of(cls, options, "ranks") == "plan"}

    def apply(self, model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
              training: torch.Tensor, validation: torch.Tensor | None = None,
              plan: AllocationPlan | None = None, whiteners: dict[str, torch.Tensor] | None = None
              ) -> dict[str, Any]:
        device = next(model.parameters()).device
        probe = windows[:8].to(device)
        before = _dense_loss(model, probe)
        whiteners = self._whiteners(model, targets, windows, whiteners)
        weighted = {name: targets[name].weight.detach().to(whiteners[name]) @ whiteners[name] for name in targets}
        kept = self._kept(weighted, plan)
        generator = torch.Generator().manual_seed(self.seed)
        # the tail's warm start is each M's top-k left basis at Δ = 0: the first validation check
        # computes those SVDs anyway, so it hands the bases over instead of a second pass
        vectors = ({} if self.surrogate == "tail" else
                   {name: torch.randn(weighted[name].shape[1], generator=generator).to(weighted[name])
                    for name in kept})
        order = torch.randperm(training.shape[0], generator=generator).tolist()
        trained = [p for p in model.parameters() if p.requires_grad]
        for p in trained:
            p.requires_grad_(False)
        history, checks = [], []
        try:
            with reparametrized(targets, whiteners) as deltas:
                judge = (lambda bases=None: truncated_loss(model, deltas, weighted, kept, validation.to(device),
                                                           bases)) if validation is not None else None
                initial = judge(vectors if self.surrogate == "tail" else None) if judge else None
                if self.surrogate == "tail" and not vectors:
                    vectors.update({n: torch.linalg.svd(w, full_matrices=False).U[:, :kept[n]]
                                    for n, w in weighted.items() if n in kept})
                best = (initial, 0, None) if judge else None  # (validation loss, step, Δ): Δ = 0 first
                optimizer = torch.optim.Adam(deltas.values(), lr=self.lr)
                for step in tqdm(range(1, self.steps + 1), desc="prehab", unit="step"):
                    window = training[order[(step - 1) % len(order)]][None].to(device)
                    lm = next_token_loss(model, window)
                    rank = torch.stack([self._surrogate(weighted[n] + deltas[n].to(weighted[n]), vectors, n)
                                        for n in kept]).mean() if kept else torch.zeros(())
                    ramp = 1.0 if step > self.warmup else step / max(1, self.warmup)
                    lam = self.lambda_init + (self.lambda_max - self.lambda_init) * ramp
                    optimizer.zero_grad(set_to_none=True)
                    (lm + lam * rank).backward()
                    optimizer.step()
                    if self.shrink:
                        self._shrink_tails(weighted, deltas, vectors, self.shrink * ramp)
                    history.append((lm.item(), rank.item()))
                    if judge and (step % self.validate_every == 0 or step == self.steps):
                        checks.append({"step": step, "truncated_validation_loss": judge()})
                        if checks[-1]["truncated_validation_loss"] < best[0]:
                            best = (checks[-1]["truncated_validation_loss"], step,
                                    {n: d.detach().clone() for n, d in deltas.items()})
                if best is not None:  # fold the best state, not the last
                    with torch.no_grad():
                        for n, d in deltas.items():
                            if best[2] is None:
                                d.zero_()
                            else:
                                d.copy_(best[2][n])
        finally:
            for p in trained:
                p.requires_grad_(True)
        after = _dense_loss(model, probe)
        summary = {"steps": self.steps, "ranks": self.ranks, "truncated_targets": len(kept),
                   "kept_components": sum(kept.values()), "training_loss": [history[0][0], history[-1][0]],
                   "surrogate": [history[0][1], history[-1][1]], "dense_calibration_loss": [before, after],
                   "dense_calibration_ppl": [math.exp(before), math.exp(after)]}
        if best is not None:
            summary.update(best_step=best[1], truncated_validation_loss=best[0], checks=checks,
                           initial_truncated_validation_loss=initial)
        return summary

    def _whiteners(self, model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                   given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Each target's S (fp32; float64 for a float64 model): the plan's (``given``, with ranks:
        plan and no ``damping`` of its own), else from C of the calibration windows (forward only,
        one per input group)."""
        def typed(S: torch.Tensor, name: str) -> torch.Tensor:
            return S.to(torch.promote_types(targets[name].weight.dtype, torch.float32))

        if self.ranks == "plan" and self.damping is None and given and set(targets) <= set(given):
            return {name: typed(given[name], name) for name in targets}  # already typed: the same tensors
        stats = collect(model, targets, windows, moments=True, gradients=False, desc="prehab whitening")
        out = {}
        for group, members in stats.groups.items():
            S = typed(whitening_factor(stats.covariances.pop(group), self.damping or DAMPING).S, members[0])
            out.update({name: S for name in members})
        return out

    def _kept(self, weighted: dict[str, torch.Tensor], plan: AllocationPlan | None) -> dict[str, int]:
        """The rank each truncated target keeps: uniform at ``ratio``, or the plan's (dense ones left out)."""
        if self.ranks == "uniform":
            return {name: kept_rank(*w.shape, self.ratio) for name, w in weighted.items()}
        if plan is None:
            raise ValueError("prehab with ranks: plan needs the pipeline's plan (plan=)")
        return {name: plan.rank(name) for name in weighted if not plan.is_dense(name)}

    @staticmethod
    @torch.no_grad()
    def _shrink_tails(weighted: dict[str, torch.Tensor], deltas: dict[str, nn.Parameter],
                      bases: dict[str, torch.Tensor], share: float) -> None:
        """Scale each M = W S + Δ's part outside its tracked top-k left subspace by 1 − ``share``."""
        for n, U in bases.items():
            d = deltas[n]
            M = weighted[n] + d.to(weighted[n])
            d.sub_((share * (M - U @ (U.mT @ M))).to(d))

    def _surrogate(self, M: torch.Tensor, vectors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """The rank surrogate of M = W S + Δ (differentiable in Δ); ``vectors`` holds each target's
        warm start (the tail's top-k left basis, the stable rank's power vector), advanced here."""
        energy = (M * M).sum()
        with torch.no_grad():
            if self.surrogate == "tail":  # one step of subspace iteration
                vectors[name] = torch.linalg.qr(M @ (M.mT @ vectors[name])).Q
            else:  # power iterations
                v = vectors[name]
                for _ in range(self.power_iterations):
                    v = M.mT @ (M @ v)
                    v = v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)
                vectors[name] = v
        if self.surrogate == "tail":
            return 1 - (vectors[name].mT @ M).square().sum() / energy
        return energy / (M @ vectors[name]).square().sum()


def kept_rank(out_features: int, in_features: int, ratio: float) -> int:
    """The rank a layer keeps at ``ratio`` of its 16-bit bytes as 16-bit factors (≥ 1)."""
    return max(1, int(ratio * out_features * in_features / (out_features + in_features)))


def truncated_loss(model: nn.Module, deltas: dict[str, nn.Parameter], weighted: dict[str, torch.Tensor],
                   kept: dict[str, int], windows: torch.Tensor, bases: dict[str, torch.Tensor] | None = None
                   ) -> float:
    """The next-token loss on ``windows`` with every target in ``kept`` truncated: M = W S + Δ to
    its rank k (by setting Δ to M_k − W S for the measurement); Δ comes back as it was. ``bases``,
    when given, receives each M's top-k left singular vectors."""
    saved = {n: d.detach().clone() for n, d in deltas.items()}
    try:
        with torch.no_grad():
            for n, k in kept.items():
                d = deltas[n]
                M = weighted[n] + d.to(weighted[n])
                U, sigma, Vh = torch.linalg.svd(M, full_matrices=False)
                if bases is not None:
                    bases[n] = U[:, :k]
                d.copy_((U[:, :k] * sigma[:k]) @ Vh[:k] - weighted[n])
        return _dense_loss(model, windows)
    finally:
        with torch.no_grad():
            for n, d in deltas.items():
                d.copy_(saved[n])


def _dense_loss(model: nn.Module, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(next_token_loss(model, windows))


@zsfw.hookimpl
def zsfw_register_stages(register) -> None:
    register(PrehabStage)
