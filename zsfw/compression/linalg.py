"""Whitening, whitened SVD, first-order scores and truncation, in float64.

Notation follows docs/how-it-works.md (sections "Whitening", "The whitened SVD", "Scores"): W is
out×in (y = W x), C = E[x xᵀ] the input second moment, S the lower-triangular factor with
S Sᵀ = C + damping. Then ‖(W − W')X‖ = ‖(W − W')S‖ for the
calibration inputs, so the best rank-k layer is the truncated SVD of W S mapped back by S⁻¹.
``S is None`` means no whitening (plain SVD of W). No explicit inverse is ever formed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from zsfw.budget import dropped

log = logging.getLogger(__name__)


@dataclass
class Whitening:
    """A whitening factor and how it was obtained (for the report)."""

    S: torch.Tensor  # lower-triangular, float64
    relative_damping: float  # damping added to the diagonal, relative to mean(diag C)
    method: str  # "cholesky" or "eigh-clamped"


def whitening_factor(C: torch.Tensor, damping: float = 1e-4, max_tries: int = 6) -> Whitening:
    """Lower-triangular S with S Sᵀ = C + λ I, λ = damping × mean(diag C).

    On a failed Cholesky the damping grows tenfold per try; if that never succeeds, the
    eigenvalues of C are clamped to λ and the result is factorized instead. At most two n×n
    matrices are alive at once (C symmetrized and damped in place, S): a caller that hands over
    its only reference to C frees it here.
    """
    sym = C.to(torch.float64) + C.mT
    del C
    C = sym.mul_(0.5)  # (C + Cᵀ)/2, exactly
    diagonal = C.diagonal().clone()
    scale = diagonal.mean().clamp_min(torch.finfo(torch.float64).tiny).item()
    rel = damping
    for _ in range(max_tries):
        C.diagonal().copy_(diagonal).add_(rel * scale)  # C + λI, in place
        S, info = torch.linalg.cholesky_ex(C)
        if info.item() == 0:
            return Whitening(S, rel, "cholesky")
        del S
        rel = rel * 10 if rel > 0 else 1e-10
    C.diagonal().copy_(diagonal)
    evals, evecs = torch.linalg.eigh(C)
    clamped = (evecs * evals.clamp_min(max(damping, 1e-8) * scale)) @ evecs.mT
    S = torch.linalg.cholesky((clamped + clamped.mT) / 2)
    return Whitening(S, damping, "eigh-clamped")


def whiten(W: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """W S in float64 (W itself when not whitening)."""
    W = W.to(torch.float64)
    return W if S is None else W @ S


def unwhiten(M: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
    """M S⁻¹ by a triangular solve."""
    if S is None:
        return M
    return torch.linalg.solve_triangular(S, M, upper=False, left=False)


def whitened_svd(W: torch.Tensor, S: torch.Tensor | None):
    """U, σ (descending), Vᵀ of W S, all float64 (thin: r = min(out, in) components).

    Computed from the eigendecomposition of the smaller Gram matrix (3–4× faster than an SVD
    on CPU). In float64 this squares the condition number into a still-tiny error: components
    with σ_i/σ_1 above ~1e-6 come out accurate to ~1e-10; below that, σ is clamped at zero and
    the component's vectors are zero, which only matters to components that are dropped first.
    """
    A = whiten(W, S)
    tall = A.shape[0] >= A.shape[1]
    evals, vecs = torch.linalg.eigh(A.mT @ A if tall else A @ A.mT)
    evals, vecs = evals.flip(0), vecs.flip(1)  # descending
    sigma = evals.clamp_min(0).sqrt()
    tiny = sigma <= sigma[0] * 1e-7 if sigma.numel() else sigma.bool()
    inv = torch.where(tiny, torch.zeros_like(sigma), 1 / sigma.masked_fill(tiny, 1))
    sigma = sigma.masked_fill(tiny, 0)
    if tall:
        return (A @ vecs).mul_(inv), sigma, vecs.mT
    return vecs, sigma, (vecs.mT @ A).mul_(inv[:, None])


def first_order_scores(
    U: torch.Tensor, sigma: torch.Tensor, Vh: torch.Tensor, G: torch.Tensor, S: torch.Tensor | None
) -> torch.Tensor:
    """ΔL_i = −σ_i u_iᵀ (G S⁻ᵀ) v_i: first-order loss change of setting σ_i to zero."""
    H = G.to(torch.float64)
    if S is not None:  # the float64 copy of G is freed as soon as H exists
        H = torch.linalg.solve_triangular(S.mT, H, upper=True, left=False)
    return -sigma * (U.mT @ H).mul_(Vh).sum(dim=1)


def lowrank_factors(
    U: torch.Tensor, sigma: torch.Tensor, Vh: torch.Tensor, S: torch.Tensor | None,
    kept: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_k Σ_k^½ (out×k) and A = Σ_k^½ V_kᵀ S⁻¹ (k×in), so that B A ≈ W.

    ``kept`` is the rank k (the top k components) or the indices of the components to keep.
    """
    index = slice(None, kept) if isinstance(kept, int) else kept
    root = sigma[index].sqrt()
    B = U[:, index].to(torch.float64) * root
    A = unwhiten(root[:, None] * Vh[index].to(torch.float64), S)
    return B, A


def truncate(W: torch.Tensor, S: torch.Tensor | None, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the best rank-``rank`` approximation of W in the whitened norm."""
    U, sigma, Vh = whitened_svd(W, S)
    return lowrank_factors(U, sigma, Vh, S, rank)


def relative_tail_energy(sigma: torch.Tensor, kept: int | torch.Tensor) -> float:
    """‖W S − (W S)_kept‖_F / ‖W S‖_F: the whitened reconstruction error when the top ``kept``
    components (or the components of index ``kept``) are kept."""
    energy = sigma.to(torch.float64).square()
    total = energy.sum()
    return 0.0 if total == 0 else (energy[dropped(sigma.numel(), kept).to(energy.device)].sum() / total).sqrt().item()
