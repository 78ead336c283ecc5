"""Correction judged on validation windows: step control, keep-best, never worse than one shot."""

import copy

import pytest
import torch

import zsfw
from helpers import patterned_windows, recipe, stored_bytes, word_docs
from zsfw.compression.calibration import held_out_windows, sample_windows, tokenize, windows_for
from zsfw.compression.correct import Correction
from zsfw.compression.statistics import next_token_loss
from zsfw.recipe import CalibrationConfig


def _corrected(**options) -> dict:
    return recipe(ratio=0.5, storage="fp32", corrector={"name": "projected_gradient", **options})


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def every_step_hurts(monkeypatch):
    """The validation loss of any state other than the one-shot truncation is 1 nat worse."""
    measured = Correction.validation_loss

    def validation_loss(self):
        now = self.model.state_dict()
        first = self.__dict__.setdefault("first", {k: v.clone() for k, v in now.items()})
        moved = now.keys() != first.keys() or any(not torch.equal(v, first[k]) for k, v in now.items())
        return measured(self) + (1.0 if moved else 0.0)

    monkeypatch.setattr(Correction, "validation_loss", validation_loss)


@pytest.mark.parametrize("options", [{"backtrack": 2}, {"backtrack": 0, "keep_best": True},
                                     {"backtrack": 0, "keep_best": False}])
def test_when_every_step_hurts_the_one_shot_state_comes_back(llama, windows, every_step_hurts, options):
    validation = patterned_windows(4, seed=1)
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    corrected, report = zsfw.compress(copy.deepcopy(llama), _corrected(cycles=3, **options), windows,
                                      validation=validation)
    assert _same_weights(corrected, one_shot)
    steps = report.correction_steps
    assert not any(s["accepted"] for s in steps) if options["backtrack"] else all(s["accepted"] for s in steps)
    if options["backtrack"]:  # 1, 1/2, 1/4 tried and rejected, the cycle undone, no further cycle
        assert [s["scale"] for s in steps] == [1.0, 0.5, 0.25]
        assert len(report.correction_losses) == 1
    else:  # every step taken; keep-best (or, without it, the pipeline) restores the one shot
        assert len(steps) == 3
    result = report.correction_result
    assert result["result"] == ("reverted to one-shot" if options == {"backtrack": 0, "keep_best": False} else "kept")
    assert result["final"] == result["one_shot"]


def test_accepted_steps_lower_the_measured_validation_loss(llama, windows):
    validation = patterned_windows(4, seed=1)
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    corrected, report = zsfw.compress(copy.deepcopy(llama), _corrected(cycles=2), windows,
                                      validation=validation)
    result = report.correction_result
    with torch.no_grad():
        assert result["one_shot"] == pytest.approx(next_token_loss(one_shot, validation).item(), rel=1e-5)
        assert result["final"] == pytest.approx(next_token_loss(corrected, validation).item(), rel=1e-5)
    accepted = [s for s in report.correction_steps if s["accepted"]]
    assert accepted and result["final"] < result["one_shot"]
    assert all(b["validation_loss"] < a["validation_loss"] for a, b in zip(accepted, accepted[1:]))
    assert "correction: validation loss" in report.table()


def test_without_validation_windows_a_tensor_dataset_is_judged_on_its_gradient_windows(llama, windows):
    _, report = zsfw.compress(llama, _corrected(cycles=1), windows)
    assert any("no validation windows" in w for w in report.warnings)


def test_validation_and_training_windows_are_held_out_from_calibration_and_measurement(tokenizer, tmp_path):
    tokens = tokenize(tokenizer, word_docs())
    path = tmp_path / "cal.txt"
    path.write_text("\n".join(word_docs()))
    cal = CalibrationConfig(samples=6, sequence_length=32, validation_samples=4)
    drawn = windows_for(None, path, tokenizer, cal, validation=4, training=3)
    measured = held_out_windows(tokens, 5, 6, 32, skip=7)
    assert torch.equal(drawn.calibration, sample_windows(tokens, 6, 32))
    sets = (drawn.calibration, drawn.validation, drawn.training, measured)
    rows = [{tuple(w.tolist()) for w in t} for t in sets]
    assert [len(r) for r in rows] == [6, 4, 3, 5]
    assert all(not (a & b) for i, a in enumerate(rows) for b in rows[i + 1:])  # pairwise disjoint
    none = windows_for(None, path, tokenizer, cal)
    assert none.validation is None and none.training is None  # none drawn unless asked for


