"""Baselines to compare Zero-Sum SVD with, in the same harness.

- ``sigma`` scorer: whitened σ magnitude; with the ``zero_sum`` allocator (all scores ≥ 0) it
  ranks every component of every layer by σ alone.
- ``uniform`` allocator: the same kept fraction of bytes in every layer (as SVD-LLM).
- ``greedy_negative`` allocator: always drop the most negative ΔL (the paper's failing ablation).
Plain unwhitened SVD is the recipe option ``whiten: false``.
"""

from __future__ import annotations

import heapq
from typing import ClassVar, Sequence

import torch

import zsfw
from zsfw.allocation import DropFrontier
from zsfw.interfaces import ByteBudget, LayerScores, LayerSpectrum


class SigmaScorer:
    """Score = σ_i: drop the smallest singular values first, whatever the layer."""

    name: ClassVar[str] = "sigma"
    needs_gradient: ClassVar[bool] = False

    def score(self, layer: LayerSpectrum) -> torch.Tensor:
        return layer.sigma.clone()


class UniformAllocator:
    """Every layer keeps the same fraction of its 16-bit bytes: the largest rank that fits."""

    name: ClassVar[str] = "uniform"

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> dict[str, int]:
        ratio = budget.limit / budget.original
        ranks = {}
        for layer in layers:
            reference = budget.reference_bytes(layer)
            lo, hi = 1, layer.full_rank  # largest k with cost(k) <= ratio * reference
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if budget.cost(layer, mid) <= ratio * reference:
                    lo = mid
                else:
                    hi = mid - 1
            ranks[layer.name] = lo
        return ranks


class GreedyNegativeAllocator:
    """Always drop the component with the most negative score (the paper's failing ablation)."""

    name: ClassVar[str] = "greedy_negative"

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> dict[str, int]:
        frontier = DropFrontier(layers, budget)
        heap = [(frontier.next_score(i), i) for i in range(len(layers)) if frontier.can_drop(i)]
        heapq.heapify(heap)
        while frontier.over_budget():
            if not heap:
                raise frontier.exhausted_error()
            _, i = heapq.heappop(heap)
            frontier.drop(i)
            if frontier.can_drop(i):
                heapq.heappush(heap, (frontier.next_score(i), i))
        self.picks = frontier.picks  # the drop sequence, for diagnostics and tests
        return frontier.result()


@zsfw.hookimpl
def zsfw_register_scorers(register) -> None:
    register(SigmaScorer)


@zsfw.hookimpl
def zsfw_register_allocators(register) -> None:
    register(UniformAllocator)
    register(GreedyNegativeAllocator)
