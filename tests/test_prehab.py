"""Low-Rank Prehab: the reparametrisation is exact at Δ = 0, folding keeps the forward, a few steps
lower the rank surrogate, training windows stay apart, and statistics see the prehabbed model."""

import copy

import pytest
import torch

import zsfw
from helpers import patterned_windows, recipe
from zsfw import plugins
from zsfw.compression.targets import find_targets
from zsfw.errors import CalibrationError
from zsfw.compression.statistics import next_token_loss
from zsfw_prehab import PrehabStage, kept_rank, reparametrized, truncated_loss


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def _whiteners(model, targets, windows):
    return PrehabStage()._whiteners(model, targets, windows)


def test_the_reparametrised_model_is_the_original_at_zero_and_folding_keeps_its_forward(llama, windows):
    model = copy.deepcopy(llama).double()
    targets = find_targets(model, ["Linear"], ["lm_head"])
    whiteners = _whiteners(model, targets, windows[:4])
    original = _logits(model, windows[:2])
    g = torch.Generator().manual_seed(0)
    with reparametrized(targets, whiteners) as deltas:
        assert (_logits(model, windows[:2]) - original).abs().max() <= 1e-12 * original.abs().max()
        with torch.no_grad():
            for delta in deltas.values():
                delta.copy_(1e-2 * torch.randn(delta.shape, generator=g, dtype=delta.dtype))
        moved = _logits(model, windows[:2])
    assert not any(parametrize_left(m) for m in targets.values())
    assert (moved - original).abs().max() > 1e-6  # Δ really changed the model
    folded = _logits(model, windows[:2])
    assert (folded - moved).abs().max() <= 1e-10 * moved.abs().max()


def parametrize_left(module) -> bool:
    return hasattr(module, "parametrizations")


@pytest.mark.parametrize("surrogate, weight", [("stable_rank", 1.0), ("tail", 100.0)])  # tail: a share ≈ 0.01
def test_a_few_steps_lower_the_surrogate(llama, windows, surrogate, weight):
    model = copy.deepcopy(llama)
    targets = find_targets(model, ["Linear"], ["lm_head"])
    stage = PrehabStage(steps=6, lr=1e-3, lambda_init=weight, lambda_max=weight, warmup=0, surrogate=surrogate)
    summary = stage.apply(model, targets, windows[:4], patterned_windows(4, seed=2))
    first, last = summary["surrogate"]
    assert last < first
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags come back


def test_the_proximal_shrink_removes_its_share_of_the_tail_each_step(llama, windows):
    model = copy.deepcopy(llama).double()
    targets = find_targets(model, ["Linear"], ["lm_head"])
    stage = PrehabStage(steps=3, lr=1e-12, lambda_max=0.0, warmup=0, surrogate="tail", shrink=0.5)
    whiteners = stage._whiteners(model, targets, windows[:4])
    name = "model.layers.0.mlp.down_proj"
    k = kept_rank(*targets[name].weight.shape, stage.ratio)

    def tail(weight):  # energy of W S beyond rank k
        sigma = torch.linalg.svdvals(weight.detach().to(torch.float64) @ whiteners[name].to(torch.float64))
        return sigma[k:].square().sum().item()

    before = tail(targets[name].weight)
    stage.apply(model, targets, windows[:4], patterned_windows(4, seed=2))
    # three steps each keep half of the tail outside the tracked subspace: about 1/4 of its norm,
    # 1/64 of its energy (the subspace is tracked, not exact, and Adam moved nothing: lr 1e-12)
    assert tail(targets[name].weight) < 0.05 * before


def test_prehab_in_a_recipe_trains_on_held_out_windows_and_statistics_see_its_weights(llama, windows, monkeypatch):
    from zsfw.compression import plan

    seen = {}
    apply = PrehabStage.apply

    def spy(self, model, targets, calibration, training, validation):
        seen["training"], seen["validation"] = training, validation
        summary = apply(self, model, targets, calibration, training)  # no keep-best: every step kept
        seen["after"] = {n: t.weight.detach().clone() for n, t in targets.items()}
        return summary

    monkeypatch.setattr(PrehabStage, "apply", spy)
    factor_store = plan.factor_store

    def statistics_of(model, targets, *args, **kwargs):  # the weights the statistics pass runs on
        seen.setdefault("statistics", {n: t.weight.detach().clone() for n, t in targets.items()})
        return factor_store(model, targets, *args, **kwargs)

    monkeypatch.setattr(plan, "factor_store", statistics_of)
    training = patterned_windows(4, seed=2)
    prehab = {"name": "prehab", "steps": 3, "lr": 1e-3}
    validation = patterned_windows(4, seed=3)
    _, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, stages=[prehab]), windows, training=training,
                              validation=validation)
    assert torch.equal(seen["training"], training) and torch.equal(seen["validation"], validation)
    assert all(torch.equal(seen["statistics"][n], w) for n, w in seen["after"].items())
    assert any(not torch.equal(w, dict(llama.named_modules())[n].weight) for n, w in seen["after"].items())
    (stage,) = report.stages
    assert stage["name"] == "prehab" and len(stage["summary"]["dense_calibration_ppl"]) == 2


