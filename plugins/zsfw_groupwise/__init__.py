"""Group-wise quantized base storage formats: ``int4``, ``int3``, ``int2`` (weight-only).

A layer is stored as a quantized base Q (``bits`` per weight, one bf16 scale per ``group_size``
inputs of a row, symmetric: see ``quantize``) plus a bf16 low-rank residual B A (rank k ≥ 0)
and an optional bf16 bias. A rank-k out×in layer costs

    ceil(out·in·bits/8) + 2·out·in/group_size + 2·k·(out+in) + 2·out (bias)   bytes,

the packed codes being written back to back (``pack``): the file holds exactly that. In memory
the codes are torchao's ``IntxUnpackedToInt8Tensor`` (one int8 byte per weight; torchao has no
CPU kernel for packed int3/int2), which the forward computes with. The "dense" form of a layer
is the full-precision bf16 layer (what a full-rank residual converges to); the allocator stores a
layer dense when its residual would cost more.

Q is rounded to nearest (``rounding: rtn``) or by GPTQ against the layer's input second moment
(``rounding: gptq``, ``needs_hessian``). torchao's own GPTQ (``torchao.prototype.gptq``) does not
fit: it asserts CUDA, takes only int4 through ``Int4WeightOnlyConfig`` (asymmetric with zero
points, needing the ``mslk`` kernels) or per-row int8, has no int3/int2, and importing it changes
inductor's global division-rounding setting; ``quantize_gptq`` is the paper's algorithm in float64.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

import zsfw
from zsfw.errors import RecipeError
from zsfw_dense import BFloat16Factors

from .module import FACTOR_DTYPE, GroupwiseLinear
from .quantize import (SCALE_DTYPE, GroupwiseWeight, pack, packed_bytes, quantize_gptq, quantize_rtn,
                       unpack)

__all__ = ["GroupwiseFormat", "GroupwiseLinear", "GroupwiseWeight", "Int2Base", "Int3Base", "Int4Base",
           "pack", "packed_bytes", "quantize_gptq", "quantize_rtn", "unpack"]

ROUNDINGS = ("rtn", "gptq")
DENSE = BFloat16Factors()  # layers stored dense are plain bf16


class GroupwiseFormat:
    """A quantized base of ``bits`` bits per weight with a bf16 low-rank residual."""

    name: ClassVar[str]
    bits: ClassVar[int]
    has_base: ClassVar[bool] = True

    def __init__(self, group_size: int = 64, rounding: str = "rtn") -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        self.group_size, self.rounding = group_size, rounding

    @classmethod
    def needs_for(cls, options: dict) -> dict:
        """``needs_hessian`` as the recipe's options make it (``zsfw.capabilities``)."""
        return {"needs_hessian": zsfw.option_of(cls, options, "rounding") == "gptq"}

    @property
    def needs_hessian(self) -> bool:
        """Whether ``quantize`` needs the layer's input second moment (GPTQ rounding)."""
        return self.rounding == "gptq"

    @property
    def base_key(self) -> str:
        """What the base depends on: formats with one key share one residual factorization."""
        return f"int{self.bits}-g{self.group_size}-{self.rounding}"

    def dequantize(self, base: GroupwiseWeight) -> torch.Tensor:
        return base.dequantize()

    def base_tensors(self, base: GroupwiseWeight) -> dict[str, torch.Tensor]:
        """The base as the factor store keeps it between factorization and truncation."""
        return {"qdata": base.qdata, "scale": base.scale}

    def base_from_tensors(self, tensors: dict[str, torch.Tensor]) -> GroupwiseWeight:
        return GroupwiseWeight(tensors["qdata"], tensors["scale"], self.bits, self.group_size)

    def fits(self, out_features: int, in_features: int) -> bool:
        """Whether the group size divides the layer's inputs (``storage: auto`` gives another
        member the layers it does not)."""
        return in_features % self.group_size == 0

    def _check_groups(self, out_features: int, in_features: int) -> None:
        if not self.fits(out_features, in_features):
            divisor = max(d for d in range(1, self.group_size + 1) if in_features % d == 0)
            raise RecipeError(f"storage {self.name}: group_size {self.group_size} does not divide the "
                              f"{in_features} inputs of a {out_features}x{in_features} layer; use a "
                              f"group_size that divides {in_features}, e.g. {divisor}")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> GroupwiseWeight:
        """The quantized base of ``weight`` (out×in), on its device; ``hessian`` (in×in, e.g. the
        input second moment C) is required with GPTQ rounding and ignored otherwise."""
        self._check_groups(*weight.shape)
        if not self.needs_hessian:
            return quantize_rtn(weight, self.bits, self.group_size)
        if hessian is None:
            raise RuntimeError(f"storage {self.name} with rounding gptq needs the layer's input "
                               f"second moment (needs_hessian is True), got None")
        return quantize_gptq(weight, hessian, self.bits, self.group_size)

    def base_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the quantized base: packed codes and bf16 scales."""
        self._check_groups(out_features, in_features)
        return (packed_bytes(out_features * in_features, self.bits)
                + out_features * (in_features // self.group_size) * SCALE_DTYPE.itemsize)

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        return (self.base_bytes(out_features, in_features)
                + (rank * (out_features + in_features) + (out_features if bias else 0)) * FACTOR_DTYPE.itemsize)

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int:
        return DENSE.dense_bytes(out_features, in_features, bias)

    def hybrid_module(self, base: GroupwiseWeight, B: torch.Tensor, A: torch.Tensor,
                      bias: torch.Tensor | None) -> GroupwiseLinear:
        """The layer Q + B A (+ bias): ``base`` from ``quantize``, B out×k, A k×in (k may be 0)."""
        if (base.bits, base.group_size) != (self.bits, self.group_size):
            raise ValueError(f"storage {self.name} (group_size {self.group_size}) got a base of "
                             f"{base.bits} bits in groups of {base.group_size}")
        return GroupwiseLinear.from_parts(base, B, A, bias)

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        """Never called: the pipeline builds a based format's layers with ``hybrid_module``."""
        raise RuntimeError(f"storage {self.name} stores a quantized base plus a residual: "
                           f"build its layers with hybrid_module")  # a pipeline bug

    def dense_module(self, linear: nn.Linear) -> nn.Module:
        return DENSE.dense_module(linear)

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        if rank is None:
            return DENSE.skeleton(out_features, in_features, None, bias)
        return GroupwiseLinear(in_features, out_features, rank, self.bits, self.group_size, bias=bias,
                               device="meta")


class Int4Base(GroupwiseFormat):
    """int4 base (codes −8..7, scale max|w|/7.5 per group) plus a bf16 residual."""

    name = "int4"
    bits = 4


class Int3Base(GroupwiseFormat):
    """int3 base (codes −4..3, scale max|w|/3.5 per group) plus a bf16 residual."""

    name = "int3"
    bits = 3


class Int2Base(GroupwiseFormat):
    """int2 base (codes −2..1, scale max|w|/1.5 per group) plus a bf16 residual."""

    name = "int2"
    bits = 2


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    for fmt in (Int4Base, Int3Base, Int2Base):
        register(fmt)
