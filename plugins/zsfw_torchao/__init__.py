"""torchao storage formats: int8 and fp8 factors (and int8/fp8 layers left dense).

Each factor linear gets a torchao weight tensor (version-2 configs): one int8 or float8_e4m3fn
element per weight and, per output row, one fp32 scale (int8 also keeps an int8 zero point,
zero for this symmetric scheme), so a rank-k out×in layer costs k·(out+in) + r·(k+out) bytes
with r = 5 (int8) or 4 (fp8), plus its bias in bf16. At one byte budget that is about twice
the rank of 16-bit factors: the paper's "half-prune + quantize" falls out of the budget.

``int8`` computes in int8 weight-only (or, with ``activation: dynamic``, int8 dynamic
activation × int8 weight) kernels. ``fp8`` is a storage format on CPU: torchao dequantizes the
weight to compute, which is slow in eager mode; it is meant for GPUs with fp8 support.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import nn

import zsfw
from zsfw import LowRankLinear, StoredLinear

logging.getLogger("torchao").setLevel(logging.ERROR)  # CUDA-only extensions fail to load on CPU

BIAS_DTYPE = torch.bfloat16
STORED_MIN_RANK = 2
"""torchao cannot quantize a factor with one input (a rank-1 layer's B, out×1: its per-row scale
reshape fails), so rank 1 is stored, and priced, as rank 2 whose second component is zero."""


class TorchaoFactors:
    """Factors (and dense layers) quantized by a torchao config, one byte per weight."""

    name: ClassVar[str]
    row_bytes: ClassVar[int]  # what torchao stores per output row besides the weights

    def config(self):
        raise NotImplementedError

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        rank = max(rank, STORED_MIN_RANK)
        return (rank * (out_features + in_features) + self.row_bytes * (rank + out_features)
                + (out_features * BIAS_DTYPE.itemsize if bias else 0))

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int:
        return (out_features * in_features + self.row_bytes * out_features
                + (out_features * BIAS_DTYPE.itemsize if bias else 0))

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        pad = STORED_MIN_RANK - B.shape[1]
        if pad > 0:  # B's extra column is zero; A's extra row repeats its first (a zero row's scale is 0: NaN in fp8)
            B, A = torch.cat([B, B.new_zeros(B.shape[0], pad)], 1), torch.cat([A, A[:1].expand(pad, -1)])
        return self._quantized(LowRankLinear.from_factors(B, A, bias, torch.float32))

    def dense_module(self, linear: nn.Linear) -> nn.Module:
        return self._quantized(StoredLinear.from_linear(linear, torch.float32))

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        with torch.device("meta"):
            module = (StoredLinear(in_features, out_features, bias=bias) if rank is None
                      else LowRankLinear(in_features, out_features, max(rank, STORED_MIN_RANK), bias=bias))
        return _as_stored(module.requires_grad_(False))

    def _quantized(self, module: nn.Module) -> nn.Module:
        from torchao.quantization import quantize_

        quantize_(module, self.config())  # every nn.Linear inside: the module itself or A and B
        return _as_stored(module.requires_grad_(False))


def _as_stored(module: nn.Module) -> nn.Module:
    """bf16 bias, and no casting of the torchao weights in the forward (their kernels take any
    float activation)."""
    owner = module.B if isinstance(module, LowRankLinear) else module
    if owner.bias is not None:
        owner.bias = nn.Parameter(owner.bias.detach().to(BIAS_DTYPE), requires_grad=False)
    module.cast_weights = False
    return module


class Int8Factors(TorchaoFactors):
    """int8 weights, per-row scales; ``activation: dynamic`` also quantizes activations to int8."""

    name = "int8"
    row_bytes = 5  # fp32 scale + int8 zero point

    def __init__(self, activation: str = "none") -> None:
        if activation not in ("none", "dynamic"):
            raise ValueError(f"int8 storage option 'activation' must be 'none' or 'dynamic', "
                             f"got {activation!r}")
        self.activation = activation

    def config(self):
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig,
                                          Int8WeightOnlyConfig, PerRow)

        if self.activation == "dynamic":
            return Int8DynamicActivationInt8WeightConfig(granularity=PerRow(), version=2,
                                                         set_inductor_config=False)
        return Int8WeightOnlyConfig(granularity=PerRow(), version=2, set_inductor_config=False)


class Float8Factors(TorchaoFactors):
    """float8_e4m3fn weights, per-row scales. Storage only on CPU (computed by dequantizing)."""

    name = "fp8"
    row_bytes = 4  # fp32 scale

    def config(self):
        from torchao.quantization import Float8WeightOnlyConfig, PerRow

        return Float8WeightOnlyConfig(granularity=PerRow(), version=2, set_inductor_config=False)


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    register(Int8Factors)
    register(Float8Factors)
