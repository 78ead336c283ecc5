"""FermiGrad: the μ gradient against finite differences, the budget held by bisection, the
zero-step read-off, and a short run on a tiny model judged on validation windows."""

import copy

import pytest
import torch

import zsfw
from helpers import patterned_windows, recipe, stored_bytes
from zsfw import plugins
from zsfw_fermigrad import FermiGradAllocator, hold_budget, occupations, potential_gradient, soft_bytes


class ProbeFermi:
    """Model-aware: measures ∂loss/∂μ analytically and by central differences at one soft point,
    then hands over to FermiGrad with zero steps."""

    name = "probe_fermi"
    needs_model = True
    seen: dict = {}

    def allocate(self, problem):
        layers = list(problem.layers)
        full = torch.tensor([l.full_rank for l in layers], dtype=torch.float64)
        mu, T = 0.6 * full, torch.full_like(full, 2.0)
        _, analytic = potential_gradient(problem, layers, mu, T, full)
        i, h = int(analytic.abs().argmax()), 1e-2
        up, down = mu.clone(), mu.clone()
        up[i] += h
        down[i] -= h
        numeric = (potential_gradient(problem, layers, up, T, full)[0]
                   - potential_gradient(problem, layers, down, T, full)[0]) / (2 * h)
        ProbeFermi.seen = {"analytic": analytic[i].item(), "numeric": numeric}
        return FermiGradAllocator(steps=0).allocate(problem)


class Plugin:
    @zsfw.hookimpl
    def zsfw_register_allocators(self, register):
        register(ProbeFermi)


@pytest.fixture
def probe():
    plugins.register_plugin(Plugin(), name="probe_fermi")
    yield
    plugins.unregister_plugin("probe_fermi")


def test_the_potential_gradient_matches_a_finite_difference(probe, llama, windows):
    zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.7, allocator="probe_fermi", samples=4), windows[:4])
    seen = ProbeFermi.seen
    assert seen["analytic"] != 0 and seen["numeric"] == pytest.approx(seen["analytic"], rel=2e-2)


def test_the_shift_holds_the_soft_budget_to_one_component():
    g = torch.Generator().manual_seed(0)
    full = torch.tensor([40.0, 64.0, 24.0, 100.0], dtype=torch.float64)
    marginal = [torch.rand(int(r), generator=g, dtype=torch.float64) * 10 + 1 for r in full]
    mu = torch.tensor([10.0, 50.0, 3.0, 70.0], dtype=torch.float64)
    for T in (torch.full_like(full, 0.5), full / 20):
        for limit in (300, 700, 1100):  # all four layers whole cost ≈ 1340
            held = hold_budget(mu, T, marginal, limit, full)
            assert abs(soft_bytes(held, T, marginal, full) - limit) <= max(float(c.max()) for c in marginal)
            free = (held > 0) & (held < full)  # one shift in fractions of full rank, but where clamped
            shifts = ((held - mu) / full)[free]
            assert free.any() and torch.allclose(shifts, shifts[0].expand_as(shifts))


def test_occupations_are_a_step_at_zero_temperature():
    f = occupations(torch.tensor([3.0], dtype=torch.float64), torch.tensor([1e-6], dtype=torch.float64),
                    torch.tensor([6.0], dtype=torch.float64))[0]
    assert torch.equal(f, torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=torch.float64))


def test_zero_steps_at_zero_temperature_return_the_initial_allocation(llama, windows):
    validation = patterned_windows(4, seed=1)
    _, zero_sum = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows)
    fermi = {"name": "fermigrad", "steps": 0, "temperature": 1e-9, "final_temperature": 1e-9}
    _, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, allocator=fermi), windows,
                              validation=validation)
    assert [(l.name, l.rank) for l in report.layers] == [(l.name, l.rank) for l in zero_sum.layers]


def test_a_short_run_keeps_the_budget_and_measures_its_states_on_validation_windows(llama, windows, monkeypatch):
    from zsfw.compression.allocate import SoftTruncation

    judged = []
    measured = SoftTruncation.validation_loss
    monkeypatch.setattr(SoftTruncation, "validation_loss",
                        lambda self, f: judged.append(self.validation) or measured(self, f))
    validation = patterned_windows(4, seed=1)
    allocator = {"name": "fermigrad", "steps": 4, "validate_every": 2, "lr": 0.05}
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, allocator=allocator), windows,
                                  validation=validation)
    # the initial plan, the read-offs at steps 2 and 4, the soft model at the best state
    assert len(judged) == 4 and all(torch.equal(v, validation) for v in judged)
    summary = report.allocation
    assert summary["best_step"] in (0, 2, 4) and summary["hard_minus_soft"] == pytest.approx(
        summary["hard_validation_loss"] - summary["soft_validation_loss"])
    assert "allocation: steps 4" in report.table()
    assert stored_bytes(model, report) == report.total_bytes <= report.budget_bytes
    assert report.total_bytes > 0.95 * report.budget_bytes  # the read-off spends the budget


def test_when_every_read_off_is_worse_the_initial_plan_is_kept(llama, windows, monkeypatch):
    from zsfw.compression.allocate import SoftTruncation

    calls = []
    monkeypatch.setattr(SoftTruncation, "validation_loss", lambda self, f: calls.append(1) or float(len(calls) > 1))
    validation = patterned_windows(4, seed=1)
    _, zero_sum = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows)
    allocator = {"name": "fermigrad", "steps": 4, "validate_every": 2, "lr": 0.2}
    _, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, allocator=allocator), windows,
                              validation=validation)
    assert report.allocation["best_step"] == 0 and report.allocation["initial_validation_loss"] == 0.0
    assert [(l.name, l.rank) for l in report.layers] == [(l.name, l.rank) for l in zero_sum.layers]