def test_rotation_takes_each_cycle_gradient_from_the_next_disjoint_share(llama, windows, monkeypatch):
    from zsfw.compression.driver import InMemoryDriver, gradient_share
    from zsfw.errors import CalibrationError

    shares = []
    gradients = InMemoryDriver.gradients
    monkeypatch.setattr(InMemoryDriver, "gradients",
                        lambda self, targets, share=(0, 1): shares.append(share) or gradients(self, targets, share))
    rotating = recipe(ratio=0.5, storage="fp32", gradient_samples=6,
                      corrector={"name": "projected_gradient", "cycles": 3, "rotate": 2, "backtrack": 0})
    zsfw.compress(llama, rotating, windows, validation=patterned_windows(4, seed=1))
    assert shares == [(0, 2), (1, 2), (0, 2)]
    cal = CalibrationConfig(samples=8, gradient_samples=6)
    parts = [gradient_share(windows, cal, (i, 3)) for i in range(3)]
    assert sorted(w.tolist() for p in parts for w in p) == sorted(w.tolist() for w in windows[:6])
    with pytest.raises(CalibrationError, match="there are 6 gradient windows"):
        gradient_share(windows, cal, (0, 7))


def _ranks(model) -> dict:
    return {n: r["rank"] for n, r in model.config.quantization_config.modules.items()}


def test_replanning_that_only_hurts_returns_the_one_shot_plan_and_weights(llama, windows, every_step_hurts):
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    replanned, report = zsfw.compress(copy.deepcopy(llama), _corrected(cycles=2, backtrack=0, replan=True),
                                      windows, validation=patterned_windows(4, seed=1))
    assert _same_weights(replanned, one_shot) and _ranks(replanned) == _ranks(one_shot)
    assert len(report.correction_steps) == 2 and report.correction_result["final"] == report.correction_result["one_shot"]


def test_replanning_reallocates_on_the_corrected_model_and_gives_dense_layers_the_teacher_weights(
        llama, windows, monkeypatch):
    from zsfw.compression import factorize

    passes = []
    factor_store = factorize.factor_store
    monkeypatch.setattr("zsfw.compression.plan.factor_store",
                        lambda *a, **k: passes.append(a[0]) or factor_store(*a, **k))
    # every new state measures better than the last, so the last re-plan is the result
    monkeypatch.setattr(Correction, "validation_loss", lambda self: -float(self._version))
    teacher = {n: m.weight.detach().clone() for n, m in llama.named_modules() if n.endswith("_proj")}
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    passes.clear()
    replanned, report = zsfw.compress(copy.deepcopy(llama), _corrected(cycles=2, backtrack=0, replan=True),
                                      windows, validation=patterned_windows(4, seed=1))
    assert len(passes) == 3  # the one-shot pass, then one per cycle
    ranks = _ranks(replanned)
    assert ranks != _ranks(one_shot)  # the corrected model's scores give another allocation
    modules = dict(replanned.named_modules())
    for name, rank in ranks.items():  # the records, the report and the modules agree
        assert getattr(modules[name], "rank", None) == rank
        if rank is None:
            assert torch.equal(modules[name].weight, teacher[name])
    assert {l.name: None if l.dense else l.rank for l in report.layers} == ranks
    assert stored_bytes(replanned, report) == report.total_bytes <= report.budget_bytes


def test_replanning_can_be_asked_for_in_a_recipe_and_is_checked():
    from zsfw.errors import PluginError

    assert zsfw.plugins.create("corrector", "projected_gradient", {"replan": True}).replan
    with pytest.raises(PluginError, match="replan"):
        zsfw.plugins.create("corrector", "projected_gradient", {"replan": "yes please"})


def _refined(**options) -> dict:
    return recipe(ratio=0.5, storage="fp32", corrector={"name": "refine", **options})


@pytest.mark.parametrize("ratio, storage, options", [
    (0.5, "fp32", {"keep_best": True}), (0.5, "fp32", {"keep_best": False}),
    (0.5, "fp32", {"keep_best": True, "norms": True}), (0.8, "bf16", {"keep_best": True, "dense": True})])
