"""The statistics cache: a hit skips the calibration pass; any change of weights, data or settings misses."""

import copy

import pytest
import torch

import zsfw


def _recipe(ratio=0.6, allocator="zero_sum", **calibration):
    return {"s": {"m": {"ZeroSumSVDModifier": {"ratio": ratio, "allocator": allocator, "calibration": {
        "samples": 8, "sequence_length": 32, **calibration}}}}}


def _no_pass(*args, **kwargs):
    raise AssertionError("the calibration pass ran despite a cached entry")


def test_a_hit_skips_the_pass_and_gives_the_same_model(llama, windows, tmp_path, monkeypatch):
    first, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert not report.statistics_cached and len(list(tmp_path.glob("statistics-*.safetensors"))) == 1
    monkeypatch.setattr("zsfw.pipeline.collect", _no_pass)
    monkeypatch.setattr("zsfw.pipeline._factorize", _no_pass)
    again, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert report.statistics_cached and report.factors_cached
    assert "factorize + score" not in report.timings
    with torch.no_grad():
        assert torch.equal(first(input_ids=windows).logits, again(input_ids=windows).logits)
    # another ratio and another allocator reuse the same entry
    _, report = zsfw.compress(copy.deepcopy(llama), _recipe(0.8, "uniform"), windows, statistics_cache=tmp_path)
    assert report.statistics_cached


@pytest.mark.parametrize("change", ["weight", "windows", "gradient_samples"])
def test_a_change_of_weights_data_or_settings_misses(llama, windows, tmp_path, change):
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    model, recipe = copy.deepcopy(llama), _recipe()
    if change == "weight":
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-3  # not even a target
    elif change == "windows":
        windows = windows.clone()
        windows[0, 0] = (windows[0, 0] + 1) % 64
    else:
        recipe = _recipe(gradient_samples=4)
    _, report = zsfw.compress(model, recipe, windows, statistics_cache=tmp_path)
    assert not report.statistics_cached
    assert len(list(tmp_path.glob("statistics-*.safetensors"))) == 2


def test_another_damping_reuses_the_statistics_but_not_the_factors(llama, windows, tmp_path):
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    recipe = _recipe()
    recipe["s"]["m"]["ZeroSumSVDModifier"]["damping"] = 1e-2
    _, report = zsfw.compress(copy.deepcopy(llama), recipe, windows, statistics_cache=tmp_path)
    assert report.statistics_cached and not report.factors_cached
    assert len(list(tmp_path.glob("factors-*"))) == 2 and not list(tmp_path.glob(".factors-*"))


def test_a_failed_factorization_leaves_no_cache_entry(llama, windows, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr("zsfw.pipeline.whitened_svd", broken)
    with pytest.raises(RuntimeError, match="converge"):
        zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert not list(tmp_path.glob("factors-*")) and not list(tmp_path.glob(".factors-*"))