@pytest.mark.parametrize("options, message", [({"steps": -1}, "steps must be >= 0"),
                                              ({"initial": "sigma"}, "initial must be one of"),
                                              ({"temperature": 0}, "temperature must be > 0")])
def test_options_are_checked(options, message):
    from zsfw.errors import PluginError

    with pytest.raises(PluginError, match=message):
        plugins.create("allocator", "fermigrad", options)


class QuadraticProblem:
    """Soft gradients chosen by hand: ∂loss/∂f_{l,i} = weight_l · (marginal bytes of component i),
    i.e. each layer's loss change per byte is its ``weight``; validation loss falls with every
    check, so the last read-off is the result."""

    def __init__(self, weights, storage="bf16", ratio=0.5):
        from zsfw import ByteBudget, LayerScores

        shapes = [(24, 40), (40, 40), (64, 24)]
        self.layers = [LayerScores(f"l{i}", m, n, False, torch.linspace(1, 0.1, min(m, n), dtype=torch.float64),
                                   torch.zeros(min(m, n), dtype=torch.float64)) for i, (m, n) in enumerate(shapes)]
        self.budget = ByteBudget(self.layers, ratio, plugins.create("storage", storage))
        self.weights, self.gradient_windows, self.checks = weights, 4, 0

    def soft_gradients(self, occupations, share):
        return 0.0, {l.name: w * torch.tensor([self.budget.cost(l, i + 1) - self.budget.cost(l, i)
                                               for i in range(l.full_rank)], dtype=torch.float64)
                     for l, w in zip(self.layers, self.weights)}

    def validation_loss(self, occupations):
        self.checks += 1
        return -float(self.checks)


def _ranks(weights, steps=6):
    problem = QuadraticProblem(weights)
    allocator = FermiGradAllocator(steps=steps, lr=0.02, temperature=0.02, final_temperature=0.2, initial="uniform")
    plan = allocator.allocate(problem)
    return [plan.rank(l.name) for l in problem.layers]


def test_equal_loss_per_byte_in_every_layer_is_a_fixed_point():
    start = _ranks([1e-3, 1e-3, 1e-3], steps=0)  # uniform, its bytes topped up to the budget
    assert _ranks([1e-3, 1e-3, 1e-3]) == start  # the optimality condition under a byte budget holds
    assert _ranks([5e-2, 5e-2, 5e-2]) == start  # whatever its size


def test_a_layer_whose_bytes_cost_more_loss_gives_rank_to_the_others():
    start = _ranks([1e-3, 1e-3, 4e-3], steps=0)
    ranks = _ranks([1e-3, 1e-3, 4e-3])  # keeping l2's components costs 4× more loss a byte
    assert ranks[2] < start[2] and ranks[0] >= start[0] and ranks[1] >= start[1] and ranks[:2] != start[:2]


@pytest.mark.parametrize("ratio", [0.55, 0.6])
def test_int8_budgets_near_or_past_every_layer_dense_give_a_finite_plan_within_the_budget(ratio):
    # int8 layers cost about half their 16-bit bytes: at 0.6 every layer fits dense, at 0.55 only
    # without their rank-0 costs (row scales), which the soft bytes did not count. Either pinned
    # every μ at full rank, where no byte moves with μ: 0/0 loss per byte, NaN μ, a crash in the
    # read-off (issue 35, R14)
    problem = QuadraticProblem([1e-3, 1e-3, 4e-3], storage="int8", ratio=ratio)
    dense = problem.budget.total(problem.layers, {l.name: l.full_rank for l in problem.layers})
    base = sum(problem.budget.cost(l, 0) for l in problem.layers)
    assert (dense <= problem.budget.limit) == (ratio == 0.6) and dense - base <= problem.budget.limit
    allocator = FermiGradAllocator(steps=6, lr=0.02, temperature=0.02, final_temperature=0.1, validate_every=2)
    plan = allocator.allocate(problem)
    plan.check_budget()
    if ratio == 0.6:  # nothing to trade: every layer dense, no step taken
        assert all(plan.is_dense(l.name) for l in problem.layers) and problem.checks == 0
    else:
        assert problem.checks == 5 and plan.total_bytes() > 0.9 * problem.budget.limit


def test_recipe_fermigrad_with_int8_factors_at_ratio_0_6_compresses_a_saved_model(tmp_path, tokenizer):
    import json
    from pathlib import Path

    import yaml

    from helpers import tiny_llama, word_docs
    from zsfw.cli import main

    # wide enough (all heads 16 wide) that at the recipe's final temperature every occupation
    # past the break-even saturates: f (1 - f) is 0 in float64 for every component that costs bytes
    tiny_llama(hidden_size=64, intermediate_size=128, num_key_value_heads=4).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cal.txt").write_text("\n".join(word_docs()))
    recipe = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "fermigrad.yaml").read_text())
    modifier = recipe["zero_sum_stage"]["compression_modifiers"]["ZeroSumSVDModifier"]
    modifier.update(ratio=0.6, storage="int8", calibration={"samples": 8, "sequence_length": 32,
                                                            "validation_samples": 4})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["compress", "--model", str(tmp_path / "model"), "--recipe", str(tmp_path / "r.yaml"),
                 "--dataset", str(tmp_path / "cal.txt"), "--output", str(tmp_path / "out"),
                 "--held-out", "0"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["bytes"] <= report["budget_bytes"]
    assert report["totals"]["dense_layers"] == 14 and report["allocation"]["steps"] == 0  # int8 dense fits
