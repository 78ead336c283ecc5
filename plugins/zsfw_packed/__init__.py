"""The packed ("remap") storage format: 8-bit factor blocks sharing 16-bit words.

A rank-k out×in layer costs k·max(out, in) 16-bit words (see ``PackedLowRankLinear``)
plus 2·k fp32 scales and a bf16 bias: for a square layer that is half of bf16 factors. Layers
left dense stay bf16. The saved file holds exactly the packed buffers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import zsfw
from zsfw import StoredLinear, weight_as

WORD_BYTES = 2
SCALE_BYTES = 4


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
        bias = None if self.bias is None else weight_as(self.bias, x)
        return F.linear(F.linear(x, weight_as(self.A, x)), weight_as(self.B, x), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, packed")


class PackedFactors:
    """Packed ("remap"): int8 factor blocks sharing 16-bit words, k·max(out, in) words a layer."""

    name: ClassVar[str] = "packed"

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        return (rank * max(out_features, in_features) * WORD_BYTES + 2 * rank * SCALE_BYTES
                + (out_features * WORD_BYTES if bias else 0))

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int:
        return (out_features * in_features + (out_features if bias else 0)) * WORD_BYTES

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return PackedLowRankLinear.from_factors(B, A, bias)

    def dense_module(self, linear: nn.Linear) -> nn.Module:
        return StoredLinear.from_linear(linear, torch.bfloat16)

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        with torch.device("meta"):
            if rank is None:
                return StoredLinear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
            return PackedLowRankLinear(in_features, out_features, rank, bias=bias)


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    register(PackedFactors)
