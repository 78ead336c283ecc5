"""The statistics cache: a hit skips the calibration pass; any change of weights, data or settings
misses; an unreadable entry is recomputed. Hits are observed through the report and the log."""

import copy
import json
import os
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

import zsfw
from helpers import recipe


def _recipe(ratio=0.6, allocator="zero_sum", **calibration):
    return recipe(ratio=ratio, allocator=allocator, **calibration)


def _entries(cache, kind):
    return sorted(p.name for p in cache.glob(f"{kind}-*"))


def test_a_hit_skips_the_pass_and_gives_the_same_model(llama, windows, tmp_path, caplog):
    first, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert not report.statistics_cached and len(_entries(tmp_path, "statistics")) == 1
    assert "statistics" in report.timings and "factorize + score" in report.timings
    with caplog.at_level(logging.INFO, logger="zsfw"):
        again, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert report.statistics_cached and report.factors_cached
    assert "statistics" not in report.timings and "factorize + score" not in report.timings
    assert any("whitened SVDs and scores from the cache" in r.message for r in caplog.records)
    with torch.no_grad():
        assert torch.equal(first(input_ids=windows).logits, again(input_ids=windows).logits)
    # another ratio and another allocator reuse the same entry
    _, report = zsfw.compress(copy.deepcopy(llama), _recipe(0.8, "uniform"), windows, statistics_cache=tmp_path)
    assert report.statistics_cached


@pytest.mark.parametrize("change", ["weight", "windows", "gradient_samples"])
def test_a_change_of_weights_data_or_settings_misses(llama, windows, tmp_path, change):
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    model, recipe_ = copy.deepcopy(llama), _recipe()
    if change == "weight":
        with torch.no_grad():
            model.model.norm.weight[0] += 1e-3  # not even a target
    elif change == "windows":
        windows = windows.clone()
        windows[0, 0] = (windows[0, 0] + 1) % 64
    else:
        recipe_ = _recipe(gradient_samples=4)
    _, report = zsfw.compress(model, recipe_, windows, statistics_cache=tmp_path)
    assert not report.statistics_cached
    assert len(_entries(tmp_path, "statistics")) == 2


def test_another_damping_reuses_the_statistics_but_not_the_factors(llama, windows, tmp_path, caplog):
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    recipe_ = _recipe()
    recipe_["test_stage"]["modifiers"]["ZeroSumSVDModifier"]["damping"] = 1e-2
    with caplog.at_level(logging.INFO, logger="zsfw"):
        _, report = zsfw.compress(copy.deepcopy(llama), recipe_, windows, statistics_cache=tmp_path)
    assert report.statistics_cached and not report.factors_cached
    assert any("calibration statistics from the cache" in r.message for r in caplog.records)
    assert len(_entries(tmp_path, "factors")) == 2 and not list(tmp_path.glob(".factors-*"))


def test_a_failed_factorization_leaves_no_cache_entry(llama, windows, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)  # what the whitened SVD runs on
    with pytest.raises(RuntimeError, match="converge"):
        zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert not _entries(tmp_path, "factors") and not list(tmp_path.glob(".factors-*"))


def test_r7_a_full_disk_under_the_statistics_cache_is_one_line_and_leaves_nothing(llama, windows, tmp_path,
                                                                                 monkeypatch):
    import errno

    from zsfw.compression import cache

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "save_file", full)
    with pytest.raises(zsfw.DestinationError, match=r"cannot write statistics in .*No space left on "
                                                     r"device.*--statistics-cache") as caught:
        zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert "\n" not in str(caught.value)
    assert not _entries(tmp_path, "statistics") and not list(tmp_path.glob(".statistics-*"))


def test_an_unreadable_entry_is_a_warned_miss_and_is_recomputed(llama, windows, tmp_path, caplog):
    first, _ = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    for entry in tmp_path.glob("factors-*/index.safetensors"):
        entry.write_bytes(b"not a safetensors file")
    for entry in tmp_path.glob("statistics-*/group-00000.safetensors"):
        entry.write_bytes(b"\x00" * 5)
    with caplog.at_level(logging.WARNING, logger="zsfw"):
        again, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert not report.statistics_cached and not report.factors_cached
    assert sum("unreadable" in r.message for r in caplog.records) == 2
    with torch.no_grad():
        assert torch.equal(first(input_ids=windows).logits, again(input_ids=windows).logits)
    _, report = zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=tmp_path)
    assert report.factors_cached  # the recomputed entries are whole again


