"""The packed ("remap") storage format: 8-bit factor blocks sharing 16-bit words.

A rank-k out×in layer costs k·max(out, in) 16-bit words (see ``zsfw.modules.PackedLowRankLinear``)
plus 2·k fp32 scales and a bf16 bias: for a square layer that is half of bf16 factors. Layers
left dense stay bf16. The saved file holds exactly the packed buffers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import zsfw
from zsfw.modules import PackedLowRankLinear, StoredLinear

WORD_BYTES = 2
SCALE_BYTES = 4


class PackedFactors:
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