def test_refinement_that_only_hurts_returns_the_one_shot_state(llama, windows, every_step_hurts, ratio, storage,
                                                               options):
    one_shot, before = zsfw.compress(copy.deepcopy(llama), recipe(ratio=ratio, storage=storage), windows)
    assert not options.get("dense") or any(layer.dense for layer in before.layers)  # there are dense layers to move
    refined, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=ratio, storage=storage, corrector={
        "name": "refine", "steps": 4, "validate_every": 2, **options}), windows, validation=patterned_windows(4, seed=1))
    assert _same_weights(refined, one_shot)
    keep_best = options["keep_best"]
    assert [s["cycle"] for s in report.correction_steps] == [2, 4]
    assert not any(s["accepted"] for s in report.correction_steps)
    assert report.correction_result["result"] == ("kept" if keep_best else "reverted to one-shot")


def test_refinement_trains_the_factors_at_the_planned_ranks_and_lowers_the_validation_loss(llama, windows):
    validation = patterned_windows(4, seed=1)
    one_shot, before = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    refined, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=6, lr=3e-3, validate_every=3), windows,
                                    validation=validation)
    assert [(l.name, l.rank) for l in report.layers] == [(l.name, l.rank) for l in before.layers]
    def product(model, name):
        module = model.get_submodule(name)
        return module.B.weight @ module.A.weight

    moved = [l.name for l in report.layers if not l.dense
             and not torch.equal(product(refined, l.name), product(one_shot, l.name))]
    assert moved
    result = report.correction_result
    with torch.no_grad():
        assert result["final"] == pytest.approx(next_token_loss(refined, validation).item(), rel=1e-5)
    assert result["final"] < result["one_shot"]
    assert len(report.correction_losses) == 6


def test_refinement_steps_through_shares_of_the_windows_and_stops_on_its_time_budget(llama, windows, monkeypatch):
    shares = []
    gradients = Correction.factor_gradients
    monkeypatch.setattr(Correction, "factor_gradients",
                        lambda self, share=(0, 1), *rest: shares.append(share) or gradients(self, share, *rest))
    validation = patterned_windows(4, seed=1)
    zsfw.compress(copy.deepcopy(llama), _refined(steps=5, windows_per_step=3, validate_every=10), windows,
                  validation=validation)
    parts = [part for part, _ in shares]
    assert sorted(parts[0:2]) == sorted(parts[2:4]) == [0, 1] and parts[4] in (0, 1)  # each share once an epoch
    assert {n for _, n in shares} == {2}  # 8 windows, 3 a step: 2 shares
    shares.clear()
    _, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=5, seconds=1e-9), windows, validation=validation)
    assert len(shares) == 1 and [s["cycle"] for s in report.correction_steps] == [1]


@pytest.mark.parametrize("options, message", [({"steps": 0}, "steps must be >= 1"), ({"lr": 0}, "lr must be > 0"),
                                              ({"seconds": -1}, "seconds must be > 0"),
                                              ({"schedule": "linear"}, "schedule must be one of"),
                                              ({"loss": "mse"}, "loss must be one of"),
                                              ({"windows": "evaluation"}, "windows must be one of")])
def test_refinement_options_are_checked(options, message):
    from zsfw import plugins

    with pytest.raises(Exception, match=message):
        plugins.create("corrector", "refine", options)


