"""`zsfw compress` end to end on a tiny saved model, and model-loading errors."""

import json

import pytest

from conftest import word_docs
from zsfw.cli import main
from zsfw.models import ModelLoadError, load_model


def test_compress_command_writes_report_and_recipe(tmp_path, llama, tokenizer, capsys):
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "cal.txt").write_text("\n".join(word_docs()))
    (tmp_path / "r.yaml").write_text(
        "s:\n  m:\n    ZeroSumSVDModifier:\n      ratio: 0.6\n"
        "      calibration: {samples: 6, sequence_length: 32}\n")
    code = main(["compress", "--model", str(model_dir), "--recipe", str(tmp_path / "r.yaml"),
                 "--dataset", str(tmp_path / "cal.txt"), "--output", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "total:" in printed and "model.layers.1.mlp.down_proj" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["bytes"] <= report["budget_bytes"]
    assert (tmp_path / "out" / "recipe.yaml").read_text().startswith("s:")
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    # the saved folder evaluates like any model; compressing into it again is refused up front
    assert main(["eval", str(tmp_path / "out"), "--dataset", str(tmp_path / "cal.txt"),
                 "--window", "16", "--windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["compress", "--model", str(model_dir), "--recipe", str(tmp_path / "r.yaml"),
                 "--dataset", str(tmp_path / "cal.txt"), "--output", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_recipe_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("s:\n  m:\n    ZeroSumSVDModifier:\n      ratio: 2\n")
    assert main(["compress", "--model", str(tmp_path), "--recipe", str(tmp_path / "r.yaml"),
                 "--dataset", "x.txt"]) == 2
    assert "ratio" in capsys.readouterr().err


def test_model_loading_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(tmp_path / "m.gguf")
