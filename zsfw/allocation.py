"""Building blocks for allocators that drop components one at a time.

``DropFrontier.drop(i)`` preserves keep-top-k: a layer can only drop its smallest remaining σ,
so the candidates at any moment are one component per layer (its "frontier"). Ablations that
drop components anywhere in a spectrum use ``drop(i, component)``; such a layer's allocation is
then the tensor of the component indices it keeps instead of a rank.
"""

from __future__ import annotations

from typing import Sequence

import torch

from zsfw.interfaces import Allocation, ByteBudget, LayerScores


class AllocationError(ValueError):
    """The byte budget cannot be met."""


class DropFrontier:
    """Each layer's current rank and next droppable component, with the bytes spent so far."""

    def __init__(self, layers: Sequence[LayerScores], budget: ByteBudget, min_rank: int = 1) -> None:
        self.layers = list(layers)
        self.budget = budget
        self.min_rank = min_rank
        self.ranks = [l.full_rank for l in self.layers]
        self.scores = [l.scores.tolist() for l in self.layers]
        self.spent = sum(budget.cost(l, k) for l, k in zip(self.layers, self.ranks))
        self.picks: list[tuple[int, float]] = []  # (layer index, score) in the order dropped
        self.kept: dict[int, torch.Tensor] = {}  # masks of layers that dropped out of σ order

    def over_budget(self) -> bool:
        return self.spent > self.budget.limit

    def can_drop(self, i: int) -> bool:
        return self.ranks[i] > self.min_rank

    def next_score(self, i: int) -> float:
        """Score of layer i's smallest remaining component."""
        return self.scores[i][self.ranks[i] - 1]

    def drop(self, i: int, component: int | None = None) -> float:
        """Drop layer i's smallest remaining component, or its ``component`` (which breaks the
        layer's keep-top-k: do not mix the two for one layer); returns the dropped score."""
        if component is None:
            score = self.next_score(i)
        else:
            mask = self.kept.setdefault(i, torch.ones(self.layers[i].full_rank, dtype=torch.bool))
            if not mask[component]:
                raise ValueError(f"component {component} of {self.layers[i].name!r} is already dropped")
            mask[component] = False
            score = self.scores[i][component]
        layer, k = self.layers[i], self.ranks[i]
        self.spent += self.budget.cost(layer, k - 1) - self.budget.cost(layer, k)
        self.ranks[i] = k - 1
        self.picks.append((i, score))
        return score

    def exhausted_error(self) -> AllocationError:
        return AllocationError(
            f"byte budget {self.budget.limit} cannot be met: at rank {self.min_rank} in every "
            f"layer the targets still cost {self.spent} bytes; raise the ratio")

    def result(self) -> dict[str, Allocation]:
        return {l.name: k if i not in self.kept else self.kept[i].nonzero().flatten()
                for i, (l, k) in enumerate(zip(self.layers, self.ranks))}
