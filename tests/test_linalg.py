import torch

from zsfw.compression.linalg import (first_order_scores, lowrank_factors, relative_tail_energy, truncate,
                         whitened_svd, whitening_factor)


def _data(tokens=200, n=12, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return X, W, X.T @ X / tokens


def test_whitening_identity():
    X, W, C = _data()
    S = whitening_factor(C, damping=0.0).S
    assert torch.allclose(S @ S.T, C, atol=1e-10)
    assert torch.equal(S, S.tril())
    W2 = W + 0.1 * torch.randn_like(W)
    lhs = ((W - W2) @ X.T).norm() ** 2 / X.shape[0]
    rhs = ((W - W2) @ S).norm() ** 2
    assert torch.allclose(lhs, rhs, rtol=1e-10)


def test_truncation_is_best_whitened_rank_k_and_error_matches_tail():
    X, W, C = _data()
    S = whitening_factor(C, damping=0.0).S
    U, sigma, Vh = whitened_svd(W, S)
    for k in (1, 3, 7):
        B, A = lowrank_factors(U, sigma, Vh, S, k)
        assert B.shape == (8, k) and A.shape == (k, 12)
        err = ((W - B @ A) @ S).norm() / (W @ S).norm()
        assert abs(err.item() - relative_tail_energy(sigma, k)) < 1e-10
        # no other rank-k matrix does better in the whitened norm, e.g. the plain SVD's
        Bp, Ap = truncate(W, None, k)
        assert err <= ((W - Bp @ Ap) @ S).norm() / (W @ S).norm() + 1e-12
    B, A = lowrank_factors(U, sigma, Vh, S, 8)
    assert torch.allclose(B @ A, W, atol=1e-9)


def test_first_order_scores_match_explicit_formula():
    X, W, C = _data()
    S = whitening_factor(C, damping=1e-3).S
    G = torch.randn_like(W)
    U, sigma, Vh = whitened_svd(W, S)
    scores = first_order_scores(U, sigma, Vh, G, S)
    for i in range(sigma.numel()):
        removed = sigma[i] * torch.outer(U[:, i], Vh[i]) @ torch.linalg.inv(S)
        assert torch.allclose(scores[i], -(G * removed).sum(), rtol=1e-8, atol=1e-12)


def test_damping_is_raised_or_eigenvalues_clamped_for_singular_covariance():
    X, _, _ = _data(tokens=5)  # rank 5 < 12: singular
    C = X.T @ X / 5
    w = whitening_factor(C, damping=0.0)
    assert w.relative_damping > 0 or w.method == "eigh-clamped"
    assert torch.isfinite(w.S).all()
    assert (w.S.diagonal() > 0).all()


def test_whitening_is_the_cholesky_of_the_symmetrized_damped_covariance_bit_for_bit():
    X, _, C = _data()
    C = C + 1e-13 * torch.randn(C.shape, generator=torch.Generator().manual_seed(1), dtype=C.dtype)  # not symmetric
    given = C.clone()
    sym = (C + C.mT) / 2
    lam = 1e-3 * sym.diagonal().mean().item()
    assert torch.equal(whitening_factor(C, 1e-3).S, torch.linalg.cholesky(sym + lam * torch.eye(12, dtype=C.dtype)))
    assert torch.equal(C, given)  # the caller's C is left as it was
    singular = X[:5].T @ X[:5] / 5
    singular -= 1e-6 * singular.diagonal().mean() * torch.eye(12, dtype=C.dtype)  # indefinite
    w = whitening_factor(singular, 1e-9)  # fails at 1e-9 … 1e-6: each try starts from C again
    assert w.method == "cholesky" and abs(w.relative_damping - 1e-5) < 1e-12
    sym = (singular + singular.mT) / 2
    lam = w.relative_damping * sym.diagonal().mean().item()
    assert torch.equal(w.S, torch.linalg.cholesky(sym + lam * torch.eye(12, dtype=C.dtype)))
