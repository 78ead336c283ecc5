"""What the factor store keeps: every component for the cache and for allocators that may keep
any, the top ones a storage format can keep below its dense cost otherwise (same model)."""

import copy

import pytest
import torch

import zsfw
from helpers import recipe
from zsfw import plugins
from zsfw.budget import useful_rank
from zsfw.compression.factor_store import FactorStore


@pytest.mark.parametrize("storage", ["bf16", "fp32", "int8", "packed", "pivga"])
@pytest.mark.parametrize("shape", [(32, 64, False), (64, 32, True), (48, 48, False), (5, 3, True)])
def test_useful_rank_is_the_highest_rank_below_the_dense_cost(storage, shape):
    fmt = plugins.create("storage", storage, {})
    out_f, in_f, bias = shape
    dense = fmt.dense_bytes(out_f, in_f, bias)
    below = [k for k in range(min(out_f, in_f)) if fmt.lowrank_bytes(out_f, in_f, k, bias) < dense]
    assert useful_rank(fmt, out_f, in_f, bias) == max(below, default=0)


def test_a_store_for_one_format_keeps_its_useful_ranks_and_gives_the_same_model(llama, windows, tmp_path,
                                                                                 monkeypatch):
    kept = {}
    put = FactorStore.put_layer

    def spy(self, scores, B, A, group, note="", variant=""):
        kept[scores.name] = (self.spill is not None, B.shape[1], A.shape[0], scores.full_rank)
        put(self, scores, B, A, group, note, variant)

    monkeypatch.setattr(FactorStore, "put_layer", spy)
    compact, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows)
    bf16 = plugins.create("storage", "bf16", {})
    for layer in report.layers:
        spilled, b_rank, a_rank, full = kept[layer.name]
        assert spilled and b_rank == a_rank == useful_rank(bf16, *layer.shape, False) < full
    kept.clear()
    # a cache entry keeps every component: any format and allocator can use it; same model
    full, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows, statistics_cache=tmp_path)
    assert all(not spilled and b == full_rank for spilled, b, _, full_rank in kept.values())
    with torch.no_grad():
        assert torch.equal(compact(input_ids=windows).logits, full(input_ids=windows).logits)


def test_an_allocator_keeping_any_component_gets_every_component(llama, windows, monkeypatch):
    kept = {}
    put = FactorStore.put_layer

    def spy(self, scores, B, A, group, note="", variant=""):
        kept[scores.name] = (B.shape[1], scores.full_rank)
        put(self, scores, B, A, group, note, variant)

    monkeypatch.setattr(FactorStore, "put_layer", spy)
    zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, allocator="greedy_negative"), windows)
    assert all(b == full for b, full in kept.values())


class Sneaky:
    """Keeps the last component of every layer without declaring keeps_any_component."""

    name = "sneaky"

    def allocate(self, layers, budget):
        return {l.name: torch.tensor([l.full_rank - 1]) for l in layers}


class SneakyPlugin:
    @zsfw.hookimpl
    def zsfw_register_allocators(self, register):
        register(Sneaky)


def test_a_plan_beyond_the_kept_components_is_refused_by_name(llama, windows):
    from zsfw.errors import AllocationError

    zsfw.register_plugin(SneakyPlugin(), name="sneaky-test")
    try:
        with pytest.raises(AllocationError, match="keeps_any_component = True"):
            zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, allocator="sneaky"), windows)
    finally:
        plugins.unregister_plugin("sneaky-test")


def test_host_and_device_copies_are_pinned_for_a_gpu_and_no_copies_on_the_cpu():
    from zsfw.compression.transfer import pinned, to_device, to_host

    assert pinned(torch.device("cuda", 0)) and not pinned(torch.device("cpu"))
    t = torch.randn(3, 4)
    assert to_device(t, torch.device("cpu")) is t
    host = to_host({"B": t, "A": t.T})
    assert host["B"].data_ptr() == t.data_ptr() and host["A"].is_contiguous()  # B: no copy and torch.equal(host["A"], t.T)
