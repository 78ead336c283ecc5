"""The modules a compressed model is built from.

``LowRankLinear`` replaces an ``nn.Linear`` (y = W x + b, W: out×in) by two factors,
y = B (A x) + b with A: rank×in and B: out×rank. Its ``state_dict`` keys are stable:

    <name>.A.weight   (rank, in_features)
    <name>.B.weight   (out_features, rank)
    <name>.B.bias     (out_features,)        only when the original layer had a bias

Factors are stored in the storage format's dtype and computed in the input's dtype, so bf16
factors serve an fp32 model without rounding its activations. Formats with modules of their own
(the packed one) keep them in their plugin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def weight_as(weight: torch.Tensor, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
    """``weight`` in the dtype of the activations ``x`` (unless ``cast`` is False)."""
    return weight if not cast or weight.dtype == x.dtype else weight.to(x.dtype)


class LowRankLinear(nn.Module):
    """A rank-``rank`` linear layer, a drop-in replacement for ``nn.Linear``.

    ``cast_weights`` (default True) casts the factors to the input's dtype. Formats whose
    weights are quantized tensor subclasses (torchao) set it False: their kernels take any float
    activation as they are. It is a plain attribute, so compile and export see a constant.
    """

    cast_weights = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in 1..{min(in_features, out_features)} for a "
                f"{out_features}x{in_features} layer, got {rank}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(
        cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> "LowRankLinear":
        """Build from B (out×rank), A (rank×in) and an optional bias, stored as ``dtype`` (no
        random initialisation first: a corrector builds these at every step)."""
        module = nn.utils.skip_init(cls, A.shape[1], B.shape[0], A.shape[0], bias=bias is not None,
                                    device=A.device, dtype=dtype)
        with torch.no_grad():
            module.A.weight.copy_(A)
            module.B.weight.copy_(B)
            if bias is not None:
                module.B.bias.copy_(bias)
        return module

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast F.linear picks the dtype itself: a cast to x's first would be undone
        bias, cast = self.B.bias, self.cast_weights and not torch.is_autocast_enabled(x.device.type)
        h = F.linear(x, weight_as(self.A.weight, x, cast))
        return F.linear(h, weight_as(self.B.weight, x, cast),
                        None if bias is None else weight_as(bias, x, cast))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.B.bias is not None}")


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is stored in another dtype than the activations.

    Layers left dense keep their keys (``weight``, ``bias``) and are computed in the input's dtype
    (``cast_weights`` as in ``LowRankLinear``).
    """

    cast_weights = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = self.cast_weights
        bias = None if self.bias is None else weight_as(self.bias, x, cast)
        return F.linear(x, weight_as(self.weight, x, cast), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "StoredLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module
