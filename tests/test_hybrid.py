"""Formats with a quantized base: the pipeline factorizes the residual W − Q(W), allocates its
rank (0: the base alone) under the byte budget, and truncates to base + residual.

A made-up based format (per-tensor 4-bit grid, fp32 residual) keeps these tests independent of
any real quantizer: the real ones (``zsfw_groupwise``) are tested in ``test_groupwise.py``."""

import copy
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zsfw
from helpers import recipe, stored_bytes
from zsfw import plugins
from zsfw.errors import RecipeError
from zsfw.modules import StoredLinear

LEVELS = 7  # codes in -7..7


class GridLinear(nn.Module):
    """codes·step + B A, plus bias."""

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, B: torch.Tensor, A: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("step", step)
        self.B, self.A = nn.Parameter(B, requires_grad=False), nn.Parameter(A, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.codes.float() * self.step, self.bias)
        return out + (x @ self.A.T) @ self.B.T if self.A.shape[0] else out


class Grid:
    """A made-up format with a base: Q(W) on a per-tensor grid of 15 levels (int8 codes, one fp32
    step), the residual's factors in fp32; dense is fp32."""

    name: ClassVar[str] = "grid"
    has_base: ClassVar[bool] = True
    base_key = "grid15"
    needs_hessian = False

    def quantize(self, weight, hessian):
        step = weight.abs().max().float().clamp_min(1e-12) / LEVELS
        return (weight.float() / step).round().clamp(-LEVELS, LEVELS).to(torch.int8), step.reshape(())

    def dequantize(self, base):
        codes, step = base
        return codes.float() * step

    def base_tensors(self, base):
        return {"codes": base[0], "step": base[1]}

    def base_from_tensors(self, tensors):
        return tensors["codes"], tensors["step"]

    def lowrank_bytes(self, out_features, in_features, rank, bias):
        return out_features * in_features + 4 + 4 * rank * (out_features + in_features) + (4 * out_features if bias else 0)

    def dense_bytes(self, out_features, in_features, bias):
        return 4 * out_features * in_features + (4 * out_features if bias else 0)

    def hybrid_module(self, base, B, A, bias):
        return GridLinear(base[0], base[1], B.float(), A.float(), bias)

    def lowrank_module(self, B, A, bias):
        raise RuntimeError("a based format builds hybrid modules")

    def dense_module(self, linear):
        return StoredLinear.from_linear(linear, torch.float32)

    def skeleton(self, out_features, in_features, rank, bias):
        raise NotImplementedError  # never saved


class Plugin:
    @zsfw.hookimpl
    def zsfw_register_storage_formats(self, register):
        register(Grid)


@pytest.fixture(autouse=True)
def grid():
    plugins.register_plugin(Plugin(), name="grid_format")
    yield
    plugins.unregister_plugin("grid_format")


def test_a_based_format_allocates_residual_ranks_from_zero_and_stores_what_it_predicts(llama, windows):
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, storage="grid", whiten=True), windows)
    ranks = {layer.name: layer.rank for layer in report.layers}
    assert 0 in ranks.values() and any(r and r > 0 for r in ranks.values())  # some base alone, some residual
    assert stored_bytes(model, report) == sum(layer.bytes for layer in report.layers) <= report.budget_bytes
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        assert isinstance(module, GridLinear) and module.A.shape[0] == layer.rank


def test_rank_zero_is_the_base_alone_and_the_residual_brings_the_output_back(llama, windows):
    original = dict(llama.named_modules())
    from zsfw.compression.targets import find_targets

    shapes = [linear.weight.shape for linear in find_targets(llama, ["Linear"], []).values()]
    base_only = sum(Grid().lowrank_bytes(m, n, 0, False) for m, n in shapes) / sum(2 * m * n for m, n in shapes)
    low, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=base_only + 1e-6, storage="grid"), windows)
    high, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.9, storage="grid"), windows)
    for name, module in low.named_modules():
        if isinstance(module, GridLinear):
            assert module.A.shape[0] == 0
            W = original[name].weight.detach()
            torch.testing.assert_close(module.codes.float() * module.step, Grid().dequantize(Grid().quantize(W, None)))
    with torch.no_grad():
        reference, coarse, fine = (m(windows[:2]).logits for m in (llama, low, high))
    assert (fine - reference).norm() < (coarse - reference).norm()


def test_the_full_residual_reconstructs_the_weight(llama, windows):
    from zsfw.compression.factor_store import FactorStore
    from zsfw.compression.factorize import factorize
    from zsfw.compression.driver import InMemoryDriver
    from zsfw.recipe import CalibrationConfig
    from zsfw.compression.targets import find_targets
    from zsfw_zerosum import FirstOrderScorer

    model = copy.deepcopy(llama)
    targets = find_targets(model, ["Linear"], [])
    store = FactorStore.temporary()
    try:
        driver = InMemoryDriver(model, windows, CalibrationConfig(samples=8, sequence_length=32))
        factorize(targets, driver.statistics(targets, True, True), FirstOrderScorer(), 1e-6, store,
                  bases={"grid15": Grid()}, plain=False)
        for name, linear in targets.items():
            B, A = store.factors(name, torch.device("cpu"), "grid15")
            base = Grid().dequantize(Grid().base_from_tensors(store.base("grid15", name, torch.device("cpu"))))
            assert all(t.is_meta for t in store.base("grid15", name, torch.device("meta")).values())  # where asked
            torch.testing.assert_close(base + B @ A, linear.weight.detach(), rtol=1e-4, atol=1e-5)
            assert store.spectrum(name, "grid15").scores.shape == (min(linear.weight.shape),)
    finally:
        store.close()


def test_auto_chooses_between_a_based_format_and_factors_under_one_budget(llama, windows):
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, storage=["bf16", "grid"]), windows)
    assert stored_bytes(model, report) == sum(layer.bytes for layer in report.layers) <= report.budget_bytes
    assert {layer.format for layer in report.layers} <= {"bf16", "grid"}


def test_a_group_size_that_does_not_divide_a_layer_is_refused_alone_and_skipped_in_auto(llama, windows):
    with pytest.raises(RecipeError, match=r"storage 'int4' cannot hold layer 'model.layers.0.self_attn.q_proj' "
                                          r"\(32x32\) with its options .*group_size': 64.* a group_size that divides 32"):
        zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, storage={"name": "int4", "group_size": 64}), windows)
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.45, storage=["bf16", "int8", "int4"]), windows)
    chosen = {layer.name: layer.format for layer in report.layers}
    assert all(fmt != "int4" or model.get_submodule(name).in_features % 64 == 0 for name, fmt in chosen.items())
