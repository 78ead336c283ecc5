"""What flows between the pipeline's steps, and what each kind of plugin implements.

stage      model + calibration windows -> changes the weights before statistics (optional)
scorer     LayerSpectrum -> one score per singular component (the cost of dropping it)
allocator  list[LayerScores] + ByteBudget -> AllocationPlan (what each layer keeps);
           a model-aware allocator gets an AllocationProblem instead
corrector  CorrectionProblem -> adjusts the truncated weights in place
storage    byte cost of a layer, the module that holds it, and its empty skeleton for loading;
           a format chooser (``storage: auto``) picks one of its member formats per layer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from zsfw.budget import AllocationPlan, ByteBudget


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


class BasedFormat(StorageFormat, Protocol):
    """A storage format with a quantized base (``has_base = True``): rank k stores Q(W), the
    weight quantized, plus the top k components of the whitened residual (W − Q(W))·S, in
    ``hybrid_module``; rank 0 is the base alone, and ``dense_module`` the layer at full precision
    (what the full residual converges to). The factorization holds each layer's residual under
    ``base_key`` (formats with one key share it) and its base as ``base_tensors``."""

    has_base: ClassVar[bool]
    base_key: str  # names Q: formats whose Q is the same (bits, group, rounding) share one key
    needs_hessian: bool  # ``quantize`` wants H (GPTQ)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None) -> Any:
        """Q(W) of ``weight`` (out×in); ``hessian`` H = S Sᵀ (in×in, float64) when ``needs_hessian``."""
        ...

    def dequantize(self, base: Any) -> torch.Tensor:
        """Q(W) as a float tensor (out×in)."""
        ...

    def base_tensors(self, base: Any) -> dict[str, torch.Tensor]: ...

    def base_from_tensors(self, tensors: dict[str, torch.Tensor]) -> Any: ...

    def hybrid_module(self, base: Any, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """The layer Q(W) + B A (B: out×k, A: k×in, k ≥ 0) plus ``bias``."""
        ...


class LayerFactors(Protocol):
    """What a format chooser may read of each layer: its whitened-SVD factors and whitening."""

    def factors(self, name: str, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """B = U Σ^½ (out×r) and A = Σ^½ Vᵀ S⁻¹ (r×in), float64, of every component kept for
        truncation (B[:, :k] @ A[:k] is the rank-k truncation); of the residual on the base
        ``variant`` (a ``BasedFormat``'s ``base_key``) when one is named."""
        ...

    def spectrum(self, name: str, variant: str = "") -> LayerScores:
        """The layer's spectrum and scores (of its residual on base ``variant`` when one is named)."""
        ...

    def whitener(self, name: str) -> torch.Tensor | None:
        """S (C = S Sᵀ), float64, or None when the layer was not whitened."""
        ...

    def bias(self, name: str) -> torch.Tensor | None: ...


class FormatChooser(Protocol):
    """A storage plugin that stores each layer in one of its ``members`` (``storage: auto``).

    After scoring, ``choose`` picks each layer's member format; the allocator then spends the
    budget with every layer priced by its own format, and truncation, correction, the report
    and the checkpoint's module records follow the choice."""

    name: ClassVar[str]
    members: Mapping[str, StorageFormat]

    def choose(self, layers: Sequence[LayerScores], ratio: float, factors: LayerFactors
               ) -> dict[str, StorageFormat]: ...


class Scorer(Protocol):
    """Scores each singular component: the estimated cost of dropping it (may be signed)."""

    name: ClassVar[str]
    needs_gradient: ClassVar[bool]

    def score(self, layer: LayerSpectrum) -> torch.Tensor: ...


class Allocator(Protocol):
    """Chooses what each layer keeps so that the plan's cost is at most ``budget.limit``.

    Returns an ``AllocationPlan`` (a plain mapping of layer name to rank or kept indices is
    turned into one by the engine). Plans keep each layer's top components unless the allocator
    sets ``keeps_any_component = True``: then it may keep any indices, and the factor store
    keeps every component for it."""

    name: ClassVar[str]

    def allocate(self, layers: Sequence[LayerScores], budget: ByteBudget) -> AllocationPlan: ...


class AllocationProblem(Protocol):
    """What a model-aware allocator (``needs_model = True``) receives instead of
    ``(layers, budget)``: the layers' spectra and scores, the budget, and the soft-truncated
    model's loss and its gradient with respect to every component's occupation."""

    layers: Sequence[LayerScores]
    budget: ByteBudget
    gradient_windows: int  # how many windows ``soft_gradients`` can share out

    def soft_gradients(self, occupations: dict[str, torch.Tensor], share: tuple[int, int] = (0, 1)
                       ) -> tuple[float, dict[str, torch.Tensor]]:
        """Calibration loss of the model whose layer ``l`` has weight B_l diag(f_l) A_l (B_l =
        U Σ^½, A_l = Σ^½ Vᵀ S⁻¹, the whitened SVD: f = 1 is the original layer, a 0/1 f a
        truncation) and ∂loss/∂f_l per layer, from ONE forward/backward pass over the gradient
        windows, or share ``part`` of ``parts`` interleaved disjoint shares of them. Layers absent
        from ``occupations`` keep their original weights. The model is left as it was."""
        ...

    def validation_loss(self, occupations: dict[str, torch.Tensor]) -> float:
        """Next-token loss of the same soft model on the validation windows (forward only): what
        to choose a state on, not the calibration loss."""
        ...


class ModelAwareAllocator(Protocol):
    """An allocator that needs the model: it declares ``needs_model = True`` and is called
    with an ``AllocationProblem`` (FermiGrad is one)."""

    name: ClassVar[str]
    needs_model: ClassVar[bool]

    def allocate(self, problem: AllocationProblem) -> AllocationPlan: ...


class Stage(Protocol):
    """A pre-compression stage: runs before the statistics pass and may change the weights of
    the model (Low-Rank Prehab is one). Its options (the recipe's) enter the cache keys."""

    name: ClassVar[str]

    def apply(self, model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor) -> dict[str, Any]:
        """Change ``model`` in place, using the calibration ``windows`` if needed; returns a
        summary (JSON-able) that the report records under the stage's name. A stage that sets
        ``needs_training = True`` is called with ``training=`` too, windows of the same text
        held out from calibration and validation to learn from, and ``validation=``, the
        windows to judge its steps on (None when the run has none). One that sets
        ``needs_plan = True`` is called with ``plan=`` too: the ``AllocationPlan`` the recipe's
        scorer, allocator, storage and ratio make of the model before the stage, and
        ``whiteners=``, each target's whitening factor S (S Sᵀ = C plus the recipe's damping) that
        plan was made with, in the targets' dtype but at least fp32 ({} when the recipe does not
        whiten)."""
        ...


class KeepBestTracker(Protocol):
    """The best state of a correction on the validation windows (from ``keep_best``)."""

    loss: float  # the best validation loss so far
    state: Any  # its snapshot

    def offer(self) -> bool:
        """Keep the current state if its validation loss is below ``loss``; whether it was."""
        ...

    def settle(self) -> bool:
        """Go back to ``state`` unless the current state is as good; whether it was kept."""
        ...


class CorrectionProblem(Protocol):
    """The truncated model as a corrector sees it: dense rank-k weights it may move.

    State (what may move): ``layers``, ``plan``, ``factors``, ``norms``, ``dense``, ``original``,
    ``weight``, ``install``, ``retruncate``, ``module_weight``, ``set_weight``, ``snapshot``,
    ``restore``. Gradients: ``gradients``, ``factor_gradients``, ``paired_moments``. Judging:
    ``validation_loss``, ``keep_best``, ``record``. Re-planning: ``replan``. Whatever a corrector
    does, the pipeline keeps its result only if it is no worse than the one shot on the
    validation windows.
    """

    # -- state
    layers: Sequence[str]  # the low-rank layers of the plan
    plan: AllocationPlan
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (B, A), its weight is B @ A
    norms: Sequence[str]  # the model's normalization layers (``factor_gradients(extra=…)``, ``set_weight``)
    dense: Sequence[str]  # the targets the plan keeps dense (likewise)
    gradient_windows: int  # how many windows ``gradients`` can share out
    training_windows: int  # how many ``factor_gradients(windows="training")`` can share out (0: none drawn)

    def original(self, name: str) -> torch.Tensor:
        """Layer ``name``'s weight before truncation."""
        ...

    def weight(self, name: str) -> torch.Tensor:
        """Low-rank layer ``name``'s current (dense rank-k) weight."""
        ...

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Make ``B @ A`` (rank k of the plan) layer ``name``'s weight."""
        ...

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        """Install the best rank-k (whitened) approximation of ``weight`` for layer ``name``."""
        ...

    def module_weight(self, name: str) -> torch.Tensor:
        """Normalization layer or dense layer ``name``'s current weight."""
        ...

    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Make ``weight`` normalization layer or dense layer ``name``'s weight (snapshots include
        it); refused for a dense layer whose storage format quantizes it."""
        ...

    def snapshot(self) -> Any:
        """The current state of every layer (and the plan), for ``restore``."""
        ...

    def restore(self, snapshot: Any) -> None: ...

    # -- gradients
    def gradients(self, share: tuple[int, int] = (0, 1)) -> tuple[float, dict[str, torch.Tensor]]:
        """Calibration loss and ∂L/∂W of every layer: ONE forward/backward for all layers, over
        the gradient windows or, with ``share = (part, parts)``, that one of ``parts``
        interleaved disjoint shares of them."""
        ...

    def factor_gradients(self, share: tuple[int, int] = (0, 1), loss: str = "next_token",
                         windows: str = "calibration", precision: str = "fp32", extra: Sequence[str] = ()
                         ) -> tuple[float, dict[str, tuple[torch.Tensor, ...]]]:
        """Calibration loss and (∂L/∂B, ∂L/∂A) of every layer's factors, like ``gradients``
        but with the layers run as their factors (for correctors that train them); ``loss:
        distill`` differentiates KL(uncompressed model ‖ this one) instead of the next-token
        loss (in-memory driver only; a copy of the uncompressed model is kept meanwhile);
        ``windows: training`` shares out the training windows instead of the gradient windows;
        ``precision: bf16`` autocasts the forward passes to bf16 (in-memory driver only);
        ``extra`` names normalization and dense layers whose (∂L/∂weight,) to add, by name
        (in-memory driver only)."""
        ...

    def paired_moments(self) -> Iterator[Any]:
        """Decoder layer by decoder layer, for each group of low-rank layers reading one input:
        ``PairedMoments`` (names, E[x x̂ᵀ], E[x̂ x̂ᵀ], last) of the uncompressed model's inputs x
        and this model's x̂ on the calibration windows; what is installed before the next group
        is asked for shapes the inputs after it (sequential compensation; in-memory driver only)."""
        ...

    # -- judging
    def validation_loss(self) -> float:
        """Mean next-token loss of the current weights on held-out validation windows (forward
        only; judge steps and keep the best state on this, not on the calibration loss)."""
        ...

    def keep_best(self) -> KeepBestTracker:
        """A tracker of the best state from now on: ``offer()`` after a step, ``settle()`` at the end."""
        ...

    def record(self, **entry: Any) -> None:
        """Note a measured step (e.g. cycle, scale, validation loss, accepted) for the report."""
        ...

    # -- re-planning
    def replan(self, weights: dict[str, torch.Tensor]) -> None:
        """Make ``weights`` the dense weights of the plan's low-rank layers (the other targets keep
        their original weights), re-run statistics, factorization, scores and allocation at the
        recipe's ratio on that model, and install the new plan's truncation (``plan``, ``layers``
        and ``factors`` change; ``snapshot``/``restore`` include the plan)."""
        ...


class Corrector(Protocol):
    """Improves the truncated weights after allocation (e.g. truncate–correct–re-truncate)."""

    name: ClassVar[str]

    def correct(self, problem: CorrectionProblem) -> list[float]:
        """Returns the calibration loss measured at the start of each cycle."""
        ...
