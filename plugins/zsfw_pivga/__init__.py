"""The ``pivga`` storage format: low-rank factors with their gauge fixed by pivot columns.

W ≈ B A = (B G)(G⁻¹ A) for any invertible k×k G, so k² of the k(m+n) numbers of plain factors are
redundant. Choosing k columns J of the rank-k weight W_k = B A fixes G = A_J (the columns J of A):

    W_k = W_k[:, J] · [I  T] · P,   T = A_J⁻¹ A[:, Jᶜ]  (k×(n−k)),   W_k[:, J] = B A_J  (m×k)

with P the permutation that puts J first. That is an interpolative decomposition of W_k. It stores
k(m+n) − k² numbers and k column indices instead of k(m+n), so its cost reaches the dense cost only
at rank ≈ min(m, n), not at mn/(m+n): at the same bytes a layer keeps more rank.

J is chosen on an orthonormal basis Q of A's row space (T = Q_J⁻¹ Q_Jᶜ is the same matrix for every
basis of that space): LU with partial pivoting gives a first J, and maxvol swaps then make every
|T_ij| ≤ 1 + ``MAXVOL_TOLERANCE``. What is stored is therefore k of W_k's own columns and
coefficients of magnitude ≤ 1: rounding them to bf16 errs like rounding W_k itself, with no
ill-conditioned solve to fall back from, even when A is rank-deficient (σ = 0 components kept).

A reconstruction from the abstract of arXiv 2512.03062 ("pivot-based gauge fixing"), not the
authors' code, which is not public.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import zsfw
from zsfw import StoredLinear, weight_as

MAXVOL_TOLERANCE = 0.01
HOST = torch.device("cpu")  # where gauge fixing and rounding run by default (``PivGaLinear.from_factors``)
ROUNDING_BLOCK = 64  # rows of T rounded between two updates of the rows after them
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
SCALE_DTYPE = torch.float32  # int8: one scale per row of B' and of T


def index_dtype(in_features: int) -> torch.dtype:
    """int16 when every column index fits in it, else int32."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def lu_pivots(Q: torch.Tensor) -> torch.Tensor:
    """The k columns of ``Q`` (k×n) that LU with partial pivoting of Qᵀ takes as its pivot rows."""
    k, n = Q.shape
    _, swaps = torch.linalg.lu_factor(Q.T)
    order = list(range(n))
    for i, p in enumerate(swaps.tolist()):  # LAPACK's sequential row swaps, 1-based
        order[i], order[p - 1] = order[p - 1], order[i]
    return torch.tensor(order[:k])


def dominant_columns(Q: torch.Tensor, tolerance: float = MAXVOL_TOLERANCE) -> torch.Tensor:
    """k columns J of ``Q`` (k×n, orthonormal rows) with |Q_J⁻¹ Q| ≤ 1 + ``tolerance`` everywhere
    (maxvol: each swap grows |det Q_J| by more than 1 + tolerance, so it ends). Sorted."""
    k, n = Q.shape
    J = lu_pivots(Q)
    coefficients = torch.linalg.solve(Q[:, J], Q)  # k×n, the identity at the columns J
    magnitude = torch.empty_like(coefficients)
    for _ in range(64 * k):
        i, j = divmod(int(torch.abs(coefficients, out=magnitude).argmax()), n)
        pivot = float(coefficients[i, j])
        if abs(pivot) <= 1 + tolerance:
            break
        leaving = coefficients[:, j].clone()
        leaving[i] -= 1
        coefficients.addr_(leaving, coefficients[i].clone(), alpha=-1 / pivot)  # column j replaces pivot i
        J[i] = j
    return J.sort().values


