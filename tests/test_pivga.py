"""The pivga storage format: exact gauge fixing, bounded coefficients, bf16 error, bytes, options."""

import pytest
import torch

import zsfw
from zsfw.checkpoint.save import module_tensors
from zsfw.errors import PluginError
from zsfw_pivga import MAXVOL_TOLERANCE, PivGaLinear, gauge_fix


def _factors(m, n, k, seed=0, decay=3.0):
    """Random float64 factors whose spectrum spans ``decay`` decades (like whitened SVD factors)."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, k, dtype=torch.float64, generator=g)
    A = torch.randn(k, n, dtype=torch.float64, generator=g) * torch.logspace(0, -decay, k, dtype=torch.float64)[:, None]
    return B, A


def _dense(module, n):
    """The out×in weight a layer computes (float64 input: every product exact to float64)."""
    return module(torch.eye(n, dtype=torch.float64)).T


@pytest.mark.parametrize("shape", [(48, 32, 12), (32, 48, 12), (40, 40, 39), (30, 50, 30), (64, 16, 1)])
def test_gauge_fixed_factors_reproduce_the_weight_exactly_in_float64(shape):
    m, n, k = shape
    B, A = _factors(m, n, k)
    J, B_J, T = gauge_fix(B, A)
    assert J.shape == (k,) and torch.equal(J, J.sort().values) and J.unique().numel() == k
    assert B_J.shape == (m, k) and T.shape == (k, n - k)
    assert T.abs().max() <= 1 + MAXVOL_TOLERANCE + 1e-12  # maxvol: every coefficient bounded
    assert torch.allclose(B_J, (B @ A)[:, J], rtol=0, atol=1e-12)  # B' = the weight's own columns
    module = PivGaLinear.from_factors(B, A, None, torch.float64)
    W = B @ A
    assert ((_dense(module, n) - W).norm() / W.norm()).item() < 1e-12


def test_a_rank_deficient_factor_is_still_exact():
    B, A = _factors(40, 30, 10)
    A[3] = 0  # a kept component with σ = 0: A_J of the raw factor would be singular
    A[7] = A[2]
    module = PivGaLinear.from_factors(B, A, None, torch.float64)
    W = B @ A
    assert ((_dense(module, 30) - W).norm() / W.norm()).item() < 1e-12
    assert module.T.abs().max() <= 1 + MAXVOL_TOLERANCE + 1e-12


@pytest.mark.parametrize("shape", [(576, 1536, 400), (1536, 576, 500), (96, 96, 80)])
def test_bf16_error_is_of_the_order_of_rounding_plain_bf16_factors(shape):
    m, n, k = shape
    B, A = _factors(m, n, k, seed=1)
    W = B @ A
    pivga = zsfw.plugins.create("storage", "pivga").lowrank_module(B, A, None)
    plain = B.bfloat16().double() @ A.bfloat16().double()
    error = ((_dense(pivga, n) - W).norm() / W.norm()).item()
    plain_error = ((plain - W).norm() / W.norm()).item()
    assert error < 1.5 * plain_error and error < 2 ** -7, (error, plain_error)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(48, 32, 12), (32, 48, 20), (40, 40, 39)])
def test_predicted_bytes_are_the_stored_bytes_and_the_keys_are_stable(shape, bias):
    m, n, k = shape
    fmt = zsfw.plugins.create("storage", "pivga", {"dtype": "fp16"})
    B, A = _factors(m, n, k)
    module = fmt.lowrank_module(B, A, torch.randn(m, dtype=torch.float64) if bias else None)
    tensors, _ = module_tensors("layer", module)
    assert sum(t.nbytes for t in tensors.values()) == fmt.lowrank_bytes(m, n, k, bias)
    assert fmt.lowrank_bytes(m, n, k, bias) == 2 * (k * (m + n) - k * k + (m if bias else 0)) + 2 * k
    assert {key.split(".", 1)[1] for key in tensors} == {"pivots", "B", "T", *(["bias"] if bias else [])}
    assert tensors["layer.B"].dtype == torch.float16 and tensors["layer.pivots"].dtype == torch.int16
    skeleton = fmt.skeleton(m, n, k, bias)
    assert {name: t.shape for name, t in skeleton.state_dict().items()} == \
           {key.split(".", 1)[1]: t.shape for key, t in tensors.items()}


def test_wide_inputs_use_int32_pivots_and_cost_them():
    fmt = zsfw.plugins.create("storage", "pivga")
    narrow, wide = fmt.skeleton(8, 32767, 4, False), fmt.skeleton(8, 32768, 4, False)
    assert narrow.pivots.dtype == torch.int16 and wide.pivots.dtype == torch.int32
    assert fmt.lowrank_bytes(8, 32768, 4, False) - 2 * (4 * (8 + 32768) - 16) == 4 * 4


def test_pivga_keeps_more_rank_than_bf16_at_the_same_bytes():
    from zsfw.budget import useful_rank

    pivga, bf16 = (zsfw.plugins.create("storage", name) for name in ("pivga", "bf16"))
    for m, n, more in ((576, 576, 1.35), (1536, 576, 1.2), (576, 1536, 1.2)):
        # break-even: bf16 at mn/(m+n); pivga where (m − k)(n − k) = k (one 2-byte index a rank)
        assert useful_rank(bf16, m, n, False) < m * n / (m + n) <= useful_rank(bf16, m, n, False) + 1
        assert useful_rank(pivga, m, n, False) == max(k for k in range(min(m, n)) if (m - k) * (n - k) > k)
        assert useful_rank(pivga, m, n, False) > 0.95 * min(m, n)
        k = int(0.8 * m * n / (m + n))  # ratio 0.8 of a layer as bf16 factors
        same_bytes = max(r for r in range(1, min(m, n)) if pivga.lowrank_bytes(m, n, r, False)
                         <= bf16.lowrank_bytes(m, n, k, False))
        assert same_bytes > more * k  # ≈ 38% more rank for a square layer at ratio 0.8


def test_a_reloaded_module_computes_the_same_outputs():
    B, A = _factors(24, 40, 10)
    module = PivGaLinear.from_factors(B, A, torch.randn(24, dtype=torch.float64), torch.bfloat16)
    clone = zsfw.plugins.create("storage", "pivga").skeleton(24, 40, 10, True)
    clone.load_state_dict(module.state_dict(), assign=True)
    x = torch.randn(3, 5, 40)
    assert torch.equal(clone(x), module(x))


@pytest.mark.parametrize("shape", [(576, 1536, 400), (96, 96, 80)])
def test_int8_error_is_of_the_order_of_int8_factors_with_row_scales(shape):
    from zsfw_packed import quantize_symmetric

    m, n, k = shape
    B, A = _factors(m, n, k, seed=2)
    W = B @ A
    pivga = zsfw.plugins.create("storage", "pivga", {"dtype": "int8"}).lowrank_module(B, A, None)
    assert pivga.B.dtype == pivga.T.dtype == torch.int8
    (qB, sB), (qA, sA) = quantize_symmetric(B, 1), quantize_symmetric(A, 1)
    plain = (qB.double() * sB.double()[:, None]) @ (qA.double() * sA.double()[:, None])
    error = ((_dense(pivga, n) - W).norm() / W.norm()).item()
    plain_error = ((plain - W).norm() / W.norm()).item()
    assert error < 1.5 * plain_error and error < 2 ** -5, (error, plain_error)


@pytest.mark.parametrize("bias", [False, True])
def test_int8_bytes_are_the_stored_bytes_and_a_reload_computes_the_same(bias):
    m, n, k = 40, 56, 12
    fmt = zsfw.plugins.create("storage", "pivga", {"dtype": "int8"})
    B, A = _factors(m, n, k)
    module = fmt.lowrank_module(B, A, torch.randn(m, dtype=torch.float64) if bias else None)
    tensors, _ = module_tensors("layer", module)
    assert sum(t.nbytes for t in tensors.values()) == fmt.lowrank_bytes(m, n, k, bias)
    assert fmt.lowrank_bytes(m, n, k, bias) == k * (m + n) - k * k + 2 * k + 4 * (m + k) + (2 * m if bias else 0)
    assert fmt.dense_bytes(m, n, bias) == 2 * (m * n + (m if bias else 0))  # dense layers stay bf16
    clone = fmt.skeleton(m, n, k, bias)
    clone.load_state_dict(module.state_dict(), assign=True)
    x = torch.randn(3, n)
    assert torch.equal(clone(x), module(x))


def test_on_grid_values_come_back_exactly_as_the_stored_int8():
    from zsfw_pivga import on_grid, quantize_rows

    x = torch.randn(7, 33, dtype=torch.float64)
    snapped = on_grid(x, torch.int8)
    assert torch.equal(on_grid(snapped, torch.int8), snapped)
    q, scale = quantize_rows(snapped)
    assert torch.equal(q.double() * scale.double()[:, None], snapped)


def test_a_bad_dtype_option_is_one_line_naming_the_choices():
    with pytest.raises(PluginError, match=r"pivga.*dtype must be one of \['bf16', 'fp16', 'int8'\], got 'int4'"):
        zsfw.plugins.create("storage", "pivga", {"dtype": "int4"})


def test_least_squares_gives_the_exact_minimum_norm_solutions_of_small_cases():
    from zsfw_pivga import least_squares

    cases = [([[1, 0], [0, 2], [0, 0]], [[3], [4], [9]], [[3], [2]]),  # full rank: the residual is (0, 0, 9)
             ([[1, 1], [1, 1], [0, 0]], [[2], [4], [5]], [[1.5], [1.5]]),  # rank 1: x1 + x2 = 3, split evenly
             ([[2, 0], [0, 0], [0, 0]], [[4], [7], [1]], [[2], [0]])]  # a zero column: its x is 0
    for A, Y, X in cases:
        A, Y, X = (torch.tensor(v, dtype=torch.float64) for v in (A, Y, X))
        assert torch.allclose(least_squares(A, Y), X, rtol=0, atol=1e-14)


@pytest.mark.parametrize("deficient", [False, True])
def test_least_squares_is_what_lapack_gives_on_a_cpu(deficient):
    # the refit's solve runs the same code on every device; torch.linalg.lstsq on CUDA (gels only)
    # assumes full rank; on a CPU gelsd takes the minimum-norm solution (gelsy, the default, may
    # miss the rank: pytorch/pytorch#187411)
    from zsfw_pivga import least_squares

    g = torch.Generator().manual_seed(3)
    A, Y = torch.randn(30, 12, dtype=torch.float64, generator=g), torch.randn(30, 7, dtype=torch.float64, generator=g)
    if deficient:
        A[:, 5], A[:, 8] = A[:, 2], 0
    X = least_squares(A, Y)
    assert torch.isfinite(X).all()
    expected = torch.linalg.lstsq(A, Y, driver="gelsd").solution
    assert torch.allclose(X, expected, rtol=0, atol=1e-12 * float(expected.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_rounding_a_singular_b_prime_is_finite_and_keeps_its_product(dtype):
    from zsfw_pivga import on_grid, rounded

    g = torch.Generator().manual_seed(4)
    B_J, T = torch.randn(40, 10, dtype=torch.float64, generator=g), torch.rand(10, 20, dtype=torch.float64, generator=g)
    B_J[:, 3], B_J[:, 6] = 0, B_J[:, 1]  # B' = B A_J of a rank-deficient A: singular
    with pytest.raises(torch.linalg.LinAlgError, match="full rank"):  # gels, lstsq's one CUDA driver
        torch.linalg.lstsq(on_grid(B_J, dtype), B_J @ T, driver="gels")
    B_r, T_r = rounded(B_J, T, dtype)
    assert torch.isfinite(B_r).all() and torch.isfinite(T_r).all()
    W = B_J @ T
    assert ((B_r @ T_r - W).norm() / W.norm()).item() < 2 ** -5


def _maxvol_reference(Q, tolerance=MAXVOL_TOLERANCE):
    """maxvol as defined: from LU's pivot columns, swap in the largest |coefficient| of Q_J⁻¹ Q,
    solved again from scratch at every step, until none exceeds 1 + tolerance."""
    P = torch.linalg.lu(Q.T).P  # Qᵀ = P L U: the rows P puts first are the pivots
    J = P.argmax(dim=0)[:Q.shape[0]].clone()
    while True:
        coefficients = torch.linalg.solve(Q[:, J], Q)
        i, j = divmod(int(coefficients.abs().argmax()), Q.shape[1])
        if abs(float(coefficients[i, j])) <= 1 + tolerance:
            return J.sort().values
        J[i] = j


def _rounded_reference(B_J, T, dtype):
    """B' on the grid, T refit by LAPACK's minimum-norm least squares and rounded one row at a
    time, each row's error pushed onto every row after it at once (no blocks)."""
    from zsfw_pivga import on_grid

    B_r = on_grid(B_J, dtype)
    T = torch.linalg.lstsq(B_r, B_J @ T, driver="gelsd").solution
    H = B_r.T @ B_r
    H.diagonal().add_(1e-10 * float(H.diagonal().mean()) + torch.finfo(torch.float64).tiny)
    feedback = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i in range(T.shape[0]):
        row = on_grid(T[i], dtype)
        T[i + 1:] -= torch.outer(feedback[i, i + 1:], (T[i] - row) / feedback[i, i])
        T[i] = row
    return B_r, T


