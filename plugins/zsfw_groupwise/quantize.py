"""Group-wise symmetric weight quantization (int2..int4), RTN or GPTQ, and bit packing for disk.

Every ``group_size`` consecutive inputs of an output row share one scale. The grid is torchao's
(and llm-compressor's, GPTQ's reference) symmetric one: codes q in [−2^(b−1), 2^(b−1) − 1] and

    scale = max|w| over the group / ((2^b − 1) / 2)          (int4: max/7.5, int3: max/3.5, int2: max/1.5)

so ±max|w| lands half a step beyond the last code on either side and every weight errs by at most
half a step (no clipping beyond that: the positive maximum rounds to 2^(b−1) − 1, the negative
one to −2^(b−1)). The scale is rounded to bf16 before the weights are rounded to it, so the bf16
scales written to disk are exactly the ones the codes were chosen for, and q·scale is exact in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.bfloat16  # what is stored; held in memory as fp32 (exactly)
GPTQ_BLOCK = 128  # columns per lazy batch update (rounded up to whole groups)


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code of ``bits``-bit symmetric quantization."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_scales(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of ``weight`` (rows × group_size): max|w| / ((2^b − 1)/2), rounded to
    bf16 and returned in float64."""
    qmin, qmax = code_range(bits)
    return (weight.abs().amax(dim=-1) / ((qmax - qmin) / 2)).to(SCALE_DTYPE).double()


def round_to_grid(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (int8) of ``weight`` on the grid of ``scale`` (broadcast against it): round half to
    even, clamped to the code range; a zero scale (an all-zero group) gives zero codes."""
    qmin, qmax = code_range(bits)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (weight.double() / divisor).round().clamp(qmin, qmax).to(torch.int8)


@dataclass
class GroupwiseWeight:
    """A quantized out×in weight: int8 codes (one byte each, unpacked) and one scale per group.

    ``scale`` (out × in/group_size, fp32) holds bf16 values exactly; the weight is codes × scale.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    def dequantize(self) -> torch.Tensor:
        """The weight in fp32 (exact: a code of ≤ 4 bits times a bf16 scale fits fp32)."""
        out, n = self.qdata.shape
        groups = self.qdata.reshape(out, n // self.group_size, self.group_size).float()
        return (groups * self.scale.float()[..., None]).reshape(out, n)

    def to_torchao(self, dtype: torch.dtype = torch.float32):
        """torchao's ``IntxUnpackedToInt8Tensor`` (zero points 0) that computes as ``dtype``."""
        from torchao.quantization import IntxUnpackedToInt8Tensor

        return IntxUnpackedToInt8Tensor(
            self.qdata, self.scale.float(), torch.zeros_like(self.scale, dtype=torch.int8),
            getattr(torch, f"int{self.bits}"), (1, self.group_size), dtype, None)

    @classmethod
    def from_torchao(cls, tensor) -> "GroupwiseWeight":
        """The inverse of ``to_torchao``; refuses non-zero zero points and other block shapes."""
        if tensor.block_size[0] != 1 or bool(tensor.zero_point.ne(0).any()):
            raise ValueError(f"only symmetric per-group weights (block (1, g), zero points 0) convert, "
                             f"got block {tuple(tensor.block_size)} and non-zero zero points")
        bits = int(str(tensor.target_dtype).removeprefix("torch.int"))
        return cls(tensor.qdata, tensor.scale.float(), bits, tensor.block_size[1])


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out, n = weight.shape
    if n % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {n}")
    return weight.reshape(out, n // group_size, group_size)


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> GroupwiseWeight:
    """Round each weight to the nearest code of its group's grid (see the module docstring)."""
    groups = _grouped(weight.detach().double(), group_size)
    scale = group_scales(groups, bits)
    qdata = round_to_grid(groups, scale[..., None], bits).reshape(weight.shape)
    return GroupwiseWeight(qdata, scale.float(), bits, group_size)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  damping: float = 0.01) -> GroupwiseWeight:
    """GPTQ (Frantar et al. 2022): codes chosen column by column, each column's rounding error
    spread over the columns not yet rounded so that ‖(W − Q) X‖ is small for inputs X with
    second moment ``hessian`` (in×in, symmetric PSD, e.g. C = E[x xᵀ]; its scale is irrelevant).

    ``damping`` adds that fraction of the mean diagonal to the diagonal; inputs with a zero
    diagonal (never active) get 1 there and are simply rounded. A group's scale is taken from
    its (error-updated) weights when its first column is reached, like RTN's. Float64 throughout,
    on the weight's device; Hinv is the upper Cholesky factor of the damped H⁻¹, and updates are
    applied lazily in blocks of ``GPTQ_BLOCK`` columns (whole groups).
    """
    out, n = weight.shape
    _grouped(weight, group_size)
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    if H.shape != (n, n):
        raise ValueError(f"hessian must be {n}x{n} for a {out}x{n} weight, got {tuple(H.shape)}")
    diag = H.diagonal()
    diag[diag == 0] = 1
    diag += damping * diag.mean()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    qdata = torch.empty(out, n, dtype=torch.int8, device=W.device)
    scale = torch.empty(out, n // group_size, dtype=torch.float64, device=W.device)
    block = group_size * math.ceil(GPTQ_BLOCK / group_size)
    for start in range(0, n, block):
        end = min(start + block, n)
        W1, Hinv1 = W[:, start:end], Hinv[start:end, start:end]
        errors = torch.empty_like(W1)
        for i in range(end - start):
            column = start + i
            if column % group_size == 0:
                scale[:, column // group_size] = group_scales(W1[:, i:i + group_size], bits)
            s = scale[:, column // group_size]
            q = round_to_grid(W1[:, i], s, bits)
            qdata[:, column] = q
            err = (W1[:, i] - q.double() * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None]
            errors[:, i] = err
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return GroupwiseWeight(qdata, scale.float(), bits, group_size)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits packed back to back: ceil(numel·bits/8)."""
    return (numel * bits + 7) // 8


def pack(qdata: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of ``qdata`` (int8, any shape) as one flat uint8 tensor of ``packed_bytes``: each
    code offset to unsigned (q + 2^(b−1)), its ``bits`` bits least-significant first, codes in
    row-major order, the last byte padded with zero bits. Storage only: nothing computes on it."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=qdata.device)
    unsigned = (qdata.reshape(-1).to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8)
    stream = ((unsigned[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = torch.arange(8, dtype=torch.uint8, device=qdata.device)
    return (stream.view(-1, 8) << weights).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The int8 codes of shape ``shape`` that ``pack`` stored in ``packed``."""
    numel = math.prod(shape)
    if packed.shape != (packed_bytes(numel, bits),):
        raise ValueError(f"{bits}-bit codes of shape {tuple(shape)} take {packed_bytes(numel, bits)} "
                         f"packed bytes, got a tensor of shape {tuple(packed.shape)}")
    positions = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> positions) & 1).reshape(-1)[:numel * bits].view(numel, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=packed.device)
    unsigned = (stream << shifts).sum(dim=1, dtype=torch.uint8)
    return (unsigned.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8).view(shape)