def gauge_fix(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(J, B', T), float64, with B A = B' [I T] P exactly (P puts the columns J first):
    J sorted pivot columns, B' = B A_J (m×k, = (BA)[:, J]), T = A_J⁻¹ A[:, Jᶜ] (k×(n−k))."""
    B, A = B.to(torch.float64), A.to(torch.float64)
    k, n = A.shape
    Q = torch.linalg.qr(A.T).Q.T  # k×n orthonormal rows spanning A's row space
    J = dominant_columns(Q)
    rest = complement(J, n)
    T = torch.linalg.solve(Q[:, J], Q[:, rest])
    return J, B @ A[:, J], T


def least_squares(A: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The minimum-norm X minimizing ‖A X − Y‖, from A's SVD with the singular values at most
    max(A's sizes) · eps · σ₁ taken as zero (LAPACK's gelsd with ``torch.linalg.lstsq``'s cutoff):
    exact and rank-safe on every device. ``lstsq`` on CUDA has only gels, which assumes A has full
    rank (wrong values or NaN for a singular A), and its CPU default gelsy may start from stale
    pivots and miss the rank (pytorch/pytorch#187411)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    cutoff = max(A.shape) * torch.finfo(A.dtype).eps * S[:1]
    inverse = torch.where(S > cutoff, 1 / S, torch.zeros_like(S))
    return Vh.mT @ (inverse.unsqueeze(-1) * (U.mT @ Y))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one fp32 scale per row (the row's largest magnitude → 127)."""
    scale = (x.abs().amax(dim=-1) / 127).to(SCALE_DTYPE).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    return (x / scale.to(x.dtype).unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8), scale


def on_grid(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) rounded to what ``dtype`` stores, as float64: the nearest bf16/fp16 value,
    or for int8 the row's own grid (``quantize_rows``; rounding a value already on it changes
    nothing, so the stored int8 and scales come back exactly)."""
    if dtype != torch.int8:
        return x.to(dtype).to(torch.float64)
    q, scale = quantize_rows(x)
    return q.to(torch.float64) * scale.to(torch.float64).unsqueeze(-1)


def rounded(B_J: torch.Tensor, T: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """B' and T on ``dtype``'s grid (float64 values, ``on_grid``) with B'_r T_r close to B' T: B' is
    rounded, T refit to the rounded B' (least squares) and rounded one row at a time, each row's
    rounding error pushed onto the rows after it in the metric H = B'_rᵀ B'_r (GPTQ's error
    feedback). On SmolLM2's layers that cuts the error of rounding B' and T as they are by a third."""
    B_r = on_grid(B_J, dtype)
    T = least_squares(B_r, B_J @ T)  # the refit (rank-revealing: B' may be singular)
    H = B_r.T @ B_r  # damped only for the feedback's direction, which changes no exact result
    H.diagonal().add_(1e-10 * float(H.diagonal().mean()) + torch.finfo(torch.float64).tiny)
    feedback = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for start in range(0, T.shape[0], ROUNDING_BLOCK):  # rows in blocks, the rest updated once a block
        end = min(start + ROUNDING_BLOCK, T.shape[0])
        block, errors = T[start:end], torch.empty_like(T[start:end])
        for i in range(end - start):
            row = on_grid(block[i], dtype)
            errors[i] = (block[i] - row) / feedback[start + i, start + i]
            block[i + 1:] -= torch.outer(feedback[start + i, start + i + 1:end], errors[i])
            block[i] = row
        T[end:] -= feedback[start:end, end:].T @ errors
    return B_r, T


def complement(J: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices of 0..n−1 not in ``J``."""
    mask = torch.ones(n, dtype=torch.bool, device=J.device)
    mask[J.long()] = False
    return mask.nonzero().squeeze(1)


class PivGaLinear(nn.Module):
    """A rank-k layer in gauge-fixed form: y = B' (x_J + T x_Jᶜ) + b, no scatter.

    ``state_dict`` keys:

        <name>.pivots  int16 (int32 past 32767 inputs)  (rank,)       sorted input columns J
        <name>.B       dtype  (out_features, rank)                     the columns J of the weight
        <name>.T       dtype  (rank, in_features − rank)              interpolation coefficients
        <name>.bias    dtype  (out_features,)                          only with a bias

    The input permutation (J, then Jᶜ) is rebuilt from ``pivots`` after every load, not saved.
    """

    cast_weights = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 1..{min(in_features, out_features)} for a "
                             f"{out_features}x{in_features} layer, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.register_buffer("pivots", torch.arange(rank, dtype=index_dtype(in_features), device=device))
        self.register_buffer("B", torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.register_buffer("T", torch.zeros(rank, in_features - rank, dtype=dtype, device=device))
        self.register_buffer("bias", None if not bias else torch.zeros(out_features, dtype=dtype, device=device))
        self.register_buffer("order", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.index())
        if self.pivots.device.type != "meta":
            self.index()

    @classmethod
    def from_factors(cls, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype, device: torch.device | str = HOST) -> "PivGaLinear":
        """Gauge-fix B (out×rank) A (rank×in) in float64, then round to ``dtype`` (``rounded``),
        both on ``device``; the module is made where A is. By default that work runs on the host:
        maxvol's swaps and the row-by-row rounding read a value back at every step (a device→host
        sync each on an accelerator), and the problem is only rank × (out + in)."""
        (m, k), n = B.shape, A.shape[1]
        module = cls(n, m, k, bias=bias is not None, device=A.device, dtype=dtype)
        J, B_J, T = gauge_fix(B.to(device), A.to(device))
        module.pivots.copy_(J)
        module.store(*rounded(B_J, T, dtype))
        if bias is not None:
            module.bias.copy_(bias)
        module.index()
        return module

    def store(self, B: torch.Tensor, T: torch.Tensor) -> None:
        """Keep B' and T (float64 values already on the dtype's grid)."""
        self.B.copy_(B)
        self.T.copy_(T)

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B' and T in the activations' dtype (unless ``cast_weights`` is off)."""
        return weight_as(self.B, x, self.cast_weights), weight_as(self.T, x, self.cast_weights)

    def index(self) -> None:
        """Rebuild the input permutation (pivots first) the forward gathers with."""
        J = self.pivots.long()
        self.order = torch.cat([J, complement(J, self.in_features)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.rank
        B, T = self.weights(x)
        permuted = x.index_select(-1, self.order)
        h = permuted[..., :k] + F.linear(permuted[..., k:], T)
        bias = None if self.bias is None else weight_as(self.bias, x, self.cast_weights)
        return F.linear(h, B, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}, pivga")


class PivGaInt8Linear(PivGaLinear):
    """``PivGaLinear`` with B' and T in int8, one fp32 scale per row of each (T's entries are
    ≤ 1.01 in magnitude, so its rows share a narrow range); the bias in bf16. Extra keys:
    ``B_scale`` (out_features,) and ``T_scale`` (rank,)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.int8) -> None:
        super().__init__(in_features, out_features, rank, bias=False, device=device, dtype=torch.int8)
        self.register_buffer("B_scale", torch.ones(out_features, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("T_scale", torch.ones(rank, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", None if not bias else torch.zeros(out_features, dtype=torch.bfloat16,
                                                                         device=device))

    def store(self, B: torch.Tensor, T: torch.Tensor) -> None:
        for (q, scale), values, scales in ((quantize_rows(B), self.B, self.B_scale),
                                           (quantize_rows(T), self.T, self.T_scale)):
            values.copy_(q)
            scales.copy_(scale)

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.B.to(x.dtype) * self.B_scale.to(x.dtype)[:, None],
                self.T.to(x.dtype) * self.T_scale.to(x.dtype)[:, None])


class PivGaFactors:
    """PivGa: pivot gauge-fixed factors, k² fewer numbers (reconstructed from arXiv 2512.03062's abstract).

    Factors in bf16 (default), fp16, or int8 (one fp32 scale per row of B' and of T, bias in
    bf16); layers left dense stay in bf16/fp16 (bf16 for int8)."""

    name: ClassVar[str] = "pivga"

    def __init__(self, dtype: str = "bf16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = DTYPES[dtype]
        self.module = PivGaInt8Linear if self.dtype == torch.int8 else PivGaLinear
        self.dense_dtype = torch.bfloat16 if self.dtype == torch.int8 else self.dtype

    def lowrank_bytes(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        numbers = rank * (out_features + in_features) - rank * rank
        index = rank * torch.empty((), dtype=index_dtype(in_features)).element_size()
        bias_bytes = (out_features if bias else 0) * self.dense_dtype.itemsize
        scales = (out_features + rank) * SCALE_DTYPE.itemsize if self.dtype == torch.int8 else 0
        return numbers * self.dtype.itemsize + index + bias_bytes + scales

    def dense_bytes(self, out_features: int, in_features: int, bias: bool) -> int:
        return (out_features * in_features + (out_features if bias else 0)) * self.dense_dtype.itemsize

    def lowrank_module(self, B: torch.Tensor, A: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        return self.module.from_factors(B, A, bias, self.dtype)

    def dense_module(self, linear: nn.Linear) -> nn.Module:
        if linear.weight.dtype == self.dense_dtype:
            return linear
        return StoredLinear.from_linear(linear, self.dense_dtype)

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool) -> nn.Module:
        with torch.device("meta"):
            if rank is None:
                return StoredLinear(in_features, out_features, bias=bias, dtype=self.dense_dtype)
            return self.module(in_features, out_features, rank, bias=bias, dtype=self.dtype)


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    register(PivGaFactors)
