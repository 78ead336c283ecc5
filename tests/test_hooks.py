"""The hook kinds the engine calls with the model: pre-compression stages and model-aware
allocators. Tiny plugins record what they receive; the tests check it is the right data."""

import copy

import pytest
import torch

import zsfw
from helpers import recipe
from zsfw import plugins
from zsfw.compression.targets import find_targets


class ScaleStage:
    """Multiplies the weights of the targets whose name ends in ``suffix`` by ``factor``."""

    name = "scale"
    calls: list = []

    def __init__(self, factor: float = 1.0, suffix: str = "up_proj") -> None:
        self.factor, self.suffix = factor, suffix

    def apply(self, model, targets, windows):
        ScaleStage.calls.append({"model": model, "targets": dict(targets), "windows": windows.clone()})
        scaled = [name for name in targets if name.endswith(self.suffix)]
        with torch.no_grad():
            for name in scaled:
                targets[name].weight.mul_(self.factor)
        return {"scaled": scaled}


class ProbeAllocator:
    """Model-aware: asks for the soft gradients at full occupation (and, with
    ``finite_difference``, checks one against the loss at nearby soft points), then keeps a quarter of
    every layer."""

    name = "probe"
    needs_model = True
    seen: list = []

    def __init__(self, finite_difference: bool = False) -> None:
        self.finite_difference = finite_difference

    def allocate(self, problem):
        full = {l.name: torch.ones(l.full_rank, dtype=torch.float64) for l in problem.layers}
        loss, grads = problem.soft_gradients(full)
        seen = {"problem": problem, "loss": loss, "grads": grads}
        if self.finite_difference:
            seen.update(self._finite_difference(problem, problem.layers[3]))
        ProbeAllocator.seen.append(seen)
        return zsfw.AllocationPlan(problem.layers, problem.budget,
                                   {l.name: max(1, l.full_rank // 4) for l in problem.layers})

    @staticmethod
    def _finite_difference(problem, layer, eps=1e-3):
        f = torch.ones(layer.full_rank, dtype=torch.float64)
        f[layer.full_rank // 2:] = 0.3  # a soft point away from the original
        weight = problem.targets[layer.name].weight.detach().clone()
        _, grads = problem.soft_gradients({layer.name: f})
        restored = torch.equal(problem.targets[layer.name].weight, weight)
        i = int(grads[layer.name].abs().argmax())
        up, down = f.clone(), f.clone()
        up[i] += eps
        down[i] -= eps
        numeric = (problem.soft_gradients({layer.name: up})[0]
                   - problem.soft_gradients({layer.name: down})[0]) / (2 * eps)
        return {"restored": restored, "numeric": numeric, "analytic": grads[layer.name][i].item()}


class Plugin:
    @zsfw.hookimpl
    def zsfw_register_stages(self, register):
        register(ScaleStage)

    @zsfw.hookimpl
    def zsfw_register_allocators(self, register):
        register(ProbeAllocator)


@pytest.fixture
def registered():
    zsfw.register_plugin(Plugin(), name="test_hooks")
    ScaleStage.calls.clear()
    ProbeAllocator.seen.clear()
    yield
    plugins.unregister_plugin("test_hooks")


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_a_stage_gets_the_model_targets_and_windows_and_its_changes_are_compressed(registered, llama, windows):
    stage = {"name": "scale", "factor": 0.5}
    model = copy.deepcopy(llama)
    compressed, report = zsfw.compress(model, recipe(ratio=1.0, stages=[stage]), windows)
    (call,) = ScaleStage.calls
    assert call["model"] is model
    assert list(call["targets"]) == list(find_targets(llama, ["Linear"], ["lm_head"]))
    assert torch.equal(call["windows"], windows)
    assert report.stages == [{"name": "scale", "options": {"factor": 0.5},
                              "summary": {"scaled": ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]}}]
    # ratio 1 keeps every layer dense (bf16): the result is the stage's model, not the original
    assert all(l.dense for l in report.layers)
    staged = copy.deepcopy(llama)
    with torch.no_grad():
        for layer in staged.model.layers:
            layer.mlp.up_proj.weight.mul_(0.5)
    to_staged = _relative_error(_logits(compressed, windows), _logits(staged, windows))
    assert to_staged < 1e-2
    assert _relative_error(_logits(compressed, windows), _logits(llama, windows)) > 10 * to_staged
    assert report.recipe["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["stages"] == [stage]


def test_stage_options_are_part_of_the_cache_key(registered, llama, windows, tmp_path):
    def run(factor):
        stages = [{"name": "scale", "factor": factor, "suffix": "no_such_layer"}]  # weights unchanged
        return zsfw.compress(copy.deepcopy(llama), recipe(stages=stages), windows,
                             statistics_cache=tmp_path)[1]

    assert not run(1.0).statistics_cached
    assert run(1.0).factors_cached
    assert not run(2.0).statistics_cached  # same weights, other stage settings: a miss


def test_a_cached_stage_result_is_loaded_instead_of_running_the_stage_again(registered, llama, windows, tmp_path):
    def run(factor):
        model = copy.deepcopy(llama)
        _, report = zsfw.compress(model, recipe(ratio=1.0, stages=[{"name": "scale", "factor": factor}]),
                                  windows, statistics_cache=tmp_path)
        return model, report

    first, report = run(0.5)
    assert len(ScaleStage.calls) == 1 and "cached" not in report.stages[0]
    again, report = run(0.5)
    assert len(ScaleStage.calls) == 1  # loaded, not run
    assert report.stages[0]["cached"] and report.stages[0]["summary"]["scaled"] == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert report.statistics_cached  # the loaded weights are the stage's: the statistics key matches
    assert torch.equal(_logits(first, windows), _logits(again, windows))
    run(0.25)  # other options: a miss
    assert len(ScaleStage.calls) == 2


def test_an_unreadable_stage_entry_is_a_miss_and_the_stage_runs_again(registered, llama, windows, tmp_path, caplog):
    def run():
        model = copy.deepcopy(llama)
        zsfw.compress(model, recipe(ratio=1.0, stages=[{"name": "scale", "factor": 0.5}]), windows,
                      statistics_cache=tmp_path)
        return model

    first = run()
    (entry,) = tmp_path.glob("stage-*")
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    again = run()
    assert len(ScaleStage.calls) == 2 and "unreadable" in caplog.text
    assert torch.equal(_logits(first, windows), _logits(again, windows))
    assert (entry / "model.safetensors").stat().st_size > 100  # recorded again


def test_a_model_aware_allocator_gets_the_problem_and_exact_soft_gradients(registered, llama, windows):
    _, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.9, allocator="probe"),
                              windows)
    (seen,) = ProbeAllocator.seen
    problem = seen["problem"]
    assert [l.name for l in problem.layers] == list(find_targets(llama, ["Linear"], ["lm_head"]))
    assert problem.budget.limit == report.budget_bytes
    # at full occupation the soft model is the original: its loss is the calibration loss, and
    # dL/df_i = sigma_i u_i' G S^-T v_i, minus the first-order score of component i
    assert seen["loss"] == pytest.approx(report.calibration_loss, rel=1e-4)
    for layer in problem.layers:
        assert torch.allclose(seen["grads"][layer.name], -layer.scores, rtol=1e-3, atol=1e-7), layer.name
    # the plan it returned is the one applied
    assert all(l.rank == max(1, l.full_rank // 4) for l in report.layers)


def test_soft_gradients_match_finite_differences_and_restore_the_weights(registered, llama, windows):
    allocator = {"name": "probe", "finite_difference": True}
    zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.9, allocator=allocator,
                                               samples=4), windows[:4])
    (seen,) = ProbeAllocator.seen
    assert seen["restored"]
    assert seen["numeric"] == pytest.approx(seen["analytic"], rel=2e-2)