def test_d9_leftovers_of_killed_runs_are_swept_and_a_run_leaves_nothing(llama, windows, tmp_path, monkeypatch):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that no longer runs
    spill, cache = tmp_path / "spill", tmp_path / "cache"
    monkeypatch.setenv("ZSFW_SPILL", str(spill))
    for stale in (spill / f"factors-{dead}-x", cache / f".factors-{dead}-y", cache / f".statistics-{dead}-z"):
        (stale / "svd.layer.safetensors").parent.mkdir(parents=True)
        (stale / "svd.layer.safetensors").write_bytes(b"left by kill -9")
    alive = spill / f"factors-{os.getpid()}-mine"  # a running process's spill is not touched
    alive.mkdir()
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows)
    assert sorted(p.name for p in spill.iterdir()) == [alive.name]
    zsfw.compress(copy.deepcopy(llama), _recipe(), windows, statistics_cache=cache)
    assert not list(cache.glob(".*")) and len(_entries(cache, "factors")) == 1


@pytest.fixture(scope="module")
def populated(windows, tmp_path_factory):
    """A trained tiny Llama, the logits of its compression without a cache, and a cache filled by
    the same compression."""
    from helpers import tiny_llama, train_briefly

    base = train_briefly(tiny_llama(), windows)
    uncached, _ = zsfw.compress(copy.deepcopy(base), _recipe(), windows)
    cache = tmp_path_factory.mktemp("cache")
    zsfw.compress(copy.deepcopy(base), _recipe(), windows, statistics_cache=cache)
    with torch.no_grad():
        return base, uncached(input_ids=windows).logits, cache


def _flip(key):
    """Damage: one byte in the middle of tensor ``key`` of a safetensors file inverted."""
    def damage(path):
        data = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        begin, end = json.loads(data[8:start])[key]["data_offsets"]
        data[start + (begin + end) // 2] ^= 0xFF
        path.write_bytes(data)
    return damage


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("entry, file, damage", [
    ("statistics", "group-00000.safetensors", _flip("C")),  # R2: a model that outputs NaN
    ("factors", "factors.model.layers.0.self_attn.q_proj.safetensors", _flip("B")),  # R2: another model
    ("factors", "index.safetensors", _flip("scores:model.layers.1.mlp.down_proj")),  # R2: another plan
    ("factors", "factors.model.layers.1.mlp.up_proj.safetensors", _truncate),  # R4: read lazily, later
    ("statistics", "group-00001.safetensors", _truncate),  # R4
], ids=["flipped C", "flipped factor", "flipped score", "truncated factor", "truncated statistics"])
def test_r2_r4_a_damaged_file_is_a_warned_miss_and_the_run_gives_the_uncached_model(
        populated, windows, tmp_path, caplog, entry, file, damage):
    base, uncached, filled = populated
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache)
    (path,) = cache.glob(f"{entry}-*/{file}")
    damage(path)

    def run():
        if entry == "statistics":  # read only when the factorization misses (as with another damping)
            for factors in cache.glob("factors-*"):
                shutil.rmtree(factors)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zsfw"):
            model, report = zsfw.compress(copy.deepcopy(base), _recipe(), windows, statistics_cache=cache)
        return model, report, [r.message for r in caplog.records if r.name == "zsfw.compression.cache"]

    model, report, warnings = run()
    assert len(warnings) == 1 and str(path.parent) in warnings[0] and f"(ValueError: {file} " in warnings[0], warnings
    assert not report.factors_cached and report.statistics_cached == (entry == "factors")
    with torch.no_grad():
        assert torch.equal(model(input_ids=windows).logits, uncached)
    rewritten, original = load_file(path), load_file(filled / path.parent.name / file)
    assert rewritten.keys() == original.keys() and all(torch.equal(rewritten[k], original[k]) for k in original)
    _, report, warnings = run()  # the rewritten entry is whole: a hit, no warning
    assert not warnings and (report.factors_cached if entry == "factors" else report.statistics_cached)
