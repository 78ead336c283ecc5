"""storage: auto — a storage format per layer: the choice against brute force, the budget, mixed
checkpoints and the recipe's list form."""

import copy
import itertools
from typing import ClassVar

import pytest
import torch

import zsfw
from helpers import recipe
from zsfw import plugins
from zsfw.errors import CheckpointError, PluginError, RecipeError
from zsfw.modules import LowRankLinear, StoredLinear
from zsfw_auto import AutoStorage, Options, lagrangian_choice, options

FORMATS = ["bf16", "pivga", "int8", "packed"]


class Coarse:
    """A made-up 8-bit format: one byte a number, factors rounded to a grid of 1/8."""

    name: ClassVar[str] = "coarse"

    def lowrank_bytes(self, out_features, in_features, rank, bias):
        return rank * (out_features + in_features)

    def dense_bytes(self, out_features, in_features, bias):
        return out_features * in_features

    def lowrank_module(self, B, A, bias):
        return LowRankLinear.from_factors((B * 8).round() / 8, (A * 8).round() / 8, bias, torch.float64)

    def dense_module(self, linear):
        module = StoredLinear.from_linear(linear, torch.float64)
        with torch.no_grad():
            module.weight.copy_((module.weight * 8).round() / 8)
        return module

    def skeleton(self, out_features, in_features, rank, bias):
        raise NotImplementedError  # never saved


class Plugin:
    @zsfw.hookimpl
    def zsfw_register_storage_formats(self, register):
        register(Coarse)


@pytest.fixture
def coarse():
    plugins.register_plugin(Plugin(), name="coarse_format")
    yield
    plugins.unregister_plugin("coarse_format")


