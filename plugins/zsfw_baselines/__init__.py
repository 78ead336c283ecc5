"""Baselines to compare Zero-Sum SVD with, in the same harness.

- ``sigma`` scorer: whitened σ magnitude; with the ``zero_sum`` allocator (all scores ≥ 0) it
  ranks every component of every layer by σ alone.
- ``uniform`` allocator: the same kept fraction of bytes in every layer (as SVD-LLM).
- ``greedy_negative`` allocator: always drop the most negative ΔL, anywhere in a spectrum (the
  paper's failing ablation; ``keep_top_k: true`` keeps each layer's σ order).
Plain unwhitened SVD is the recipe option ``whiten: false``.
"""

from __future__ import annotations

import heapq
from typing import Any, ClassVar, Sequence

import torch

import zsfw
from zsfw import AllocationPlan, ByteBudget, DropFrontier, LayerScores, LayerSpectrum
from zsfw import option_of


class SigmaScorer:
    """Score = σ_i: drop the smallest singular values first, whatever the layer."""

    name: ClassVar[str] = "sigma"
    needs_gradient: ClassVar[bool] = False

    def score(self, layer: LayerSpectrum) -> torch.Tensor:
        return layer.sigma.clone()


class UniformAllocator:
    """Every layer keeps the same fraction of its 16-bit bytes: the largest rank that fits."""

    name: ClassVar[str] = "uniform"

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> AllocationPlan:
        return AllocationPlan(layers, budget, {layer.name: budget.uniform_rank(layer) for layer in layers})


class GreedyNegativeAllocator:
    """Always drop the component with the most negative score, then the smallest positive one:
    the paper's failing ablation.

    As in the authors' code, a component can go from anywhere in a layer's spectrum (the
    allocation is then the indices a layer keeps). ``keep_top_k: true`` restricts every layer to
    dropping its smallest remaining σ, as zero-sum does, to show what that constraint is worth.
    """

    name: ClassVar[str] = "greedy_negative"

    def __init__(self, keep_top_k: bool = False) -> None:
        self.keep_top_k = keep_top_k

    @classmethod
    def needs_for(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Any component without ``keep_top_k`` (the factor store then keeps every component)."""
        return {"keeps_any_component": not option_of(cls, options, "keep_top_k")}

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> AllocationPlan:
        frontier = DropFrontier(layers, budget)
        if self.keep_top_k:
            heap = [(frontier.next_score(i), i, None) for i in range(len(layers)) if frontier.can_drop(i)]
        else:  # every component of every layer, most negative first
            heap = [(s, i, j) for i, scores in enumerate(frontier.scores) for j, s in enumerate(scores)]
        heapq.heapify(heap)
        while frontier.over_budget():
            if not heap:
                raise frontier.exhausted_error()
            _, i, j = heapq.heappop(heap)
            if not frontier.can_drop(i):
                continue
            frontier.drop(i, j)
            if self.keep_top_k and frontier.can_drop(i):
                heapq.heappush(heap, (frontier.next_score(i), i, None))
        self.picks = frontier.picks  # the drop sequence, for diagnostics and tests
        return frontier.result()


@zsfw.hookimpl
def zsfw_register_scorers(register) -> None:
    register(SigmaScorer)


@zsfw.hookimpl
def zsfw_register_allocators(register) -> None:
    register(UniformAllocator)
    register(GreedyNegativeAllocator)
