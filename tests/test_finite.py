"""A compressed model whose output is NaN or Inf is refused before it is saved (issue 35, R3):
the error names the first module that outputs it, nothing is written, the CLI says so in one
line; ``allow_non_finite`` saves it with a warning; the summary never prints ``nan``."""

import copy
import re

import pytest
import torch

import zsfw
from helpers import recipe, word_docs
from zsfw.compression import truncate as truncation
from zsfw.errors import NonFiniteError

POISONED = "model.layers.1.mlp.up_proj"


@pytest.fixture
def poisoned(monkeypatch):
    """Truncation hands ``POISONED`` factors with one NaN (the other layers' are exact)."""
    kept = truncation.kept_factors

    def factors(store, name, allocation, device):
        B, A = kept(store, name, allocation, device)
        if name == POISONED:
            B = B.clone()
            B[0, 0] = float("nan")
        return B, A

    monkeypatch.setattr(truncation, "kept_factors", factors)


def test_a_nan_layer_is_named_and_nothing_is_saved(llama, windows, poisoned, tmp_path):
    with pytest.raises(NonFiniteError, match=rf"^after truncation, the output of '{POISONED}' is NaN or Inf "
                                             rf"on a calibration window: the compressed model was not saved; "
                                             rf".*allow_non_finite=True \(zsfw compress --allow-non-finite\)"):
        zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_allow_non_finite_saves_with_a_warning(llama, windows, poisoned, tmp_path):
    model, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows, output_dir=tmp_path / "out",
                                  allow_non_finite=True)
    (warning,) = report.warnings
    assert warning.startswith(f"after truncation, the output of '{POISONED}' is NaN or Inf") and "kept as asked" in warning
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not torch.isfinite(model(windows[:1]).logits).all()


def test_a_lazily_loaded_model_is_checked_layer_by_layer_and_nothing_is_written(llama, windows, poisoned,
                                                                                 tmp_path):
    from zsfw.residency import lazy_model

    llama.save_pretrained(tmp_path / "llama")
    lazy = recipe(ratio=0.6, execution={"driver": "streamed", "weights": "lazy"})
    with pytest.raises(NonFiniteError, match=f"^after truncation, the output of '{POISONED}' is NaN or Inf"):
        zsfw.compress(lazy_model(tmp_path / "llama"), lazy, windows, output_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no output, no unfinished folder


def test_a_lazily_loaded_models_tail_is_checked_after_its_last_layer(llama, windows, tmp_path, monkeypatch):
    from zsfw.residency import lazy_model

    llama.save_pretrained(tmp_path / "llama")
    model = lazy_model(tmp_path / "llama")
    kept = truncation.kept_factors

    def factors(*args):  # the final norm breaks once truncation begins
        model.model.norm.weight.data.fill_(float("inf"))
        return kept(*args)

    monkeypatch.setattr(truncation, "kept_factors", factors)
    lazy = recipe(ratio=0.6, execution={"driver": "streamed", "weights": "lazy"})
    with pytest.raises(NonFiniteError, match="^after truncation, the output of 'model.norm' is NaN or Inf"):
        zsfw.compress(model, lazy, windows, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_nan_after_correction_is_refused(llama, windows, tmp_path, monkeypatch):
    from zsfw.compression import pipeline

    correct = pipeline.correct

    def broken(corrector, problem):  # the corrected modules come out with a NaN
        losses = correct(corrector, problem)
        with torch.no_grad():
            problem.model.get_submodule(POISONED).B.weight[0, 0] = float("nan")
        return losses

    monkeypatch.setattr(pipeline, "correct", broken)
    corrected = recipe(ratio=0.6, corrector={"name": "projected_gradient", "cycles": 1})
    with pytest.raises(NonFiniteError, match=f"^after correction, the output of '{POISONED}' is NaN or Inf"):
        zsfw.compress(llama, corrected, windows, validation=windows[:2], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli(tmp_path, llama, tokenizer, *extra):
    from zsfw.cli import main

    llama.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "cal.txt").write_text("\n".join(word_docs()))
    (tmp_path / "r.yaml").write_text("s:\n  m:\n    ZeroSumSVDModifier:\n      ratio: 0.6\n"
                                     "      calibration: {samples: 6, sequence_length: 32}\n")
    return main(["compress", "--model", str(tmp_path / "model"), "--recipe", str(tmp_path / "r.yaml"),
                 "--dataset", str(tmp_path / "cal.txt"), "--output", str(tmp_path / "out"), *extra])


def test_the_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, llama, tokenizer, poisoned, capsys):
    assert _cli(tmp_path, llama, tokenizer) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"zsfw: error: after truncation, the output of '{POISONED}' is NaN or Inf")
    assert not any("Traceback" in line for line in err) and not (tmp_path / "out").exists()


def test_the_cli_flag_saves_and_the_summary_prints_no_nan(tmp_path, llama, tokenizer, poisoned, capsys):
    assert _cli(tmp_path, llama, tokenizer, "--allow-non-finite") == 0
    out = capsys.readouterr().out
    assert not re.search(r"\b(nan|inf)\b", out), out  # as Python prints them (the warning says NaN or Inf)
    assert "-> not finite" in out and f"warning: after truncation, the output of '{POISONED}'" in out
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_summary_says_not_finite_instead_of_nan():
    from types import SimpleNamespace

    from zsfw.eval.gains import Snapshot, summary

    report = SimpleNamespace(layers=[], timings={"all": 1.0}, reference_bytes=2e6, total_bytes=1e6, warnings=[])
    windows = torch.zeros(4, 32, dtype=torch.long)
    for after in (float("nan"), float("inf")):
        text = summary(report, None, Snapshot(51642.17, "a b"), Snapshot(after, ""), windows)
        assert "51642.17 -> not finite" in text and not re.search(r"\b(nan|inf)\b", text), text
    assert "(+0%)" in summary(report, None, Snapshot(3.0, "a"), Snapshot(3.0, "a"), windows)
