"""What flows between the pipeline's steps, and what each kind of plugin implements.

scorer     LayerSpectrum -> one score per singular component (the cost of dropping it)
allocator  list[LayerScores] + ByteBudget -> rank per layer
corrector  CorrectionProblem -> adjusts the truncated weights in place
storage    byte cost of a layer, the module that holds it, and its empty skeleton for loading
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import nn

REFERENCE_BYTES_PER_WEIGHT = 2
"""``ratio`` counts bytes against the target layers at 16 bits per weight, the size checkpoints
ship in, so that ratio 0.8 with 16-bit factors is the papers' parameter ratio 0.8."""


@dataclass
class LayerSpectrum:
    """One target layer's whitened SVD (W S = U diag(σ) Vᵀ) with what scorers may need."""

    name: str
    U: torch.Tensor  # out×r, float64
    sigma: torch.Tensor  # r, descending
    Vh: torch.Tensor  # r×in
    S: torch.Tensor | None  # whitening factor (lower-triangular), None when not whitening
    gradient: torch.Tensor | None  # ∂L/∂W at the original weights, None if no scorer needs it


@dataclass
class LayerScores:
    """What an allocator sees of a layer: its shape, σ and the score of each component."""

    name: str
    out_features: int
    in_features: int
    has_bias: bool
    sigma: torch.Tensor
    scores: torch.Tensor

    @property
    def full_rank(self) -> int:
        return int(self.sigma.numel())


@runtime_checkable
class StorageFormat(Protocol):
    """How a layer is stored, and what it costs in bytes."""

    name: ClassVar[str]

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int: ...

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int: ...

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module: ...

    def dense_module(self, linear: nn.Linear) -> nn.Module: ...

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        """An empty module on the meta device whose ``state_dict`` keys are those the module
        of ``lowrank_module`` (rank given) or ``dense_module`` (rank None) saves; loading fills
        it with ``load_state_dict(..., assign=True)``."""
        ...


class ByteBudget:
    """The global byte budget every allocator spends, priced by one storage format.

    A layer costs the cheaper of its low-rank and dense forms: a layer whose low-rank cost
    would not beat its dense cost stays dense.
    """

    def __init__(self, layers: Sequence[LayerScores], ratio: float, storage: StorageFormat) -> None:
        self.storage = storage
        self.original = sum(self.reference_bytes(l) for l in layers)
        self.limit = int(ratio * self.original)

    @staticmethod
    def reference_bytes(layer: LayerScores) -> int:
        """The layer's bytes at 16 bits per weight (and bias): what ``ratio`` is a fraction of."""
        bias = layer.out_features if layer.has_bias else 0
        return (layer.out_features * layer.in_features + bias) * REFERENCE_BYTES_PER_WEIGHT

    def cost(self, layer: LayerScores, rank: int) -> int:
        dense = self.storage.dense_bytes(layer.out_features, layer.in_features, layer.has_bias)
        if rank >= layer.full_rank:
            return dense
        low = self.storage.lowrank_bytes(layer.out_features, layer.in_features, rank, layer.has_bias)
        return min(low, dense)

    def is_dense(self, layer: LayerScores, rank: int) -> bool:
        return rank >= layer.full_rank or self.cost(layer, rank) == self.storage.dense_bytes(
            layer.out_features, layer.in_features, layer.has_bias
        )

    def total(self, layers: Sequence[LayerScores], ranks: dict[str, int]) -> int:
        return sum(self.cost(l, ranks[l.name]) for l in layers)


class Scorer(Protocol):
    """Scores each singular component: the estimated cost of dropping it (may be signed)."""

    name: ClassVar[str]
    needs_gradient: ClassVar[bool]

    def score(self, layer: LayerSpectrum) -> torch.Tensor: ...


Allocation = Union[int, torch.Tensor]
"""What a layer keeps: a rank k (its top k components, the usual case) or a 1-D tensor of the
indices of the components it keeps (for ablations that drop anywhere in the spectrum)."""


def rank_of(allocation: Allocation) -> int:
    """The number of components an allocation keeps."""
    return allocation if isinstance(allocation, int) else allocation.numel()


class Allocator(Protocol):
    """Chooses what each layer keeps so that its cost, ``budget.total(layers, ranks)`` with the
    ranks of the allocations, is at most ``budget.limit``."""

    name: ClassVar[str]

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> dict[str, Allocation]: ...


class CorrectionProblem(Protocol):
    """The truncated model as a corrector sees it: dense rank-k weights it may move."""

    layers: Sequence[str]

    def original(self, name: str) -> torch.Tensor: ...

    def weight(self, name: str) -> torch.Tensor: ...

    def gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Calibration loss and ∂L/∂W of every layer: ONE forward/backward for all layers."""
        ...

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        """Install the best rank-k (whitened) approximation of ``weight`` for layer ``name``."""
        ...


class Corrector(Protocol):
    """Improves the truncated weights after allocation (e.g. truncate–correct–re-truncate)."""

    name: ClassVar[str]

    def correct(self, problem: CorrectionProblem) -> list[float]:
        """Returns the calibration loss measured at the start of each cycle."""
        ...
