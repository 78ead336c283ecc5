"""Dense storage formats: low-rank factors (and layers left dense) in fp32, bf16 or fp16.

A rank-k out×in layer costs k·(out+in) elements, a dense one out·in, plus the bias, each at the
format's element size. Factors are held in that dtype in memory, exactly as they are saved.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import zsfw
from zsfw import LowRankLinear, StoredLinear


class DenseFactors:
    """Factors stored as plain tensors of one floating dtype."""

    name: ClassVar[str]
    dtype: ClassVar[torch.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        return (rank * (out_features + in_features) + (out_features if bias else 0)) * self.element_size

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int:
        return (out_features * in_features + (out_features if bias else 0)) * self.element_size

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return LowRankLinear.from_factors(B, A, bias, self.dtype)

    def dense_module(self, linear: nn.Linear) -> nn.Module:
        if linear.weight.dtype == self.dtype:
            return linear
        return StoredLinear.from_linear(linear, self.dtype)

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        with torch.device("meta"):
            if rank is None:
                return StoredLinear(in_features, out_features, bias=bias, dtype=self.dtype)
            return LowRankLinear(in_features, out_features, rank, bias=bias, dtype=self.dtype)


class Float32Factors(DenseFactors):
    """fp32 factors: k·(out+in) elements of 4 bytes."""

    name = "fp32"
    dtype = torch.float32


class BFloat16Factors(DenseFactors):
    """bf16 factors: k·(out+in) elements of 2 bytes (the papers' 16-bit setting)."""

    name = "bf16"
    dtype = torch.bfloat16


class Float16Factors(DenseFactors):
    """fp16 factors: k·(out+in) elements of 2 bytes."""

    name = "fp16"
    dtype = torch.float16


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    for fmt in (Float32Factors, BFloat16Factors, Float16Factors):
        register(fmt)
