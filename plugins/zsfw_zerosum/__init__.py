"""Zero-Sum SVD (arXiv 2602.02848): first-order scores, zero-sum allocation, correction cycles."""

from __future__ import annotations

import heapq
from typing import ClassVar, Sequence

import torch
from tqdm.auto import tqdm

import zsfw
from zsfw import (AllocationPlan, ByteBudget, CorrectionProblem, DropFrontier, LayerScores,
                  LayerSpectrum, first_order_scores)


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
    the byte budget is met.
    """

    name: ClassVar[str] = "zero_sum"

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> AllocationPlan:
        frontier = DropFrontier(layers, budget)
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
            running += frontier.drop(i)
            push(i)
        self.picks = frontier.picks  # the drop sequence, for diagnostics and tests
        return frontier.result()


class ProjectedGradientCorrector:
    """Truncate–correct–re-truncate: W_k ← trunc_k(W_k + (⟨g,Δ⟩/⟨g,g⟩) g), Δ = W − W_k.

    Each cycle takes the gradient g of every layer from ONE forward/backward pass over the
    gradient windows, then re-truncates every layer at its allocated rank.
    """

    name: ClassVar[str] = "projected_gradient"

    def __init__(self, cycles: int = 1) -> None:
        if cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        self.cycles = cycles

    def correct(self, problem: CorrectionProblem) -> list[float]:
        losses = []
        for cycle in range(self.cycles):
            loss, grads = problem.gradients()
            losses.append(loss)
            for name in tqdm(problem.layers, desc=f"correction {cycle + 1}/{self.cycles}", unit="layer"):
                g = grads.pop(name).to(torch.float64)
                current = problem.weight(name).to(torch.float64)
                gg = (g * g).sum()
                if gg == 0:
                    continue
                step = (g * (problem.original(name).to(torch.float64) - current)).sum() / gg
                problem.retruncate(name, current + step * g)
        return losses


@zsfw.hookimpl
def zsfw_register_scorers(register) -> None:
    register(FirstOrderScorer)


@zsfw.hookimpl
def zsfw_register_allocators(register) -> None:
    register(ZeroSumAllocator)


@zsfw.hookimpl
def zsfw_register_correctors(register) -> None:
    register(ProjectedGradientCorrector)
