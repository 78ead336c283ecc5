"""The modules a compressed model is built from.

``LowRankLinear`` replaces an ``nn.Linear`` (y = W x + b, W: out×in) by two factors,
y = B (A x) + b with A: rank×in and B: out×rank. Its ``state_dict`` keys are stable:

    <name>.A.weight   (rank, in_features)
    <name>.B.weight   (out_features, rank)
    <name>.B.bias     (out_features,)        only when the original layer had a bias

Factors are stored in the storage format's dtype and computed in the input's dtype, so bf16
factors serve an fp32 model without rounding its activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _weight_as(weight: torch.Tensor, x: torch.Tensor, cast: bool = True) -> torch.Tensor:
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
        """Build from B (out×rank), A (rank×in) and an optional bias, stored as ``dtype``."""
        module = cls(A.shape[1], B.shape[0], A.shape[0], bias=bias is not None,
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
        bias, cast = self.B.bias, self.cast_weights
        h = F.linear(x, _weight_as(self.A.weight, x, cast))
        return F.linear(h, _weight_as(self.B.weight, x, cast),
                        None if bias is None else _weight_as(bias, x, cast))

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
        bias = None if self.bias is None else _weight_as(self.bias, x, cast)
        return F.linear(x, _weight_as(self.weight, x, cast), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> "StoredLinear":
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=dtype)
        with torch.no_grad():
            module.weight.copy_(linear.weight)
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        return module


def quantize_symmetric(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one fp32 scale per slice along ``dim`` (max |x| → 127)."""
    scale = x.abs().amax(dim=dim, keepdim=True).float().clamp_min(torch.finfo(torch.float32).tiny) / 127
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale.squeeze(dim)


def pack_int8_pairs(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Two int8 tensors of one shape as one int16 tensor: ``high`` in the upper byte."""
    return ((high.to(torch.int32) << 8) | (low.to(torch.int32) & 0xFF)).to(torch.int16)


def unpack_int8_pairs(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_int8_pairs``."""
    w = words.to(torch.int32)
    return (w >> 8).to(torch.int8), (w & 0xFF).to(torch.uint8).view(torch.int8)


class PackedLowRankLinear(nn.Module):
    """A low-rank layer stored in the packed ("remap") layout: k·max(m, n) 16-bit words.

    With p = min(m, n), the top p rows of B (p×k) and the first p columns of A (k×p), both int8
    with one fp32 scale per component, share p·k int16 words (B in the upper byte, Aᵀ in the
    lower). The factor that is longer than p keeps its remaining rows (B, when m > n) or columns
    (A, when n > m) in bf16. ``state_dict`` keys:

        <name>.words     int16 (p, rank)
        <name>.rest      bf16  (m − p, rank) when m ≥ n, else (rank, n − p)
        <name>.scale_B   fp32  (rank,)     per-component scales of the int8 rows of B
        <name>.scale_A   fp32  (rank,)     per-component scales of the int8 columns of A
        <name>.bias      bf16  (m,)        only when the original layer had a bias

    The file holds only the packed form; the bf16 factors the forward uses are unpacked once,
    at construction and after every ``load_state_dict``, and are not saved.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 1..{min(in_features, out_features)} for a "
                             f"{out_features}x{in_features} layer, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        p = min(in_features, out_features)
        rest = (out_features - p, rank) if out_features >= in_features else (rank, in_features - p)
        self.register_buffer("words", torch.zeros(p, rank, dtype=torch.int16, device=device))
        self.register_buffer("rest", torch.zeros(rest, dtype=torch.bfloat16, device=device))
        self.register_buffer("scale_B", torch.ones(rank, dtype=torch.float32, device=device))
        self.register_buffer("scale_A", torch.ones(rank, dtype=torch.float32, device=device))
        self.register_buffer("bias", None if not bias else
                             torch.zeros(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("A", None, persistent=False)
        self.register_buffer("B", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.unpack())
        if self.words.device.type != "meta":
            self.unpack()

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> "PackedLowRankLinear":
        """Pack B (out×rank) and A (rank×in), quantizing the shared block to int8."""
        (m, k), n = B.shape, A.shape[1]
        module = cls(n, m, k, bias=bias is not None, device=A.device)
        p = min(m, n)
        b8, scale_B = quantize_symmetric(B[:p], dim=0)
        a8, scale_A = quantize_symmetric(A[:, :p], dim=1)
        module.words.copy_(pack_int8_pairs(b8, a8.T))
        module.rest.copy_(B[p:] if m >= n else A[:, p:])
        module.scale_B.copy_(scale_B)
        module.scale_A.copy_(scale_A)
        if bias is not None:
            module.bias.copy_(bias)
        module.unpack()
        return module

    def unpack(self) -> None:
        """Rebuild the bf16 factors the forward uses from the packed buffers."""
        b8, a8t = unpack_int8_pairs(self.words)
        B = (b8.float() * self.scale_B).to(torch.bfloat16)
        A = (a8t.T.float() * self.scale_A[:, None]).to(torch.bfloat16)
        if self.out_features >= self.in_features:
            B = torch.cat([B, self.rest])
        else:
            A = torch.cat([A, self.rest], dim=1)
        self.A, self.B = A.contiguous(), B.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else _weight_as(self.bias, x)
        return F.linear(F.linear(x, _weight_as(self.A, x)), _weight_as(self.B, x), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, packed")