def test_factor_gradients_are_the_dense_gradient_through_the_product(llama, windows, monkeypatch):
    from zsfw.compression import pipeline

    checked = []

    def correct(corrector, problem):
        loss, dense = problem.gradients((1, 2))
        factored_loss, factored = problem.factor_gradients((1, 2))
        assert factored_loss == pytest.approx(loss, rel=1e-6)
        for name in problem.layers:
            B, A = problem.factors[name]
            G = dense[name].double()
            dB, dA = factored[name]
            torch.testing.assert_close(dB.double(), G @ A.double().T, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(dA.double(), B.double().T @ G, rtol=1e-4, atol=1e-7)
            assert problem.model.get_submodule(name) is problem.targets[name]  # the dense layer is back
            checked.append(name)
        return []

    monkeypatch.setattr(pipeline, "correct", correct)
    zsfw.compress(llama, _refined(steps=1), windows, validation=patterned_windows(4, seed=1))
    assert checked


def test_norm_gradients_are_the_models_own_and_trained_norms_are_kept(llama, windows, monkeypatch):
    """With ``norms`` the pass also gives each normalization layer's gradient (that of the model
    with the factors' products as weights); refine then moves them, the teacher keeps the originals."""
    from zsfw.compression import pipeline
    from zsfw.compression.trainable import normalizations
    from zsfw.compression.statistics import next_token_loss

    correct, checked = pipeline.correct, []

    def check(corrector, problem):
        names = list(normalizations(problem.model))
        assert problem.norms == names and len(names) == 2 * llama.config.num_hidden_layers + 1
        loss, grads = problem.factor_gradients((0, 1), extra=names)
        model = problem.model
        weights = [model.get_submodule(n).weight for n in names]
        for w in weights:
            w.requires_grad_(True)
        expected = next_token_loss(model, windows)
        expected_grads = torch.autograd.grad(expected, weights)
        for w in weights:
            w.requires_grad_(False)
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        for name, g in zip(names, expected_grads):
            torch.testing.assert_close(grads[name][0], g, rtol=1e-4, atol=1e-7)
        assert set(grads) == {*problem.layers, *names}
        checked.append(problem)
        return correct(corrector, problem)

    monkeypatch.setattr(pipeline, "correct", check)
    refined, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=6, lr=3e-3, validate_every=3, norms=True,
                                                                   loss="distill"),
                                    windows, validation=patterned_windows(4, seed=1))
    assert checked and report.correction_result["final"] < report.correction_result["one_shot"]
    moved = [n for n in checked[0].norms if not torch.equal(refined.get_submodule(n).weight,
                                                            llama.get_submodule(n).weight)]
    assert len(moved) == len(checked[0].norms)
    problem = checked[0]
    problem.set_weight(problem.norms[0], torch.zeros_like(problem.module_weight(problem.norms[0])))
    teacher = problem.teacher()
    for name in problem.norms:
        assert torch.equal(teacher.get_submodule(name).weight, llama.get_submodule(name).weight)


def test_dense_layers_gradients_are_the_models_own_and_trained_dense_layers_keep_their_bytes(llama, windows,
                                                                                          monkeypatch):
    """With ``dense`` the pass also gives each dense layer's gradient (of its stored bf16 weight,
    that of the model as it runs); refine moves them at the plan's ranks and bytes, and the teacher
    keeps the originals."""
    from zsfw.compression import pipeline
    from zsfw.compression.statistics import next_token_loss

    correct, checked = pipeline.correct, []

    def check(corrector, problem):
        names = problem.dense
        loss, grads = problem.factor_gradients((0, 1), extra=names)
        weights = [problem.model.get_submodule(n).weight for n in names]
        for w in weights:
            w.requires_grad_(True)
        expected = next_token_loss(problem.model, windows)
        expected_grads = torch.autograd.grad(expected, weights)
        for w in weights:
            w.requires_grad_(False)
        assert loss == pytest.approx(expected.item(), rel=1e-5)
        for name, g in zip(names, expected_grads):
            assert grads[name][0].dtype == torch.float32 and g.dtype == torch.bfloat16
            torch.testing.assert_close(grads[name][0], g.float(), rtol=2e-2, atol=2e-3 * g.abs().max().item())
        checked.append(problem)
        return correct(corrector, problem)

    monkeypatch.setattr(pipeline, "correct", check)
    one_shot, before = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.8, storage="bf16"), windows)
    refined, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.8, storage="bf16", corrector={
        "name": "refine", "steps": 6, "lr": 3e-3, "validate_every": 3, "dense": True}),
        windows, validation=patterned_windows(4, seed=1))
    dense = [layer.name for layer in report.layers if layer.dense]
    assert dense and dense == checked[0].dense == [layer.name for layer in before.layers if layer.dense]
    assert [layer.bytes for layer in report.layers] == [layer.bytes for layer in before.layers]
    assert report.correction_result["final"] < report.correction_result["one_shot"]
    assert all(not torch.equal(refined.get_submodule(n).weight, one_shot.get_submodule(n).weight) for n in dense)
    teacher = checked[0].teacher()
    for name in dense:
        assert torch.equal(teacher.get_submodule(name).weight, llama.get_submodule(name).weight)


def test_training_a_quantized_dense_layer_is_refused_in_one_line(llama, windows):
    r = recipe(ratio=0.5, storage="int8", corrector={"name": "refine", "steps": 1, "dense": True})
    with pytest.raises(zsfw.ZsfwError, match=r"layer 'model\.layers\.\d\.[a-z_.]+' is stored as \w+ by storage "
                                             r"'int8', which cannot be trained; train only the factors"):
        zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))


