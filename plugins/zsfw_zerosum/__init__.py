"""Zero-Sum SVD (arXiv 2602.02848): first-order scores, zero-sum allocation, correction cycles."""

from __future__ import annotations

import heapq
import math
from typing import ClassVar, Sequence

import torch
from tqdm.auto import tqdm

import zsfw
from zsfw import (AllocationPlan, ByteBudget, CorrectionProblem, DropFrontier, LayerScores,
                  LayerSpectrum, first_order_scores)


PHANTOM_ROUNDS = 4


class FirstOrderScorer:
    """ΔL_i = −σ_i u_iᵀ (G S⁻ᵀ) v_i: the signed first-order loss change of dropping component i."""

    name: ClassVar[str] = "first_order"
    needs_gradient: ClassVar[bool] = True

    def score(self, layer: LayerSpectrum) -> torch.Tensor:
        return first_order_scores(layer.U, layer.sigma, layer.Vh, layer.gradient, layer.S)


class ZeroSumAllocator:
    """Drop components so that the running sum of dropped ΔL stays near zero.

    Two min-heaps keyed by |ΔL| hold each layer's next droppable component, one for ΔL ≥ 0 and
    one for ΔL < 0. While the sum s of dropped ΔL is ≤ 0 the smallest non-negative one goes,
    otherwise the smallest negative one (either heap stands in when the other is empty), until
    the byte budget is met. With ``floor`` > 0 no layer goes below ceil(floor × the rank a
    uniform allocation would give it). With ``committed_only`` the drops of layers that end
    dense (their components all come back: "phantom" drops) do not count in s: the allocation is
    redone with those layers' drops left out of s until the set of dense layers stops changing
    (at most ``PHANTOM_ROUNDS`` passes).
    """

    name: ClassVar[str] = "zero_sum"

    def __init__(self, floor: float = 0.0, committed_only: bool = False) -> None:
        if not 0 <= floor <= 1:
            raise ValueError(f"floor must be within [0, 1] (a fraction of the uniform rank), got {floor}")
        if not isinstance(committed_only, bool):
            raise ValueError(f"committed_only must be true or false, got {committed_only!r}")
        self.floor, self.committed_only = floor, committed_only

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> AllocationPlan:
        floors = [math.ceil(self.floor * budget.uniform_rank(l)) for l in layers]
        phantom: set[int] = set()
        for _ in range(PHANTOM_ROUNDS if self.committed_only else 1):
            frontier = self._drop(layers, budget, floors, phantom)
            dense = {i for i, (l, k) in enumerate(zip(layers, frontier.ranks)) if budget.is_dense(l, k)}
            if dense == phantom:
                break
            phantom = dense
        self.picks = frontier.picks  # the drop sequence, for diagnostics and tests
        return frontier.result()

    @staticmethod
    def _drop(layers: Sequence[LayerScores], budget: ByteBudget, floors: list[int], uncounted: set[int]
              ) -> DropFrontier:
        """One zero-sum pass; drops in the layers ``uncounted`` do not enter the running sum."""
        frontier = DropFrontier(layers, budget, floors)
        heaps: dict[bool, list[tuple[float, int]]] = {True: [], False: []}  # key: ΔL >= 0

        def push(i: int) -> None:
            if frontier.can_drop(i):
                score = frontier.next_score(i)
                heapq.heappush(heaps[score >= 0], (abs(score), i))

        for i in range(len(layers)):
            push(i)
        running = 0.0
        while frontier.over_budget():
            heap = heaps[running <= 0] or heaps[running > 0]
            if not heap:
                raise frontier.exhausted_error()
            _, i = heapq.heappop(heap)
            score = frontier.drop(i)
            if i not in uncounted:
                running += score
            push(i)
        return frontier


