"""The byte budget, the allocation plan, and building blocks for allocators.

``ByteBudget`` prices what a layer keeps in one storage format. ``AllocationPlan`` is the one
form of "what each layer keeps" that flows from the allocator to the plan check, truncation, the
corrector, the report and the checkpoint. ``DropFrontier`` is the bookkeeping of allocators that
drop components one at a time.

A layer *keeps* either its top k components (a rank k, the usual case) or a given set of
component indices (ablations that drop anywhere in a spectrum); it is *dense* when its kept
components would not cost less than the dense layer, and is then stored whole. In a format
with a quantized base (``has_base``) rank k is the base plus k residual components, and rank 0,
the base alone, is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Sequence, Union

import torch

from zsfw.errors import AllocationError
from zsfw.protocols import LayerScores, StorageFormat

REFERENCE_BYTES_PER_WEIGHT = 2
"""``ratio`` counts bytes against the target layers at 16 bits per weight, the size checkpoints
ship in, so that ratio 0.8 with 16-bit factors is the papers' parameter ratio 0.8."""

Allocation = Union[int, torch.Tensor]
"""What one layer keeps: a rank k (its top k components) or a 1-D tensor of the indices of the
components it keeps."""


def rank_of(allocation: Allocation) -> int:
    """The number of components an allocation keeps."""
    return allocation if isinstance(allocation, int) else allocation.numel()


def dropped(full_rank: int, kept: Allocation) -> torch.Tensor:
    """Mask of the components not kept: those past rank ``kept``, or not in the indices ``kept``."""
    mask = torch.ones(full_rank, dtype=torch.bool)
    mask[slice(None, kept) if isinstance(kept, int) else kept] = False
    return mask


def has_base(storage: StorageFormat) -> bool:
    """Whether ``storage`` stores rank k as a quantized base plus k residual components."""
    return bool(getattr(storage, "has_base", False))


def variant_of(storage: StorageFormat) -> str:
    """Which factorization a layer in ``storage`` is truncated from: its residual on the
    format's base (the format's ``base_key``), or the weight's own ("")."""
    return storage.base_key if has_base(storage) else ""


def fits(storage: StorageFormat, out_features: int, in_features: int) -> bool:
    """Whether ``storage`` can hold an out×in layer (a group-wise format needs its group size to
    divide the inputs); a format without ``fits`` holds any."""
    check = getattr(storage, "fits", None)
    return check is None or bool(check(out_features, in_features))


def min_rank(storage: StorageFormat) -> int:
    """The lowest rank ``storage`` stores: 0 (the quantized base alone) in a format with a base, else 1."""
    return 0 if has_base(storage) else 1


def useful_rank(storage: StorageFormat, out_features: int, in_features: int, bias: bool) -> int:
    """The highest rank ``storage`` keeps below its dense cost (0 when none is): above it a layer
    stays dense, so no allocation keeps more of its top components."""
    dense = storage.dense_bytes(out_features, in_features, bias)
    low, high = 0, min(out_features, in_features) - 1  # the answer lies in [low, high]
    while low < high:
        mid = (low + high + 1) // 2
        if storage.lowrank_bytes(out_features, in_features, mid, bias) < dense:
            low = mid
        else:
            high = mid - 1
    return low


class ByteBudget:
    """The global byte budget every allocator spends, each layer priced by its storage format:
    ``storage``, or the layer's entry in ``formats`` (a per-layer choice, see ``FormatChooser``).

    A layer costs the cheaper of its low-rank and dense forms: a layer whose low-rank cost
    would not beat its dense cost stays dense.
    """

    def __init__(self, layers: Sequence[LayerScores], ratio: float, storage: StorageFormat,
                 formats: Mapping[str, StorageFormat] | None = None) -> None:
        self.storage = storage
        self.formats = dict(formats or {})
        self.original = sum(self.reference_bytes(l) for l in layers)
        self.limit = int(ratio * self.original)

    def format(self, layer: LayerScores) -> StorageFormat:
        """The storage format that holds ``layer``."""
        return self.formats.get(layer.name, self.storage)

    @staticmethod
    def reference_bytes(layer: LayerScores) -> int:
        """The layer's bytes at 16 bits per weight (and bias): what ``ratio`` is a fraction of."""
        bias = layer.out_features if layer.has_bias else 0
        return (layer.out_features * layer.in_features + bias) * REFERENCE_BYTES_PER_WEIGHT

    def cost(self, layer: LayerScores, rank: int) -> int:
        storage = self.format(layer)
        dense = storage.dense_bytes(layer.out_features, layer.in_features, layer.has_bias)
        if rank >= layer.full_rank:
            return dense
        low = storage.lowrank_bytes(layer.out_features, layer.in_features, rank, layer.has_bias)
        return min(low, dense)

    def min_rank(self, layer: LayerScores) -> int:
        """The lowest rank ``layer`` may keep in its format."""
        return min_rank(self.format(layer))

    def is_dense(self, layer: LayerScores, rank: int) -> bool:
        return rank >= layer.full_rank or self.cost(layer, rank) == self.format(layer).dense_bytes(
            layer.out_features, layer.in_features, layer.has_bias
        )

    def total(self, layers: Sequence[LayerScores], ranks: Mapping[str, Allocation]) -> int:
        return sum(self.cost(l, rank_of(ranks[l.name])) for l in layers)

    def uniform_rank(self, layer: LayerScores) -> int:
        """The largest rank (at least the format's lowest) at which the layer costs at most the
        budget's ratio of its 16-bit bytes: what a uniform allocation gives it."""
        allowed = self.limit / self.original * self.reference_bytes(layer)
        lo, hi = self.min_rank(layer), layer.full_rank
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(layer, mid) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        return lo