def test_the_distillation_loss_is_the_mean_kl_from_the_teacher_per_next_token_position(llama, windows):
    from zsfw.compression.statistics import distillation_loss

    teacher, student = copy.deepcopy(llama).double(), copy.deepcopy(llama).double()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
        ids = windows[:2]
        measured = distillation_loss(teacher)(student, ids).item()
        p = teacher(input_ids=ids).logits[:, :-1].softmax(-1)
        q = student(input_ids=ids).logits[:, :-1].softmax(-1)
        expected = (p * (p.log() - q.log())).sum(-1).mean().item()
        assert measured == pytest.approx(expected, rel=1e-5) and measured > 0
        assert distillation_loss(teacher)(teacher, ids).item() == pytest.approx(0, abs=1e-6)


def test_distilled_refinement_learns_from_the_uncompressed_model(llama, windows, monkeypatch):
    from zsfw.compression import pipeline
    from zsfw.compression.statistics import distillation_loss

    original = copy.deepcopy(llama)
    correct, seen = pipeline.correct, []

    def checked(corrector, problem):  # the teacher predicts what the uncompressed model does
        with torch.no_grad():
            torch.testing.assert_close(problem.teacher()(input_ids=windows[:2]).logits,
                                       original(input_ids=windows[:2]).logits)
            loss, _ = problem.factor_gradients((0, 1), "distill")
            assert loss == pytest.approx(distillation_loss(original)(problem.model, windows).item(), rel=1e-5)
        seen.append(loss)
        return correct(corrector, problem)

    monkeypatch.setattr(pipeline, "correct", checked)
    validation = patterned_windows(4, seed=1)
    _, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=6, lr=3e-3, validate_every=3, loss="distill"),
                              windows, validation=validation)
    assert seen and seen[0] > 0
    assert all("calibration_kl" in step for step in report.correction_steps)
    assert report.correction_result["final"] < report.correction_result["one_shot"]


def test_distillation_with_the_streamed_driver_is_refused_in_one_line_before_any_work(llama, windows, monkeypatch):
    from zsfw.compression import plan

    r = _refined(steps=1, loss="distill")
    r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": "streamed"}
    monkeypatch.setattr(plan, "factor_store", lambda *a, **k: pytest.fail("statistics ran"))
    with pytest.raises(zsfw.ZsfwError, match="corrector 'refine' with loss: distill needs execution.driver "
                                             "'memory', not 'streamed'"):
        zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))
    for option in ("norms", "dense"):
        r = _refined(steps=1, **{option: True})
        r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": "streamed"}
        with pytest.raises(zsfw.ZsfwError, match=f"corrector 'refine' with {option}: true needs execution.driver"):
            zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))


def test_bf16_factor_gradients_are_fp32_close_to_the_fp32_ones_and_not_equal(llama, windows, monkeypatch):
    from zsfw.compression import pipeline

    checked = []

    def correct(corrector, problem):
        for loss in ("next_token", "distill"):
            exact, full = problem.factor_gradients((0, 1), loss)
            rounded, half = problem.factor_gradients((0, 1), loss, precision="bf16")
            assert rounded == pytest.approx(exact, rel=2e-2, abs=2e-3) and rounded != exact  # bf16 matmuls ran
            for name in problem.layers:
                for g, h in zip(full[name], half[name]):
                    assert h.dtype == torch.float32
                    cosine = torch.nn.functional.cosine_similarity(g.double().flatten(), h.double().flatten(), 0)
                    assert cosine > 0.98, (name, loss, cosine)
            checked.append(loss)
        teacher, rounded = problem.teacher(), problem.teacher(torch.bfloat16)  # linear weights stored in bf16
        assert {m.weight.dtype for m in rounded.modules() if isinstance(m, torch.nn.Linear)} == {torch.bfloat16}
        assert rounded.get_input_embeddings().weight.dtype == torch.float32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(rounded(input_ids=windows[:1]).logits.float(),
                                       teacher(input_ids=windows[:1]).logits.float(), rtol=0.05, atol=0.05)
        return []

    monkeypatch.setattr(pipeline, "correct", correct)
    zsfw.compress(copy.deepcopy(llama), _refined(steps=1, loss="distill"), windows, validation=patterned_windows(4, seed=1))
    assert checked == ["next_token", "distill"]