def test_with_ranks_plan_prehab_aims_at_the_recipes_own_plan_of_the_model_before_it(llama, windows, monkeypatch,
                                                                                    tmp_path):
    from zsfw.compression.driver import InMemoryDriver

    training, validation = patterned_windows(4, seed=2), patterned_windows(2, seed=3)

    def run(ratio, stages):
        return zsfw.compress(copy.deepcopy(llama), recipe(ratio=ratio, stages=stages), windows, training=training,
                             validation=validation, statistics_cache=tmp_path)[1]

    plain = run(0.6, [])  # what zero_sum keeps of the model as it is; its statistics are cached
    expected = {layer.name: layer.rank for layer in plain.layers if not layer.dense}
    assert 0 < len(expected) and len(set(expected.values())) > 1  # not a uniform rank
    seen, passes = [], []
    apply, statistics = PrehabStage.apply, InMemoryDriver.statistics

    def spy(self, model, targets, *args, plan=None, **kwargs):
        seen.append(self._kept({n: t.weight for n, t in targets.items()}, plan))
        return apply(self, model, targets, *args, plan=plan, **kwargs)

    monkeypatch.setattr(PrehabStage, "apply", spy)
    monkeypatch.setattr(InMemoryDriver, "statistics", lambda self, *a: passes.append(1) or statistics(self, *a))
    prehab = {"name": "prehab", "steps": 2, "lr": 1e-4, "surrogate": "tail", "ranks": "plan", "validate_every": 1}
    report = run(0.6, [prehab])
    assert seen == [expected]
    summary = report.stages[0]["summary"]
    assert summary["truncated_targets"] == len(expected) and summary["kept_components"] == sum(expected.values())
    assert len(passes) == 1  # the plan came from the plain run's cached statistics: one pass, after prehab
    assert run(0.6, [prehab]).stages[0]["cached"] and len(seen) == 1  # a cached stage needs no plan
    assert "cached" not in run(0.7, [prehab]).stages[0] and len(seen) == 2  # another plan: a miss


def test_with_ranks_plan_prehab_whitens_with_the_plans_factors_unless_given_its_own_damping(llama, windows,
                                                                                           monkeypatch):
    import zsfw_prehab

    model = copy.deepcopy(llama)
    targets = find_targets(model, ["Linear"], ["lm_head"])
    own = _whiteners(model, targets, windows)  # its own pass, at the recipe's default damping
    given, passes = {}, []
    apply, collect = PrehabStage.apply, zsfw_prehab.collect

    def spy(self, model, targets, *args, whiteners=None, **kwargs):
        given.update(whiteners)
        return apply(self, model, targets, *args, whiteners=whiteners, **kwargs)

    monkeypatch.setattr(PrehabStage, "apply", spy)
    monkeypatch.setattr(zsfw_prehab, "collect", lambda *a, **k: passes.append(1) or collect(*a, **k))
    prehab = {"name": "prehab", "steps": 1, "lr": 1e-4, "surrogate": "tail", "ranks": "plan"}
    held_out = {"training": patterned_windows(4, seed=2), "validation": patterned_windows(2, seed=3)}
    zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, stages=[prehab]), windows, **held_out)
    assert not passes and set(given) == set(targets)  # the plan's S, for every target: no pass of its own
    for name, S in own.items():  # in the model's dtype: no float64 copy beside the stage's
        assert given[name].dtype == S.dtype == torch.float32
        torch.testing.assert_close(given[name], S, rtol=1e-5, atol=1e-7)
    zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, stages=[prehab | {"damping": 1e-3}]), windows, **held_out)
    assert passes == [1]  # another damping than the plan's: its own S


