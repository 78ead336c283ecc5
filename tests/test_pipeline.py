import copy

import pytest
import torch

import zsfw
from helpers import recipe as _recipe, stored_bytes
from zsfw.modules import LowRankLinear
from zsfw.compression.statistics import next_token_loss


def _logit_error(original, compressed, windows):
    with torch.no_grad():
        ref = original(input_ids=windows).logits
        out = compressed(input_ids=windows).logits
    return ((out - ref).norm() / ref.norm()).item()


def test_logits_approach_original_as_ratio_goes_to_one(llama, windows):
    errors = []
    for ratio in (0.5, 0.7, 0.9, 1.0):
        model, report = zsfw.compress(copy.deepcopy(llama), _recipe(ratio=ratio), windows)
        assert stored_bytes(model, report) == report.total_bytes <= report.budget_bytes
        errors.append(_logit_error(llama, model, windows))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-2  # ratio 1: every layer dense, only bf16 rounding remains
    assert errors[0] > 10 * errors[-1]


def test_fp32_factors_at_full_rank_reproduce_the_layer(llama, windows):
    x = torch.randn(3, 32)
    linear = llama.model.layers[0].mlp.up_proj
    fmt = zsfw.plugins.create("storage", "fp32")
    from zsfw.compression.linalg import lowrank_factors, whitened_svd

    U, sigma, Vh = whitened_svd(linear.weight.detach(), None)
    module = fmt.lowrank_module(*lowrank_factors(U, sigma, Vh, None, 32), None)
    assert torch.allclose(module(x), linear(x), atol=1e-5)


def test_report_is_consistent(llama, windows, tmp_path):
    model, report = zsfw.compress(llama, _recipe(ratio=0.6), windows, output_dir=tmp_path / "out")
    modules = dict(model.named_modules())
    for layer in report.layers:
        module = modules[layer.name]
        if layer.dense:
            assert not isinstance(module, LowRankLinear)
        else:
            assert isinstance(module, LowRankLinear) and module.rank == layer.rank
            assert module.A.weight.dtype == torch.bfloat16
            stored = sum(p.numel() * p.element_size() for p in module.parameters())
            assert stored == layer.bytes
    assert stored_bytes(model, report) == report.total_bytes <= report.budget_bytes
    assert (tmp_path / "out" / "report.json").is_file()
    reloaded = zsfw.load_recipe(tmp_path / "out" / "recipe.yaml")
    assert reloaded.modifier.ratio == 0.6
    assert "total:" in report.table()
    assert set(report.timings) >= {"statistics", "factorize + score", "allocate", "truncate"}


def test_biased_architecture_keeps_biases_and_stable_keys(qwen2, windows):
    model, report = zsfw.compress(qwen2, _recipe(ratio=0.6, storage="fp32"), windows)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.bias is not None
    keys = [k for k in model.state_dict() if k.startswith("model.layers.0.self_attn.q_proj.")]
    assert sorted(keys) == ["model.layers.0.self_attn.q_proj.A.weight",
                            "model.layers.0.self_attn.q_proj.B.bias",
                            "model.layers.0.self_attn.q_proj.B.weight"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=windows).logits).all()


def test_corrector_lowers_calibration_loss(llama, windows):
    base = _recipe(ratio=0.5, storage="fp32")
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), base, windows)
    corrected, report = zsfw.compress(
        copy.deepcopy(llama), _recipe(ratio=0.5, storage="fp32",
                                      corrector={"name": "projected_gradient", "cycles": 2, "backtrack": 0}), windows)
    with torch.no_grad():
        before = next_token_loss(one_shot, windows).item()
        after = next_token_loss(corrected, windows).item()
    assert len(report.correction_losses) == 2
    assert report.correction_losses[0] == pytest.approx(before, rel=1e-4)
    assert after < before


@pytest.mark.parametrize("allocator,scorer", [("uniform", "first_order"), ("zero_sum", "sigma"),
                                              ("greedy_negative", "first_order")])
def test_baselines_run_in_the_same_harness(llama, windows, allocator, scorer):
    model, report = zsfw.compress(llama, _recipe(ratio=0.6, allocator=allocator, scorer=scorer),
                                  windows)
    assert stored_bytes(model, report) == report.total_bytes <= report.budget_bytes
    if allocator == "uniform":
        kept = {round(l.kept, 1) for l in report.layers if l.shape[0] == l.shape[1]}
        assert len(kept) == 1


def test_a_layer_keeps_exactly_the_components_its_allocation_names(llama, windows):
    from zsfw.compression.linalg import whitened_svd, whitening_factor
    from zsfw.compression.statistics import collect

    name = "model.layers.0.self_attn.o_proj"
    recipe = _recipe(ratio=0.5, storage="fp32", allocator={"name": "greedy_negative"}, damping=0.0)
    model, report = zsfw.compress(copy.deepcopy(llama), recipe, windows)
    layer = next(l for l in report.layers if l.name == name)
    assert not layer.dense
    # the same whitened SVD, and the components whose omission the report's error accounts for
    linear = dict(llama.named_modules())[name]
    stats = collect(llama, {name: linear}, windows, gradients=False)
    S = whitening_factor(stats.covariances[stats.group_of(name)], damping=0.0).S
    U, sigma, Vh = whitened_svd(linear.weight.detach(), S)
    module = dict(model.named_modules())[name]
    W_kept = (module.B.weight @ module.A.weight).double()
    coefficients = torch.diagonal(U.T.double() @ (W_kept @ S) @ Vh.T.double())  # σ_i kept, 0 dropped
    kept = coefficients.abs() > 1e-3 * sigma.max()
    assert int(kept.sum()) == layer.rank < layer.full_rank
    assert not torch.equal(kept.nonzero().flatten(), torch.arange(layer.rank))  # not the top k
    assert torch.allclose(coefficients[kept], sigma[kept].double(), rtol=1e-3)


def test_plain_svd_without_whitening(llama, windows):
    original = copy.deepcopy(llama)
    model, report = zsfw.compress(llama, _recipe(ratio=0.8, whiten=False, storage="fp32"), windows)
    assert all(l.whitening == "" for l in report.layers)
    assert report.calibration_tokens == windows.numel()
    # each low-rank layer is the best rank-k approximation of W itself (Eckart–Young), unwhitened
    modules, checked = dict(model.named_modules()), 0
    for layer in report.layers:
        if layer.dense:
            continue
        W = dict(original.named_modules())[layer.name].weight.detach().double()
        U, sigma, Vh = torch.linalg.svd(W, full_matrices=False)
        best = (U[:, :layer.rank] * sigma[:layer.rank]) @ Vh[:layer.rank]
        module = modules[layer.name]
        kept = (module.B.weight @ module.A.weight).double()
        assert torch.allclose(kept, best, atol=1e-5 * sigma[0].item()), layer.name
        checked += 1
    assert checked > 0


def test_r6_a_compressed_model_is_not_compressed_again(llama, windows, tmp_path):
    from zsfw.errors import ModelLoadError

    zsfw.compress(llama, _recipe(), windows, output_dir=tmp_path / "small")
    for model in (llama, zsfw.load(tmp_path / "small")):  # in memory, and loaded back
        # no calibration data: were it drawn before the check, the error would be about that
        with pytest.raises(ModelLoadError, match="is already compressed by zsfw .* compress the original model"):
            zsfw.compress(model, _recipe(), None)