def test_bf16_refinement_lowers_the_validation_loss_and_is_refused_with_the_streamed_driver(llama, windows):
    _, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=6, lr=3e-3, validate_every=3, precision="bf16"),
                              windows, validation=patterned_windows(4, seed=1))
    assert report.correction_result["final"] < report.correction_result["one_shot"]
    r = _refined(steps=1, loss="distill", precision="bf16")
    r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": "streamed"}
    with pytest.raises(zsfw.ZsfwError, match="with loss: distill and precision: bf16 needs execution.driver 'memory'"):
        zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))
    assert {step["precision"] for step in report.correction_steps} == {"bf16"}
    with pytest.raises(zsfw.ZsfwError, match="precision must be one of fp32, bf16, auto, got 'fp16'"):
        zsfw.compress(copy.deepcopy(llama), _refined(steps=1, precision="fp16"), windows,
                      validation=patterned_windows(4, seed=1))


@pytest.mark.parametrize("units", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_with_bf16_units(llama, windows, monkeypatch, units):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: units)
    _, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=2, lr=3e-3, validate_every=1, precision="auto"),
                              windows, validation=patterned_windows(4, seed=1))
    assert [step["precision"] for step in report.correction_steps] == ["bf16" if units else "fp32"] * 2


def test_refinement_can_train_on_fresh_training_windows_one_per_step(llama, windows, monkeypatch):
    from zsfw.compression import driver

    training, gradient_passes = patterned_windows(6, seed=2), []
    collect = driver.collect

    def spied(model, targets, ids, **options):
        if options.get("desc") == "gradient":
            gradient_passes.append(ids)
        return collect(model, targets, ids, **options)

    monkeypatch.setattr(driver, "collect", spied)
    _, report = zsfw.compress(copy.deepcopy(llama), _refined(steps=6, lr=3e-3, validate_every=3, loss="distill",
                                                             windows="training"),
                              windows, validation=patterned_windows(4, seed=1), training=training)
    assert len(gradient_passes) == 6 and all(ids.shape[0] == 1 for ids in gradient_passes)
    assert sorted(map(tuple, torch.cat(gradient_passes).tolist())) == sorted(map(tuple, training.tolist()))
    assert report.correction_result["final"] < report.correction_result["one_shot"]
    with pytest.raises(zsfw.ZsfwError, match=r"\['refine'\] train on windows held out .* pass training="):  # a tensor dataset: the caller gives them
        zsfw.compress(copy.deepcopy(llama), _refined(steps=1, windows="training"), windows,
                      validation=patterned_windows(4, seed=1))


def test_refinement_with_the_streamed_driver_matches_the_in_memory_one(llama, windows):
    validation = patterned_windows(4, seed=1)
    runs = []
    for driver in ("memory", "streamed"):
        r = _refined(steps=3, lr=3e-3, validate_every=2)
        r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": driver}
        runs.append(zsfw.compress(copy.deepcopy(llama), r, windows, validation=validation))
    (memory, a), (streamed, b) = runs
    assert [s["validation_loss"] for s in a.correction_steps] == pytest.approx(
        [s["validation_loss"] for s in b.correction_steps], rel=1e-5)
    for (name, x), (_, y) in zip(memory.state_dict().items(), streamed.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def test_cosine_schedule_runs_from_the_full_rate_to_zero():
    from zsfw_refine import SCHEDULES, progress

    assert SCHEDULES["cosine"](progress(0, 40, 0, None)) == 1.0
    assert SCHEDULES["cosine"](progress(20, 40, 5.0, None)) == pytest.approx(0.5)
    assert SCHEDULES["cosine"](progress(40, 40, 0, None)) == pytest.approx(0.0, abs=1e-12)
    assert SCHEDULES["constant"](progress(39, 40, 0, None)) == 1.0
    # a time budget that runs out first drives the schedule: half the seconds gone is half way
    assert progress(5, 40, 30.0, 60.0) == pytest.approx(0.5) and progress(30, 40, 6.0, 60.0) == pytest.approx(0.75)
    assert progress(5, 40, 90.0, 60.0) == 1.0


@pytest.mark.parametrize("corrector", [{"name": "refine", "steps": 2}, {"name": "projected_gradient"}])
def test_a_plan_with_every_layer_dense_has_nothing_to_correct(llama, windows, corrector):
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.9, storage="int8", corrector=corrector),
                                  windows)  # int8 dense layers cost about half: all stay dense
    assert all(layer.dense for layer in report.layers)
    assert report.correction_result == {} and report.correction_losses == []


