import pytest
import torch

from zsfw import plugins
from zsfw.budget import ByteBudget
from zsfw.errors import AllocationError
from zsfw.protocols import LayerScores


class CountFormat:
    """1 byte per kept element: easy numbers for hand-made instances."""

    name = "count"

    def lowrank_bytes(self, out_features, in_features, rank, bias):
        return rank * (out_features + in_features)

    def dense_bytes(self, out_features, in_features, bias):
        return 10**9  # never stay dense in these instances


def _layer(name, scores, m=4, n=4):
    scores = torch.tensor(scores, dtype=torch.float64)
    sigma = torch.arange(scores.numel(), 0, -1, dtype=torch.float64)
    return LayerScores(name, m, n, False, sigma, scores)


def _layers():
    # scores listed by component, largest σ first; drops happen from the end of each list
    return [_layer("a", [5.0, -0.1, 0.3, -0.2]),
            _layer("b", [4.0, 0.05, -0.4, 0.2]),
            _layer("c", [3.0, -0.3, 0.1, 0.15])]


def _simulate_zero_sum(layers, budget, uncounted=()):
    """The rule written out step by step, with no heaps (drops of ``uncounted`` layers are left
    out of the running sum)."""
    ranks = {l.name: l.full_rank for l in layers}
    picks, running = [], 0.0
    while budget.total(layers, ranks) > budget.limit:
        frontier = [(l, l.scores[ranks[l.name] - 1].item()) for l in layers if ranks[l.name] > 1]
        nonneg = [(abs(s), i, l, s) for i, (l, s) in enumerate(frontier) if s >= 0]
        neg = [(abs(s), i, l, s) for i, (l, s) in enumerate(frontier) if s < 0]
        pool = (nonneg or neg) if running <= 0 else (neg or nonneg)
        _, _, layer, score = min(pool, key=lambda t: (t[0], layers.index(t[2])))
        ranks[layer.name] -= 1
        running += 0.0 if layer.name in uncounted else score
        picks.append((layer.name, score))
    return ranks, picks


def _budget(layers, ratio):
    return ByteBudget(layers, ratio, CountFormat())


def test_zero_sum_matches_step_by_step_simulation():
    layers = _layers()
    for ratio in (0.9, 0.7, 0.5, 0.4):
        budget = _budget(layers, ratio)
        allocator = plugins.create("allocator", "zero_sum")
        ranks = allocator.allocate(layers, budget)
        expected_ranks, expected_picks = _simulate_zero_sum(layers, budget)
        assert ranks == expected_ranks
        assert [(layers[i].name, s) for i, s in allocator.picks] == expected_picks


class BreakEvenFormat(CountFormat):
    """1 byte a kept element, and a dense layer costs its m·n: layers above rank mn/(m+n) are dense."""

    def dense_bytes(self, out_features, in_features, bias):
        return out_features * in_features


def test_committed_only_leaves_the_drops_of_layers_that_end_dense_out_of_the_running_sum():
    g = torch.Generator().manual_seed(3)
    layers = [_layer(f"l{i}", (torch.randn(16, generator=g) * (i + 1)).tolist(), 16, 16) for i in range(6)]
    budget = ByteBudget(layers, 0.4, BreakEvenFormat())
    plain = plugins.create("allocator", "zero_sum").allocate(layers, budget)
    committed = plugins.create("allocator", "zero_sum", {"committed_only": True}).allocate(layers, budget)
    dense = {name for name in committed if committed.is_dense(name)}
    assert 0 < len(dense) < len(layers)  # some layers end dense: their drops were phantom
    expected, _ = _simulate_zero_sum(layers, budget, uncounted=dense)  # the fixed point it reached
    assert dict(committed) == {name: min(rank, 16) for name, rank in expected.items()}
    assert dict(committed) != dict(plain)  # the phantom drops did steer the plain allocation
    assert committed.total_bytes() <= budget.limit


