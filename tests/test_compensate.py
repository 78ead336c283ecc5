"""Sequential error compensation: the paired moments of the uncompressed and compressed models'
inputs, the ridge solution truncated in its own metric, and the corrector built on them."""

import copy

import pytest
import torch

import zsfw
from helpers import patterned_windows, recipe, stored_bytes
from zsfw.compression.linalg import truncate, whitening_factor
from zsfw.compression.sequential import paired_moments
from zsfw_compensate import compensated


def _problem(tokens=300, n=10, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    X_hat = X + 0.3 * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, X, X_hat, X.T @ X_hat / tokens, X_hat.T @ X_hat / tokens


def _objective(Z, W, X, X_hat, lam):
    """E‖W x − Z x̂‖² + λ‖Z − W‖²_F over the rows of X and X̂."""
    return ((X @ W.T - X_hat @ Z.T).square().sum(dim=1).mean() + lam * (Z - W).square().sum()).item()


@pytest.mark.parametrize("shrink", [1e-3, 0.1, 1.0])
def test_compensation_is_the_ridge_solution_truncated_in_its_own_metric(shrink):
    W, X, X_hat, cross, own = _problem()
    lam = shrink * own.diagonal().mean().item()
    T = X.shape[0]
    # the ridge solution by least squares on the stacked system [X̂ ; √(Tλ) I] Zᵀ = [X Wᵀ ; √(Tλ) Wᵀ]
    lhs = torch.cat([X_hat, (T * lam) ** 0.5 * torch.eye(10, dtype=torch.float64)])
    rhs = torch.cat([X @ W.T, (T * lam) ** 0.5 * W.T])
    Z_star = torch.linalg.lstsq(lhs, rhs).solution.T
    B, A = compensated(W, cross, own, shrink, 6)  # full rank (6 outputs): no truncation
    assert torch.allclose(B @ A, Z_star, rtol=1e-9, atol=1e-10)
    S = whitening_factor(own, shrink).S
    optimum = _objective(Z_star, W, X, X_hat, lam)
    for k in (1, 3):
        B, A = compensated(W, cross, own, shrink, k)
        Z = B @ A
        assert B.shape == (6, k) and A.shape == (k, 10)
        assert abs(_objective(Z, W, X, X_hat, lam) - optimum - ((Z - Z_star) @ S).square().sum().item()) < 1e-9
        for other in (truncate(Z_star, None, k), truncate(W, S, k), truncate(Z_star, torch.eye(10, dtype=torch.float64), k)):
            assert _objective(Z, W, X, X_hat, lam) <= _objective(other[0] @ other[1], W, X, X_hat, lam) + 1e-12


def test_with_unchanged_inputs_compensation_is_the_whitened_truncation():
    W, X, _, _, C = _problem()
    own = X.T @ X / X.shape[0]
    B, A = compensated(W, own, own, 1e-2, 3)
    Bt, At = truncate(W, whitening_factor(own, 1e-2).S, 3)
    assert torch.allclose(B @ A, Bt @ At, rtol=1e-9, atol=1e-10)


def _inputs(model, name, windows) -> torch.Tensor:
    """Every input of layer ``name`` over ``windows`` from whole-model runs, tokens × in."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for w in windows.split(2):
            model(input_ids=w)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]).to(torch.float64)


def _lowrank_copy(model, names):
    """``model`` with the weights of ``names`` replaced by a rank-2 truncation (a stand-in for a compressed model)."""
    student = copy.deepcopy(model)
    for name in names:
        linear = student.get_submodule(name)
        B, A = truncate(linear.weight.detach(), None, 2)
        linear.weight.data = (B @ A).to(linear.weight.dtype)
    return student


def test_paired_moments_are_those_of_the_two_whole_models_group_by_group(llama, windows):
    names = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    student = _lowrank_copy(llama, names)
    seen = list(paired_moments(student, llama, names, windows, batch_size=2))
    per_layer = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                 ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert [(p.layer, p.names, p.last) for p in seen] == [
        (i, [f"model.layers.{i}.{n}" for n in group], g == 3) for i in range(2) for g, group in enumerate(per_layer)]
    for p in seen:
        x, x_hat = _inputs(llama, p.names[0], windows), _inputs(student, p.names[0], windows)
        assert p.tokens == x.shape[0] == windows.numel()
        assert torch.allclose(p.cross, x.T @ x_hat / p.tokens, rtol=1e-6, atol=1e-9)
        assert torch.allclose(p.own, x_hat.T @ x_hat / p.tokens, rtol=1e-6, atol=1e-9)
    assert torch.equal(seen[0].cross, seen[0].own)  # nothing before the first layer is compressed
    assert not torch.allclose(seen[-1].cross, seen[-1].own)


def test_what_is_installed_before_the_next_group_shapes_the_inputs_after_it(llama, windows):
    names = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    student = copy.deepcopy(llama)
    groups = paired_moments(student, llama, names, windows, batch_size=4)
    first = next(groups)
    assert torch.equal(first.cross, first.own)
    for name in first.names:  # change q, k and v now: o_proj's input (next group) must see it
        student.get_submodule(name).weight.data.mul_(0.5)
    second = next(groups)
    x, x_hat = _inputs(llama, second.names[0], windows), _inputs(student, second.names[0], windows)
    assert second.names == ["model.layers.0.self_attn.o_proj"]
    assert torch.allclose(second.own, x_hat.T @ x_hat / second.tokens, rtol=1e-6, atol=1e-9)
    assert torch.allclose(second.cross, x.T @ x_hat / second.tokens, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(second.cross, second.own)


def test_the_compensate_corrector_keeps_ranks_and_bytes_and_judges_each_decoder_layer(llama, windows):
    validation = patterned_windows(4, seed=1)
    one_shot, before = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32", corrector={
        "name": "compensate", "shrink": 0.1}), windows, validation=validation)
    assert [(l.name, l.rank) for l in report.layers] == [(l.name, l.rank) for l in before.layers]
    assert stored_bytes(model, report) == stored_bytes(one_shot, before)
    steps = report.correction_steps
    assert [s["cycle"] for s in steps] == [1, 2]  # one judgement per decoder layer
    accepted = {s["cycle"] - 1 for s in steps if s["accepted"]}
    assert accepted  # on this model compensation helps at least one decoder layer
    mine, theirs = model.state_dict(), one_shot.state_dict()
    changed = {int(k.split(".")[2]) for k in mine if not torch.equal(mine[k], theirs[k])}
    assert changed == accepted  # a rejected layer got its one-shot factors back
    result = report.correction_result
    assert result["final"] == min(s["validation_loss"] for s in steps) < result["one_shot"]


def test_compensation_rejected_at_every_layer_returns_the_one_shot_model(llama, windows, monkeypatch):
    from zsfw.compression.correct import Correction

    measured = Correction.validation_loss

    def validation_loss(self):  # any state other than the one shot is 1 nat worse
        now = self.model.state_dict()
        first = self.__dict__.setdefault("first", {k: v.clone() for k, v in now.items()})
        return measured(self) + (0.0 if all(torch.equal(v, first[k]) for k, v in now.items()) else 1.0)

    monkeypatch.setattr(Correction, "validation_loss", validation_loss)
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32", corrector={
        "name": "compensate"}), windows, validation=patterned_windows(4, seed=1))
    assert not any(s["accepted"] for s in report.correction_steps)
    sa, sb = model.state_dict(), one_shot.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_compensation_with_the_streamed_driver_is_refused_in_one_line(llama, windows):
    r = recipe(ratio=0.5, storage="fp32", corrector={"name": "compensate"})
    r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": "streamed"}
    with pytest.raises(zsfw.ZsfwError, match="corrector 'compensate' with its copy of the uncompressed model "
                                             "needs execution.driver 'memory', not 'streamed'"):
        zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))


@pytest.mark.parametrize("options, message", [({"shrink": -1.0}, "shrink must be >= 0"),
                                              ({"judge": "block"}, "judge")])
def test_compensation_options_are_checked(options, message):
    with pytest.raises(zsfw.ZsfwError, match=message):
        zsfw.plugins.create("corrector", "compensate", options)