class HandMade:
    """Two 12×12 layers (LayerFactors): ``flat`` has twelve equal singular values (every extra
    rank pays), ``steep`` one large one and a tail of 1e-6 (rank 1 is the whole layer)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.sigma = {"flat": torch.ones(12, dtype=torch.float64),
                      "steep": torch.tensor([1.0] + [1e-6] * 11, dtype=torch.float64)}
        self.bases = {name: [torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))[0]
                             for _ in range(2)] for name in self.sigma}

    def layers(self) -> list[zsfw.LayerScores]:
        return [zsfw.LayerScores(name, 12, 12, False, sigma, 0.01 * sigma) for name, sigma in self.sigma.items()]

    def factors(self, name):
        U, V = self.bases[name]
        root = self.sigma[name].sqrt()
        return U * root, root[:, None] * V.T

    def whitener(self, name):
        return None

    def bias(self, name):
        return None


def brute_force(choices: list[list[Options]], limit: float) -> list[int]:
    """The member of every layer in the cheapest-loss combination of options within ``limit``."""
    best = (float("inf"), None)
    flat = [[(member, i) for member, o in enumerate(layer) for i in range(len(o.costs))] for layer in choices]
    for combination in itertools.product(*flat):
        cost = sum(float(choices[l][m].costs[i]) for l, (m, i) in enumerate(combination))
        loss = sum(float(choices[l][m].losses[i]) for l, (m, i) in enumerate(combination))
        if cost <= limit and loss < best[0]:
            best = (loss, [m for m, _ in combination])
    return best[1]


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.4, 0.3])
def test_the_choice_is_the_brute_force_choice_on_a_hand_made_two_layer_case(coarse, ratio):
    case = HandMade()
    auto = AutoStorage(["bf16", "coarse"])
    layers = case.layers()
    chosen = auto.choose(layers, ratio, case)
    members = list(auto.members.values())
    budgets = [zsfw.ByteBudget(layers, ratio, m) for m in members]
    choices = [[options(layer, m, b.uniform_rank(layer), case) for m, b in zip(members, budgets)] for layer in layers]
    expected = brute_force(choices, budgets[0].limit)
    assert {name: f.name for name, f in chosen.items()} == {l.name: members[m].name for l, m in zip(layers, expected)}
    if ratio in (0.4, 0.5):  # the budget makes the layers differ: flat dense in one byte, steep at rank 1 in bf16
        assert chosen["flat"].name == "coarse" and chosen["steep"].name == "bf16"


def test_quantization_error_is_measured_from_the_format_module(coarse):
    case = HandMade()
    flat = case.layers()[0]
    exact, rounded = (options(flat, zsfw.storage_format(name), 3, case) for name in ("fp32", "coarse"))
    ranks = torch.arange(1, len(exact.costs), dtype=torch.float64)  # fp32: ranks 1..5 beat the dense cost
    assert torch.allclose(exact.losses[:-1], 0.01 * (12 - ranks), rtol=0, atol=1e-6)  # the dropped tail (+ fp32 read-back)
    assert exact.losses[-1] < 1e-6  # an fp32 dense layer loses nothing
    assert (rounded.losses[:len(ranks)] > exact.losses[:-1] + 1e-4).all()  # the grid's error, measured, is added
    assert rounded.losses[-1] > 1e-4


def test_lagrangian_choice_stays_within_the_limit():
    generator = torch.Generator().manual_seed(1)
    choices = [[Options(torch.arange(1.0, 9.0, dtype=torch.float64) * (f + 1),
                        torch.rand(8, generator=generator, dtype=torch.float64).sort(descending=True).values)
                for f in range(3)] for _ in range(5)]
    for limit in (5.0, 12.0, 30.0, 100.0):
        picked = lagrangian_choice(choices, limit)
        spent = sum(float(layer[m].costs[i]) for layer, (m, i) in zip(choices, picked))
        assert spent <= max(limit, 5.0)  # 5.0: one byte a layer, the cheapest there is


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from helpers import patterned_windows, tiny_qwen2, train_briefly

    windows = patterned_windows()
    base = train_briefly(tiny_qwen2(), windows)
    out = tmp_path_factory.mktemp("auto") / "model"
    model, report = zsfw.compress(copy.deepcopy(base), recipe(ratio=0.6, storage=FORMATS), windows, output_dir=out)
    return windows, model, report, out


def test_auto_mixes_formats_within_the_budget_and_records_each_layer(mixed):
    _, model, report, out = mixed
    assert len(report.format_counts) >= 2, report.format_counts
    assert report.total_bytes <= report.budget_bytes
    config = model.config.quantization_config
    assert config.storage == {"name": "auto", "options": {"formats": FORMATS}}
    assert {name: row["format"] for name, row in config.modules.items()} == {l.name: l.format for l in report.layers}
    assert all(layer.written_bytes == layer.bytes for layer in report.layers)  # predicted = written, per format
    assert "formats: " in report.table()


def test_a_mixed_checkpoint_reloads_with_the_same_logits(mixed):
    windows, model, _, out = mixed
    reloaded = zsfw.load(out)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=windows).logits, model(input_ids=windows).logits)
    for name in model.config.quantization_config.modules:  # each module rebuilt in its own format
        def kinds(m):
            return {k: (type(v).__name__, v.dtype, tuple(v.shape)) for k, v in m.get_submodule(name).state_dict().items()}
        assert kinds(reloaded) == kinds(model), name


def test_a_record_naming_a_format_auto_does_not_hold_is_one_line(mixed):
    from zsfw.checkpoint.schema import ZsfwConfig
    from zsfw.checkpoint.schema import ModuleRecord

    config = ZsfwConfig(1, {"name": "auto", "options": {"formats": ["bf16", "int8"]}}, {})
    with pytest.raises(CheckpointError, match=r"stored as 'packed', which storage 'auto' does not hold \(it holds"):
        config.storage_format("m", ModuleRecord("packed", 8, 8, 2, False))


def test_the_list_form_and_bad_lists():
    assert zsfw.load_recipe(recipe(storage=["bf16", "int8"])).modifier.storage.to_yaml() == {
        "name": "auto", "formats": ["bf16", "int8"]}
    with pytest.raises(ValueError, match="lists 'int8' twice"):
        AutoStorage(["int8", "int8"])
    with pytest.raises(ValueError, match="chooses formats itself"):
        AutoStorage(["bf16", "auto"])
    with pytest.raises(ValueError, match="non-empty list"):
        AutoStorage("bf16")
    with pytest.raises(PluginError, match="storage 'nope' is not registered"):
        AutoStorage(["bf16", "nope"])
    with pytest.raises(RecipeError):
        zsfw.load_recipe(recipe(storage={"name": "auto", "colours": 3}))


class HandMadeResiduals(HandMade):
    """``HandMade`` with residuals on an int4 base (group 12): ``flat``'s is spread thin, ``steep``'s
    one component (a cheap rank-1 residual removes it)."""

    RESIDUAL = {"flat": torch.full((12,), 0.05, dtype=torch.float64),
                "steep": torch.tensor([0.3] + [1e-4] * 11, dtype=torch.float64)}

    def spectrum(self, name, variant=""):
        if not variant:
            return next(l for l in self.layers() if l.name == name)
        sigma = self.RESIDUAL[name]
        return zsfw.LayerScores(name, 12, 12, False, sigma, 0.01 * sigma)


@pytest.mark.parametrize("ratio", [0.8, 0.5, 0.42, 0.36])
def test_with_a_quantized_base_member_the_choice_is_the_brute_force_choice(ratio):
    case = HandMadeResiduals()
    auto = AutoStorage(["bf16", "pivga", {"name": "int4", "group_size": 12}])
    layers = case.layers()
    chosen = auto.choose(layers, ratio, case)
    members = list(auto.members.values())
    budgets = [zsfw.ByteBudget(layers, ratio, m) for m in members]
    choices = [[options(layer, m, b.uniform_rank(layer), case) for m, b in zip(members, budgets)] for layer in layers]
    based = choices[0][2]  # flat in int4: rank 0.. then dense; loss κ·√(Σ_{i≥k} σ_i²) of the residual
    kappa = 0.01  # |ΔL_i| / σ_i of the hand-made scores
    assert based.costs[0] == members[2].base_bytes(12, 12) and based.costs[-1] == 12 * 12 * 2
    assert torch.allclose(based.losses[:-1], kappa * 0.05 * (12 - torch.arange(len(based.costs) - 1.0)).sqrt().double())
    expected = brute_force(choices, budgets[0].limit)
    assert {name: f.name for name, f in chosen.items()} == {l.name: members[m].name for l, m in zip(layers, expected)}
    if ratio < 0.5:  # the flat layer is cheapest as its int4 base, the steep one as rank-1 factors
        assert chosen["flat"].name == "int4" and chosen["steep"].name == "pivga"