@pytest.mark.parametrize("shape", [(48, 32, 12), (96, 96, 80), (160, 100, 70)])
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_pivots_and_stored_factors_are_those_of_the_slow_references(shape, dtype):
    # bit-identical: the gauge fixing and rounding run on the host, as a CPU run always did
    (m, n, k), storage = shape, zsfw.plugins.create("storage", "pivga", {"dtype": dtype})
    B, A = _factors(m, n, k, seed=5)
    module = storage.lowrank_module(B, A, None)
    Q = torch.linalg.qr(A.T).Q.T
    J = _maxvol_reference(Q)
    rest = torch.tensor(sorted(set(range(n)) - set(J.tolist())))
    B_r, T_r = _rounded_reference((B @ A)[:, J], torch.linalg.solve(Q[:, J], Q[:, rest]), storage.dtype)
    assert torch.equal(module.pivots.long(), J)
    B_stored, T_stored = module.weights(torch.zeros(1, dtype=torch.float64))  # the values on the grid
    assert torch.equal(B_stored, B_r) and torch.equal(T_stored, T_r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_factors_on_a_gpu_are_fixed_on_the_host_and_stored_on_the_gpu():
    B, A = _factors(96, 96, 80, seed=5)
    on_cpu = PivGaLinear.from_factors(B, A, None, torch.bfloat16)
    on_gpu = PivGaLinear.from_factors(B.cuda(), A.cuda(), None, torch.bfloat16)
    assert on_gpu.B.is_cuda and on_gpu.order.is_cuda
    assert all(torch.equal(t.cpu(), on_cpu.state_dict()[name]) for name, t in on_gpu.state_dict().items())