def test_a_chain_runs_its_correctors_in_turn_and_keeps_the_one_shot_when_all_hurt(llama, windows, every_step_hurts):
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    chain = {"name": "chain", "correctors": [{"name": "compensate"}, {"name": "refine", "steps": 2, "validate_every": 1}]}
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32", corrector=chain), windows,
                                  validation=patterned_windows(4, seed=1))
    assert [s["cycle"] for s in report.correction_steps] == [1, 2, 1, 2]  # two decoder layers, then two steps
    assert len(report.correction_losses) == 2  # refine's
    assert not any(s["accepted"] for s in report.correction_steps)
    assert _same_weights(model, one_shot)


def test_a_chain_asks_for_what_its_correctors_need(llama, windows):
    chain = {"name": "chain", "correctors": ["compensate", {"name": "refine", "steps": 2, "windows": "training"}]}
    r = recipe(ratio=0.5, storage="fp32", corrector=chain)
    modifier = zsfw.load_recipe(r).modifier
    assert modifier.training_windows == 8  # refine trains on training windows: they are drawn
    r["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["execution"] = {"driver": "streamed"}
    with pytest.raises(zsfw.ZsfwError, match="corrector 'chain' with compensate \\(its copy of the uncompressed "
                                             "model\\) needs execution.driver 'memory'"):
        zsfw.compress(copy.deepcopy(llama), r, windows, validation=patterned_windows(4, seed=1))
    with pytest.raises(zsfw.ZsfwError, match="correctors must list at least one corrector"):
        zsfw.plugins.create("corrector", "chain", {"correctors": []})


def test_a_correction_that_ends_in_nan_gives_the_one_shot_state_back(llama, windows, monkeypatch):
    measured, calls = Correction.validation_loss, []

    def validation_loss(self):  # the one-shot state's, then NaN for every later state
        calls.append(self)
        return measured(self) if len(calls) == 1 else float("nan")

    monkeypatch.setattr(Correction, "validation_loss", validation_loss)
    one_shot, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32"), windows)
    corrected, report = zsfw.compress(copy.deepcopy(llama), _corrected(cycles=2, backtrack=0), windows,
                                      validation=patterned_windows(4, seed=1))
    assert _same_weights(corrected, one_shot)
    result = report.correction_result
    assert result["result"] == "reverted to one-shot" and result["final"] == result["one_shot"] < float("inf")


class _Moving:
    """A stand-in problem whose state is a number and whose validation loss is ``losses[state]``."""

    def __init__(self, losses):
        self.losses, self.state = losses, 0

    def validation_loss(self):
        return self.losses[self.state]

    def snapshot(self):
        return self.state

    def restore(self, state):
        self.state = state


@pytest.mark.parametrize("losses, path, kept, best, final", [
    ([3.0, 2.0, 2.5], [1, 2], False, 2.0, 1),  # the best step is taken back at the end
    ([3.0, 2.0, 1.0], [1, 2], True, 1.0, 2),  # the last step is the best: it stays
    ([3.0, 4.0, float("nan")], [1, 2], False, 3.0, 0),  # nothing beats the start; NaN is never kept
    ([3.0, 3.0], [1], True, 3.0, 1),  # as good as the best counts as kept
])
def test_keep_best_keeps_the_lowest_validation_loss_and_never_a_nan(losses, path, kept, best, final):
    from zsfw.compression.correct import KeepBest

    problem = _Moving(losses)
    tracker = KeepBest(problem)
    for state in path:
        problem.state = state
        assert tracker.offer() == (losses[state] < min(losses[:state]))
    assert tracker.settle() == kept
    assert tracker.loss == best and problem.state == final


def test_correction_implements_every_member_of_the_documented_interface():
    import inspect

    from zsfw.compression.correct import KeepBest
    from zsfw.protocols import CorrectionProblem, KeepBestTracker

    for protocol, implementation in ((CorrectionProblem, Correction), (KeepBestTracker, KeepBest)):
        methods = {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
        attributes = set(protocol.__annotations__)
        assert methods and attributes
        assert all(callable(getattr(implementation, n, None)) for n in methods), protocol.__name__
        source = "".join(inspect.getsource(c) for c in implementation.__mro__[:-1])  # attributes set in __init__
        assert all(f"self.{n}" in source or hasattr(implementation, n) for n in attributes), protocol.__name__