class ProjectedGradientCorrector:
    """Truncate–correct–re-truncate: W_k ← trunc_k(W_k + t·(⟨g,Δ⟩/⟨g,g⟩) g), Δ = W − W_k.

    Each cycle takes the gradient g of every layer from ONE forward/backward pass over the
    gradient windows, then re-truncates every layer at its allocated rank. The step scale t
    starts at 1 (the published step); with ``backtrack`` > 0 a step that does not lower the
    validation loss is retried at t/2, t/4, … that many times, and when none helps the cycle is
    undone (and correction stops, unless windows rotate). With ``keep_best`` the
    state with the lowest validation loss, the one-shot truncation included, is the result.
    ``backtrack: 0, keep_best: false`` is the published method (every step taken). With
    ``rotate`` = R > 1 cycle c takes its gradient from share c mod R of R interleaved, disjoint
    shares of the gradient windows (R times cheaper, and no cycle fits the windows the previous
    one stepped on). With ``replan`` a cycle does what the authors' code does between cycles:
    the stepped weights stay dense, and statistics, scores and the allocation of every rank are
    redone on that model (a full calibration pass a step tried) before truncating.
    """

    name: ClassVar[str] = "projected_gradient"

    def __init__(self, cycles: int = 1, backtrack: int = 2, keep_best: bool = True, rotate: int = 1,
                 replan: bool = False) -> None:
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        if backtrack < 0:
            raise ValueError(f"backtrack must be >= 0, got {backtrack}")
        if rotate < 1:
            raise ValueError(f"rotate must be >= 1, got {rotate}")
        if not isinstance(replan, bool):
            raise ValueError(f"replan must be true or false, got {replan!r}")
        self.cycles, self.backtrack, self.keep_best, self.rotate = cycles, backtrack, keep_best, rotate
        self.replan = replan

    def correct(self, problem: CorrectionProblem) -> list[float]:
        losses = []
        best = problem.keep_best()
        current = best.loss
        for cycle in range(1, self.cycles + 1):
            loss, grads = problem.gradients(((cycle - 1) % self.rotate, self.rotate))
            losses.append(loss)
            coefficients = self._coefficients(problem, grads)
            start = problem.snapshot()
            for attempt in range(self.backtrack + 1):
                scale = 0.5 ** attempt
                if attempt:
                    problem.restore(start)
                stepped = {}
                for name in tqdm(coefficients, desc=f"correction {cycle}/{self.cycles}", unit="layer"):
                    step = grads[name].to(torch.float64, copy=True).mul_(scale * coefficients[name])
                    stepped[name] = step.add_(problem.weight(name))
                    if not self.replan:
                        problem.retruncate(name, stepped.pop(name))
                if self.replan:  # a layer without a step stays at its truncation
                    problem.replan({name: stepped.get(name, problem.weight(name)) for name in problem.layers})
                value = problem.validation_loss()
                accepted = value < current or not self.backtrack
                problem.record(cycle=cycle, scale=scale, calibration_loss=loss, validation_loss=value,
                               accepted=accepted)
                if accepted:
                    break
            else:  # no scale lowered the validation loss: undo the cycle; stop unless windows rotate
                problem.restore(start)
                if self.rotate == 1:  # the next gradient would be the same
                    break
                continue
            current = value
            best.offer()
        if self.keep_best:
            best.settle()
        return losses

    @staticmethod
    def _coefficients(problem: CorrectionProblem, grads: dict[str, torch.Tensor]) -> dict[str, float]:
        """⟨g, W − W_k⟩ / ⟨g, g⟩ per layer (layers with a zero gradient are left as they are)."""
        out = {}
        for name in problem.layers:
            g = grads[name].to(torch.float64)
            gg = (g * g).sum()
            if gg > 0:
                delta = problem.original(name).to(torch.float64) - problem.weight(name).to(torch.float64)
                out[name] = ((g * delta).sum() / gg).item()
        return out


@zsfw.hookimpl
def zsfw_register_scorers(register) -> None:
    register(FirstOrderScorer)


@zsfw.hookimpl
def zsfw_register_allocators(register) -> None:
    register(ZeroSumAllocator)


@zsfw.hookimpl
def zsfw_register_correctors(register) -> None:
    register(ProjectedGradientCorrector)