class AllocationPlan(Mapping[str, Allocation]):
    """What every layer keeps, checked against the layers and priced by the budget.

    A mapping from layer name to its allocation (rank or kept indices). Building one validates
    every entry; ``check_budget`` checks the total.
    """

    def __init__(self, layers: Sequence[LayerScores], budget: ByteBudget,
                 kept: Mapping[str, Allocation]) -> None:
        self.layers = {l.name: l for l in layers}
        self.budget = budget
        self._kept: dict[str, Allocation] = {}
        for layer in layers:
            value, lowest = kept.get(layer.name), budget.min_rank(layer)
            if not _valid(value, layer.full_rank, lowest):
                raise AllocationError(
                    f"layer {layer.name!r} was given {value!r}; allowed: a rank in "
                    f"{lowest}..{layer.full_rank} or a 1-D tensor of distinct component indices in "
                    f"0..{layer.full_rank - 1}")
            self._kept[layer.name] = value
        extra = set(kept) - set(self.layers)
        if extra:
            raise AllocationError(f"allocation names layers that are not targets: {sorted(extra)}")

    def __getitem__(self, name: str) -> Allocation:
        return self._kept[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._kept)

    def __len__(self) -> int:
        return len(self._kept)

    def rank(self, name: str) -> int:
        """Components kept (the full rank for a dense layer)."""
        return self.layers[name].full_rank if self.is_dense(name) else rank_of(self._kept[name])

    def is_dense(self, name: str) -> bool:
        return self.budget.is_dense(self.layers[name], rank_of(self._kept[name]))

    def lowrank(self) -> list[str]:
        """Names of the layers stored as factors, in plan order."""
        return [name for name in self._kept if not self.is_dense(name)]

    def cost(self, name: str) -> int:
        return self.budget.cost(self.layers[name], rank_of(self._kept[name]))

    def format(self, name: str) -> StorageFormat:
        """The storage format layer ``name`` is stored in."""
        return self.budget.format(self.layers[name])

    def total_bytes(self) -> int:
        return sum(self.cost(name) for name in self._kept)

    def dropped(self, name: str) -> torch.Tensor:
        """Mask of the layer's dropped components (none for a dense layer)."""
        full = self.layers[name].full_rank
        return torch.zeros(full, dtype=torch.bool) if self.is_dense(name) else dropped(full, self._kept[name])

    def check_budget(self) -> None:
        spent = self.total_bytes()
        if spent > self.budget.limit:
            raise AllocationError(f"the plan spends {spent} bytes, over the budget of "
                                  f"{self.budget.limit}")


def _valid(kept: object, full_rank: int, lowest: int) -> bool:
    if isinstance(kept, torch.Tensor):
        return (kept.dim() == 1 and kept.dtype in (torch.int32, torch.int64) and kept.numel() >= max(lowest, 1)
                and kept.unique().numel() == kept.numel()
                and 0 <= int(kept.min()) and int(kept.max()) < full_rank)
    return isinstance(kept, int) and not isinstance(kept, bool) and lowest <= kept <= full_rank


class DropFrontier:
    """Each layer's current rank and next droppable component, with the bytes spent so far.

    ``drop(i)`` preserves keep-top-k: a layer can only drop its smallest remaining σ, so the
    candidates at any moment are one component per layer (its "frontier"). Ablations that drop
    components anywhere use ``drop(i, component)``; such a layer then keeps a set of indices.
    """

    def __init__(self, layers: Sequence[LayerScores], budget: ByteBudget,
                 min_rank: int | Sequence[int] = 0) -> None:
        self.layers = list(layers)
        self.budget = budget
        floors = [min_rank] * len(self.layers) if isinstance(min_rank, int) else min_rank
        self.floors = [max(budget.min_rank(l), min(k, l.full_rank)) for k, l in zip(floors, self.layers)]  # per layer
        self.ranks = [l.full_rank for l in self.layers]
        self.scores = [l.scores.tolist() for l in self.layers]
        self.spent = sum(budget.cost(l, k) for l, k in zip(self.layers, self.ranks))
        self.picks: list[tuple[int, float]] = []  # (layer index, score) in the order dropped
        self.kept: dict[int, torch.Tensor] = {}  # masks of layers that dropped out of σ order

    def over_budget(self) -> bool:
        return self.spent > self.budget.limit

    def can_drop(self, i: int) -> bool:
        return self.ranks[i] > self.floors[i]

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
            f"byte budget {self.budget.limit} cannot be met: at the minimum rank of every layer "
            f"({min(self.floors)}–{max(self.floors)}) the targets still cost {self.spent} bytes; "
            f"raise the ratio or lower the rank floor")

    def result(self) -> AllocationPlan:
        return AllocationPlan(self.layers, self.budget, {
            l.name: k if i not in self.kept else self.kept[i].nonzero().flatten()
            for i, (l, k) in enumerate(zip(self.layers, self.ranks))})
