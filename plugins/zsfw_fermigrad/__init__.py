"""FermiGrad: ranks from gradient descent on Fermi-function occupations (arXiv 2512.03062).

A reconstruction from the paper's abstract ("relaxing the discrete singular-value truncation into
a continuous optimization using the Fermi function", "globally optimal layer-wise ranks"); its
method text and code are not public. Dobi-SVD's differentiable truncation is the closest
published relative.

Each layer l gets a chemical potential μ_l in rank units; component i (0-based, by descending σ)
is occupied with f_{l,i} = 1 / (1 + exp((i + ½ − μ_l) / T_l)), so μ_l = k keeps k components
when T → 0. The soft model has weight B_l diag(f_l) A_l (the whitened SVD's factors). Its soft
bytes Σ_l Σ_i f_{l,i} c_l(i), with c_l(i) the format's marginal cost of component i (the cost
that takes the layer to dense at its break-even, and 0 past it), are held at the budget (less
what the layers cost at rank 0: int8 row scales, biases) after every step by one shift ν common
to all layers in fractions of their full rank (μ_l + ν·r_l, bisection): no penalty weight to
tune. One forward/backward of the soft model gives ∂loss/∂f (``AllocationProblem.soft_gradients``),
hence ∂loss/∂μ_l = Σ_i ∂loss/∂f_{l,i} · f(1 − f) / T_l. The step moves μ_l by −``lr``·r_l·m_l/√v, with m_l a running mean of u_l = (∂loss/∂μ_l) /
(∂bytes/∂μ_l), the loss change per byte of layer l, and v one running mean of the median u² over
the layers (one scale for all, robust to a layer past its break-even, where bytes barely move):
its fixed point under the budget shift is u_l equal in every layer, the optimality condition of
ranks under a byte budget (a per-layer normalization such as Adam's would move that point).
T anneals geometrically from ``temperature`` × full rank to ``final_temperature``. Every
``validate_every`` steps the hard ranks are read off (k_l = round(μ_l), the components with
f > ½ as T → 0), repaired to the exact budget by dropping, one at a time, the frontier component
whose first-order score is smallest, and that plan's validation loss measured: the best plan, the
initial one included, is the result, so FermiGrad is never worse than its starting allocation on
the validation windows. The report gives the best plan's (hard) validation loss, the soft model's
at that state and the gap. A budget that keeps every layer dense leaves nothing to trade (and
no byte that moves with μ: every u_l would be 0/0): that plan is the result, with no steps.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import zsfw
from zsfw import AllocationPlan, DropFrontier

INITIAL = ("zero_sum", "uniform")
MAX_STEP = 3.0  # a layer moves at most 3·lr of its full rank a step (its u far above the others')


class FermiGradAllocator:
    """FermiGrad: gradient steps on per-layer Fermi occupations, loss per byte equalized at a held budget (reconstructed from arXiv 2512.03062's abstract)."""

    name: ClassVar[str] = "fermigrad"
    needs_model: ClassVar[bool] = True

    def __init__(self, steps: int = 32, lr: float = 0.005, temperature: float = 0.01,
                 final_temperature: float = 0.5, windows_per_step: int = 1, validate_every: int = 8,
                 initial: str = "zero_sum", seed: int = 0) -> None:
        checks = [(steps >= 0, f"steps must be >= 0, got {steps}"), (lr > 0, f"lr must be > 0, got {lr}"),
                  (temperature > 0, f"temperature must be > 0 (a fraction of the full rank), got {temperature}"),
                  (final_temperature > 0, f"final_temperature must be > 0 (in rank units), got {final_temperature}"),
                  (windows_per_step >= 1, f"windows_per_step must be >= 1, got {windows_per_step}"),
                  (validate_every >= 1, f"validate_every must be >= 1, got {validate_every}"),
                  (initial in INITIAL, f"initial must be one of {list(INITIAL)}, got {initial!r}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.steps, self.lr, self.temperature, self.final_temperature = steps, lr, temperature, final_temperature
        self.windows_per_step, self.validate_every, self.initial, self.seed = (windows_per_step, validate_every,
                                                                               initial, seed)
        self.history: list[dict] = []  # per validated step: step, mean T, calibration and validation loss
        self.summary: dict = {}  # what the report shows: steps, best step, soft and hard validation loss

    def allocate(self, problem) -> AllocationPlan:
        layers, budget = list(problem.layers), problem.budget
        whole = {l.name: l.full_rank for l in layers}
        if budget.total(layers, whole) <= budget.limit:  # nothing to trade: every layer stays dense
            self.summary = {"steps": 0, "skipped": "the budget keeps every layer dense"}
            return AllocationPlan(layers, budget, whole)
        full = torch.tensor([l.full_rank for l in layers], dtype=torch.float64)
        marginal = [torch.tensor([budget.cost(l, i + 1) - budget.cost(l, i) for i in range(l.full_rank)],
                                 dtype=torch.float64) for l in layers]
        limit = budget.limit - sum(budget.cost(l, 0) for l in layers)  # what the soft bytes may spend
        initial = self._initial(layers, budget)
        mu = torch.tensor([initial.rank(l.name) for l in layers], dtype=torch.float64)
        start_T = self.temperature * full
        T = start_T.clone()
        mu = hold_budget(mu, T, marginal, limit, full)
        if self.steps == 0:
            return self._read_off(layers, budget, mu)
        parts = max(1, problem.gradient_windows // self.windows_per_step)
        order = torch.randperm(parts, generator=torch.Generator().manual_seed(self.seed)).tolist()
        mean, square = torch.zeros_like(mu), 0.0
        start_loss = self._hard_loss(problem, layers, initial)
        best = (start_loss, initial, 0, mu.clone(), T.clone())  # the initial plan is a candidate too
        for step in range(1, self.steps + 1):
            progress = (step - 1) / max(1, self.steps - 1)
            T = start_T * (self.final_temperature / start_T) ** progress
            loss, g = potential_gradient(problem, layers, mu, T, full, (order[(step - 1) % parts], parts))
            slope = bytes_slope(mu, T, marginal, full)
            per_byte = g / slope.clamp_min(1e-3 * float(slope.max()))  # past break-even a component is free
            mean.mul_(0.9).add_(per_byte, alpha=0.1)
            square = 0.999 * square + 0.001 * float(per_byte.square().median())
            update = (mean / (1 - 0.9 ** step)) / ((square / (1 - 0.999 ** step)) ** 0.5 + 1e-30)
            mu = hold_budget(mu - self.lr * full * update.clamp(-MAX_STEP, MAX_STEP), T, marginal, limit, full)
            if step % self.validate_every == 0 or step == self.steps:
                plan = self._read_off(layers, budget, mu)
                value = self._hard_loss(problem, layers, plan)
                self.history.append({"step": step, "calibration_loss": loss, "validation_loss": value,
                                     "temperature": float(T.mean())})
                if value < best[0]:
                    best = (value, plan, step, mu.clone(), T.clone())
        hard_loss, plan, best_step, best_mu, best_T = best
        soft_loss = problem.validation_loss(self._named(layers, occupations(best_mu, best_T, full)))
        self.summary = {"steps": self.steps, "best_step": best_step, "initial_validation_loss": start_loss,
                        "soft_validation_loss": soft_loss, "hard_validation_loss": hard_loss,
                        "hard_minus_soft": hard_loss - soft_loss}
        return plan

    def _initial(self, layers, budget) -> AllocationPlan:
        """The starting plan: zero_sum's, or the uniform rank of every layer."""
        if self.initial == "uniform":
            return AllocationPlan(layers, budget, {l.name: budget.uniform_rank(l) for l in layers})
        return zsfw.create_component("allocator", "zero_sum").allocate(layers, budget)

    @staticmethod
    def _hard_loss(problem, layers, plan: AllocationPlan) -> float:
        """Validation loss of ``plan``'s truncation (what would be shipped), through the soft model
        with 0/1 occupations."""
        return problem.validation_loss({l.name: (torch.arange(l.full_rank) < plan.rank(l.name)).to(torch.float64)
                                        for l in layers})

    @staticmethod
    def _named(layers, f: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {l.name: fi for l, fi in zip(layers, f)}

    @staticmethod
    def _read_off(layers, budget, mu: torch.Tensor) -> AllocationPlan:
        """k_l = round(μ_l) (the components with f > ½ once T → 0), then the components with the
        smallest first-order scores dropped until the plan fits the budget."""
        frontier = DropFrontier(layers, budget)
        for i, (layer, m) in enumerate(zip(layers, mu.tolist())):
            keep = min(layer.full_rank, max(1, round(m)))
            while frontier.ranks[i] > keep:
                frontier.drop(i)
        while frontier.over_budget():
            candidates = [i for i in range(len(layers)) if frontier.can_drop(i)]
            if not candidates:
                raise frontier.exhausted_error()
            frontier.drop(min(candidates, key=frontier.next_score))
        return frontier.result()


def potential_gradient(problem, layers, mu: torch.Tensor, T: torch.Tensor, full: torch.Tensor,
                       share: tuple[int, int] = (0, 1)) -> tuple[float, torch.Tensor]:
    """The soft model's calibration loss and ∂loss/∂μ_l = Σ_i ∂loss/∂f_{l,i} · f(1 − f) / T_l,
    from one forward/backward pass (over one ``share`` of the gradient windows)."""
    f = occupations(mu, T, full)
    loss, grads = problem.soft_gradients({l.name: fi for l, fi in zip(layers, f)}, share)
    return loss, torch.stack([(grads[l.name] * fi * (1 - fi)).sum() / t for l, fi, t in zip(layers, f, T)])


def occupations(mu: torch.Tensor, T: torch.Tensor, full: torch.Tensor) -> list[torch.Tensor]:
    """f_{l,i} = 1 / (1 + exp((i + ½ − μ_l) / T_l)) for i < full rank of each layer."""
    return [torch.sigmoid((m - 0.5 - torch.arange(int(r), dtype=torch.float64)) / t)
            for m, t, r in zip(mu, T, full)]


def soft_bytes(mu: torch.Tensor, T: torch.Tensor, marginal: list[torch.Tensor], full: torch.Tensor) -> float:
    """Σ_l Σ_i f_{l,i} c_l(i): the budget's cost of the soft occupations."""
    return float(sum((f * c).sum() for f, c in zip(occupations(mu, T, full), marginal)))


def bytes_slope(mu: torch.Tensor, T: torch.Tensor, marginal: list[torch.Tensor], full: torch.Tensor
                ) -> torch.Tensor:
    """∂(soft bytes)/∂μ_l = Σ_i c_l(i) f_{l,i}(1 − f_{l,i}) / T_l for every layer."""
    return torch.stack([(c * f * (1 - f)).sum() / t for f, c, t in zip(occupations(mu, T, full), marginal, T)])


def hold_budget(mu: torch.Tensor, T: torch.Tensor, marginal: list[torch.Tensor], limit: int,
                full: torch.Tensor, iterations: int = 60) -> torch.Tensor:
    """μ + ν·full rank (each clamped to [0, full rank]) with the one ν that makes the soft bytes
    equal ``limit``, found by bisection (soft bytes grow with ν)."""
    shifted = lambda nu: (mu + nu * full).clamp(torch.zeros_like(full), full)
    low, high = -2.0, 2.0  # ν in fractions of each layer's full rank: ±2 empties or fills every layer
    for _ in range(iterations):
        middle = (low + high) / 2
        if soft_bytes(shifted(middle), T, marginal, full) > limit:
            high = middle
        else:
            low = middle
    return shifted(low)


@zsfw.hookimpl
def zsfw_register_allocators(register) -> None:
    register(FermiGradAllocator)