def test_zero_sum_meets_budget_tightly_with_bounded_running_sum():
    g = torch.Generator().manual_seed(1)
    layers = [_layer(f"l{i}", (torch.randn(16, generator=g) * (i + 1)).tolist(), 16, 16)
              for i in range(6)]
    budget = _budget(layers, 0.3)
    allocator = plugins.create("allocator", "zero_sum")
    ranks = allocator.allocate(layers, budget)
    assert budget.total(layers, ranks) <= budget.limit
    # one drop fewer would not have met the budget
    i_last, _ = allocator.picks[-1]
    undo = dict(ranks, **{layers[i_last].name: ranks[layers[i_last].name] + 1})
    assert budget.total(layers, undo) > budget.limit
    running = 0.0
    ranks_now = {l.name: l.full_rank for l in layers}
    for i, score in allocator.picks:
        layer = layers[i]
        # each layer drops its components from the smallest σ upwards
        assert score == layer.scores[ranks_now[layer.name] - 1].item()
        frontier = [l.scores[ranks_now[l.name] - 1].item() for l in layers if ranks_now[l.name] > 1]
        # the sum only moves away from zero when no component could pull it back
        if running <= 0 and score < 0:
            assert all(s < 0 for s in frontier)
        if running > 0 and score >= 0:
            assert all(s >= 0 for s in frontier)
        running += score
        ranks_now[layer.name] -= 1
    assert ranks_now == ranks


def test_greedy_negative_keeping_top_k_drops_the_most_negative_frontier_first():
    layers = _layers()
    allocator = plugins.create("allocator", "greedy_negative", {"keep_top_k": True})
    allocator.allocate(layers, _budget(layers, 0.75))
    # frontier (a -0.2, b 0.2, c 0.15): -0.2 goes; then (0.3, 0.2, 0.15): 0.15; then (0.3, 0.2, 0.1)
    assert [s for _, s in allocator.picks[:3]] == [-0.2, 0.15, 0.1]


def test_greedy_negative_drops_anywhere_in_the_spectrum():
    layers = _layers()
    allocator = plugins.create("allocator", "greedy_negative")
    kept = allocator.allocate(layers, _budget(layers, 0.5))  # 6 of 12 components go
    # every negative first (-0.4, -0.3, -0.2, -0.1), then the smallest positives (0.05, 0.1)
    assert [s for _, s in allocator.picks] == [-0.4, -0.3, -0.2, -0.1, 0.05, 0.1]
    assert kept["a"].tolist() == [0, 2] and kept["b"].tolist() == [0, 3] and kept["c"].tolist() == [0, 3]


def test_uniform_gives_every_layer_the_same_ratio():
    layers = [_layer("sq", [0.0] * 32, 32, 32), _layer("tall", [0.0] * 16, 64, 16),
              _layer("wide", [0.0] * 24, 24, 96)]

    class Bf16:
        name = "bf16like"

        def lowrank_bytes(self, m, n, k, bias):
            return 2 * k * (m + n)

        def dense_bytes(self, m, n, bias):
            return 2 * m * n

    budget = ByteBudget(layers, 0.4, Bf16())
    ranks = plugins.create("allocator", "uniform").allocate(layers, budget)
    for layer in layers:
        kept = budget.cost(layer, ranks[layer.name]) / budget.reference_bytes(layer)
        step = 2 * (layer.out_features + layer.in_features) / budget.reference_bytes(layer)
        assert 0.4 - step < kept <= 0.4


def test_impossible_budget_is_a_clear_error():
    layers = _layers()
    with pytest.raises(AllocationError, match="cannot be met"):
        plugins.create("allocator", "zero_sum").allocate(layers, _budget(layers, 0.1))


def test_zero_sum_floor_keeps_a_share_of_the_uniform_rank_in_every_layer():
    g = torch.Generator().manual_seed(2)
    # one layer's components all look free to drop: without a floor it loses nearly everything
    layers = [_layer(f"l{i}", (torch.randn(16, generator=g) * (0.01 if i == 0 else 1)).tolist(), 16, 16)
              for i in range(4)]
    budget = _budget(layers, 0.4)
    free = plugins.create("allocator", "zero_sum").allocate(layers, budget)
    floored = plugins.create("allocator", "zero_sum", {"floor": 0.5}).allocate(layers, budget)
    floors = {l.name: -(-budget.uniform_rank(l) // 2) for l in layers}
    assert free["l0"] < floors["l0"]  # the floor binds here
    assert all(floored[name] >= k for name, k in floors.items())
    assert budget.total(layers, floored) <= budget.limit
    with pytest.raises(plugins.PluginError, match="floor"):
        plugins.create("allocator", "zero_sum", {"floor": 1.5})