def test_the_truncated_loss_is_the_loss_of_the_whitened_truncation(llama, windows):
    model = copy.deepcopy(llama).double()
    targets = find_targets(model, ["Linear"], ["lm_head"])
    whiteners = _whiteners(model, targets, windows[:4])
    weighted = {n: t.weight.detach() @ whiteners[n] for n, t in targets.items()}
    kept = {n: kept_rank(*w.shape, 0.5) for n, w in weighted.items()}
    with reparametrized(targets, whiteners) as deltas:
        bases = {}
        measured = truncated_loss(model, deltas, weighted, kept, windows[4:6], bases)
        assert all(not d.any() for d in deltas.values())  # Δ comes back
    for name, w in weighted.items():  # the handed-over bases span M's top-k left subspace
        U = torch.linalg.svd(w, full_matrices=False).U[:, :kept[name]]
        assert torch.allclose(bases[name] @ bases[name].mT, U @ U.mT, atol=1e-9)
    expected = copy.deepcopy(model)
    for name, linear in find_targets(expected, ["Linear"], ["lm_head"]).items():
        U, sigma, Vh = torch.linalg.svd(weighted[name], full_matrices=False)
        k = kept[name]
        with torch.no_grad():
            linear.weight.copy_(torch.linalg.solve_triangular(whiteners[name], (U[:, :k] * sigma[:k]) @ Vh[:k],
                                                              upper=False, left=False))
    with torch.no_grad():
        truth, dense = float(next_token_loss(expected, windows[4:6])), float(next_token_loss(model, windows[4:6]))
    assert measured == pytest.approx(truth, rel=1e-9) and measured > dense


def test_when_every_check_is_worse_the_weights_come_back_unchanged(llama, windows, monkeypatch):
    import zsfw_prehab

    calls = []
    monkeypatch.setattr(zsfw_prehab, "truncated_loss", lambda *a: calls.append(1) or float(len(calls)))
    model = copy.deepcopy(llama)
    targets = find_targets(model, ["Linear"], ["lm_head"])
    before = {n: t.weight.detach().clone() for n, t in targets.items()}
    stage = PrehabStage(steps=4, lr=1e-3, validate_every=2, surrogate="tail", lambda_max=1.0)
    summary = stage.apply(model, targets, windows[:4], patterned_windows(4, seed=2), patterned_windows(2, seed=3))
    assert len(calls) == 3 and summary["best_step"] == 0 and summary["training_loss"][0] != summary["training_loss"][1]
    assert all(torch.equal(t.weight, before[n]) for n, t in targets.items())


def test_prehab_with_a_tensor_dataset_needs_training_windows(llama, windows):
    with pytest.raises(CalibrationError, match=r"\['prehab'\] train on windows held out"):
        zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, stages=[{"name": "prehab", "steps": 1}]), windows)


@pytest.mark.parametrize("options, message", [({"steps": 0}, "steps must be >= 1"),
                                              ({"surrogate": "nuclear"}, "surrogate must be one of"),
                                              ({"lambda_init": 1.0, "lambda_max": 0.1}, "lambda_init <= lambda_max"),
                                              ({"shrink": 1.0, "surrogate": "tail"}, "shrink must be in"),
                                              ({"shrink": 0.1}, "shrink needs surrogate 'tail'"),
                                              ({"ranks": "mean"}, "ranks must be one of")])
def test_options_are_checked(options, message):
    from zsfw.errors import PluginError

    with pytest.raises(PluginError, match=message):
        plugins.create("stage", "prehab", options)


def test_a_stage_that_needs_a_plan_is_refused_without_one(llama, windows):
    from zsfw.compression.stages import run_stages
    from zsfw.errors import RecipeError
    from zsfw.recipe import PluginSpec

    model = copy.deepcopy(llama)
    targets = find_targets(model, ["Linear"], ["lm_head"])
    spec = PluginSpec(name="prehab", options={"ranks": "plan"})
    with pytest.raises(RecipeError, match=r"stage 'prehab' .* needs the pipeline's allocation plan"):
        run_stages([spec], model, targets, windows[:4], patterned_windows(2, seed=2))
    with pytest.raises(ValueError, match=r"ranks: plan needs the pipeline's plan"):
        PrehabStage(ranks="plan").apply(model, targets, windows[:4], patterned_windows(2, seed=2))


def test_under_torchrun_a_stage_aimed_at_the_plan_is_refused_before_any_work(llama, windows, monkeypatch):
    from zsfw.errors import RecipeError

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: one of two processes
    monkeypatch.setattr(PrehabStage, "apply", lambda *a, **k: pytest.fail("the stage ran"))
    prehab = {"name": "prehab", "surrogate": "tail", "ranks": "plan"}
    with pytest.raises(RecipeError, match=r"^stage 'prehab' \(it aims at the allocation plan\) cannot be used "
                                          r"across several processes yet; run without torchrun"):
        zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, stages=[prehab]), windows)
