"""A worked example of a zsfw plugin: one scorer, registered through the ``zsfw`` entry point.

``damped_first_order`` scores each singular component of a layer as Zero-Sum SVD's first-order
loss change ΔL_i plus ``alpha`` times the component's share of the layer's whitened energy,
σ_i² / Σ_j σ_j²: a prior that a large component is costly to drop even where the gradient of one
calibration set says otherwise. ``alpha: 0`` gives back ``first_order`` exactly. Use it from a
recipe as ``scorer: {name: damped_first_order, alpha: 0.2}``. The walk-through is docs/plugins.md
in the zsfw repository.
"""

from __future__ import annotations

from typing import ClassVar

import torch

import zsfw


class DampedFirstOrderScorer:
    """First-order ΔL plus ``alpha`` × each component's share of the layer's σ² energy."""

    name: ClassVar[str] = "damped_first_order"  # what a recipe calls it
    needs_gradient: ClassVar[bool] = True  # the pipeline then computes G = ∂L/∂W for every layer

    def __init__(self, alpha: float = 0.1) -> None:  # recipe options are constructor keywords
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    def score(self, layer: zsfw.LayerSpectrum) -> torch.Tensor:
        """One float64 score per component of ``layer``'s whitened SVD: the estimated loss
        change of dropping it."""
        first = zsfw.first_order_scores(layer.U, layer.sigma, layer.Vh, layer.gradient, layer.S)
        energy = layer.sigma.square()
        return first + self.alpha * energy / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny)


@zsfw.hookimpl
def zsfw_register_scorers(register) -> None:
    """zsfw calls this once when it builds its plugin registry."""
    register(DampedFirstOrderScorer)
