"""`zsfw compress` end to end on a tiny saved model, and model-loading errors."""

import json
import re

import pytest

from helpers import word_docs
from zsfw.cli import main
from zsfw.errors import ModelLoadError
from zsfw.models import load_model


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
    # a short summary of what was gained and lost; the per-layer table goes to report.txt
    lines = printed.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("compressed 14 layers")
    assert lines[1].startswith("perplexity on 4 held-out windows of 32 tokens: ")
    assert lines[3].startswith("  before: ") and lines[4].startswith("  after:  ")
    assert lines[5].startswith(f"saved to {tmp_path / 'out'}")
    table = (tmp_path / "out" / "report.txt").read_text()
    assert "total:" in table and "model.layers.1.mlp.down_proj" in table and "w.err =" in table
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


def _tiny_model_folder(tmp_path, llama, tokenizer):
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "cal.txt").write_text("\n".join(word_docs()))
    (tmp_path / "r.yaml").write_text("s:\n  m:\n    ZeroSumSVDModifier:\n      ratio: 0.6\n"
                                     "      calibration: {samples: 6, sequence_length: 32}\n")
    return ["compress", "--model", str(model_dir), "--recipe", str(tmp_path / "r.yaml"),
            "--dataset", str(tmp_path / "cal.txt")]


def _one_line_error(capsys, *expected):
    """The error is one line, the last on stderr (progress bars and log lines may come before
    it), and no traceback is printed."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("zsfw: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert not any("Traceback" in line for line in err), err
    for text in expected:
        assert text in errors[0], errors
    return errors[0]


def test_d1_overwrite_refuses_a_folder_of_unrelated_files(tmp_path, llama, tokenizer, capsys):
    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    sandbox = tmp_path / "sandbox"
    (sandbox / "sub").mkdir(parents=True)
    (sandbox / "thesis.txt").write_text("precious")
    assert main([*command, "--output", str(sandbox), "--overwrite"]) == 2
    _one_line_error(capsys, "not a zsfw output")
    assert (sandbox / "thesis.txt").read_text() == "precious"
    assert main([*command, "--output", str(tmp_path / "model"), "--overwrite"]) == 2
    _one_line_error(capsys, "model's source")
    assert (tmp_path / "model" / "config.json").is_file()


def test_d16_output_dot_is_refused_before_any_work(tmp_path, llama, tokenizer, capsys, monkeypatch):
    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--output", ".", "--overwrite"]) == 2
    _one_line_error(capsys, "working folder")


def test_d5_an_unwritable_destination_fails_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compress", "--model", str(tmp_path / "no-model"), "--output", str(blocker / "out")]) == 2
    _one_line_error(capsys, "cannot write in", str(blocker))


def test_d14_eval_of_nothing_is_an_error(tmp_path, llama, tokenizer, capsys):
    import torch

    _tiny_model_folder(tmp_path, llama, tokenizer)
    assert main(["eval", str(tmp_path / "model"), "--dataset", str(tmp_path / "cal.txt"),
                 "--window", "1"]) == 2
    _one_line_error(capsys, "window must be at least 2 tokens")
    with torch.no_grad():  # every window's logits become NaN: perplexity is undefined
        llama.model.embed_tokens.weight.fill_(float("nan"))
    llama.save_pretrained(tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--dataset", str(tmp_path / "cal.txt"),
                 "--window", "16", "--windows", "2"]) == 2
    _one_line_error(capsys, "no window of 16 tokens had finite logits")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("zsfw.models.load_model", interrupted)
    assert main(["eval", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "zsfw: interrupted"


def test_d12_d13_help_version_and_errors_print_only_zsfw_lines(tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "zsfw.cli", *args], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)

    help_ = run("compress", "--help")
    assert help_.returncode == 0 and help_.stderr == ""
    assert "(default: 4)" in help_.stdout and "--held-out" in help_.stdout
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("zsfw ")
    error = run("eval", str(tmp_path / "missing"))
    assert error.returncode == 2
    assert error.stderr.strip().splitlines() == [error.stderr.strip()], error.stderr
    assert error.stderr.startswith("zsfw: error: ")


@pytest.mark.parametrize("case", ["empty dataset", "binary dataset", "garbage weights", "NaN weight",
                                  "misspelled storage option", "misspelled corrector option"])
def test_d6_predictable_failures_are_one_line_before_the_work(tmp_path, llama, tokenizer, capsys, case):
    import torch

    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    expected = []
    if case == "empty dataset":
        (tmp_path / "cal.txt").write_text("")
        expected = ["cal.txt"]
    elif case == "binary dataset":
        (tmp_path / "cal.txt").write_bytes(bytes(range(256)) * 64)
        expected = ["cal.txt", "cannot be read"]
    elif case == "garbage weights":
        (tmp_path / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
        expected = ["cannot load", "model"]
    elif case == "NaN weight":
        broken = type(llama).from_pretrained(tmp_path / "model")
        with torch.no_grad():
            broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
        broken.save_pretrained(tmp_path / "model")
        expected = ["'model.layers.1.mlp.up_proj.weight'", "NaN"]
    else:
        key, body = (("storage", "{name: int8, activaton: dynamic}") if "storage" in case
                     else ("corrector", "{name: projected_gradient, cycle: 2}"))
        (tmp_path / "r.yaml").write_text(f"s:\n  m:\n    ZeroSumSVDModifier:\n      {key}: {body}\n")
        expected = [f"ZeroSumSVDModifier.{key}.", "unknown option", "allowed:"]
    assert main([*command, "--output", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, *expected)
    assert not (tmp_path / "out").exists()


def test_d13_compress_without_output_says_so_before_the_work(tmp_path, llama, tokenizer, capsys):
    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    capsys.readouterr()
    assert main([*command, "--held-out", "0", "--table"]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("zsfw: no --output: the compressed model is measured, then discarded")
    out = captured.out.strip().splitlines()
    assert "w.err =" in captured.out and out[-2].startswith("compressed 14 layers")
    assert out[-1] == "not saved (no --output)"


def test_r6_compressing_a_zsfw_output_is_refused_before_calibration(tmp_path, llama, tokenizer, windows, capsys):
    import zsfw
    from helpers import recipe

    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    zsfw.compress(llama, recipe(), windows, output_dir=tmp_path / "small", tokenizer=tokenizer)
    command[2], command[-1] = str(tmp_path / "small"), str(tmp_path / "missing.txt")  # --model, --dataset
    # the calibration text does not exist: read first, it would be the error
    assert main([*command, "--output", str(tmp_path / "again")]) == 2
    _one_line_error(capsys, f"model {str(tmp_path / 'small')!r} is already compressed by zsfw",
                    "compress the original model instead")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("config,expected", [
    ('{"model_type": "llama", "quantization_config": {"quant',
     "is not valid JSON (Unterminated string starting at: line 1, column 49)"),
    ('[1, 2]', "holds a JSON list, not an object"),
], ids=["truncated", "list"])
def test_r9_inspect_of_a_damaged_config_is_one_line(tmp_path, capsys, config, expected):
    from zsfw.checkpoint.destination import is_zsfw_output
    from zsfw.checkpoint.contents import saved_modules
    from zsfw.errors import CheckpointError

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        saved_modules(tmp_path)
    assert not is_zsfw_output(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path / "config.json"), expected, "save or copy the model again")


@pytest.mark.parametrize("options,expected", [
    (["--max-new-tokens", "0"], "--max-new-tokens) must be at least 1, got 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens) must be at least 1, got -1"),
    (["--sample", "--temperature", "0"], "--temperature) must be > 0 when sampling, got 0.0"),
    (["--top-p", "2"], "--top-p) must be in (0, 1], got 2.0"),
    (["--max-new-tokens", "100000"], "is 100002 tokens, more than the model's context of 128"),
], ids=["zero", "negative", "temperature 0", "top-p 2", "past the context"])
def test_r8_run_settings_are_one_line_errors(tmp_path, tokenizer, capsys, options, expected):
    from helpers import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main(["run", str(tmp_path / "model"), "--prompt", "w1 w2", "--no-compile", *options]) == 2
    _one_line_error(capsys, expected)


@pytest.mark.parametrize("case,expected", [
    ("billion laughs", ["r.yaml: its YAML aliases expand to", "more than the 100000"]),
    ("latin-1 recipe", ["r.yaml: byte 5 (0xe9) is not UTF-8 text", "recipes must be UTF-8"]),
    ("number text", ["cal.jsonl' line 2: \"text\" is a JSON number, not a string"]),
    ("not an object", ["cal.jsonl' line 1 is a JSON array, not an object"]),
])
def test_r5_r10_r11_unreadable_recipes_and_calibration_lines_are_one_line(tmp_path, tokenizer, capsys, case,
                                                                       expected):
    from helpers import billion_laughs, tiny_llama

    command = _tiny_model_folder(tmp_path, tiny_llama(), tokenizer)
    if case == "billion laughs":
        (tmp_path / "r.yaml").write_text(billion_laughs())
    elif case == "latin-1 recipe":
        (tmp_path / "r.yaml").write_bytes("# café\ns:\n  m:\n    ZeroSumSVDModifier: {}\n".encode("latin-1"))
    else:
        (tmp_path / "cal.jsonl").write_text('{"text": "w1 w2"}\n{"text": 5}\n' if case == "number text"
                                            else '["w1 w2"]\n["w3"]\n')
        command[-1] = str(tmp_path / "cal.jsonl")
    assert main([*command, "--output", str(tmp_path / "out")]) == 2
    message = _one_line_error(capsys, *expected)
    assert len(message) < 500
    assert not (tmp_path / "out").exists()


LAZY = "      execution: {driver: streamed, weights: lazy}\n"


@pytest.mark.parametrize("case", ["no overwrite", "overwrite", "lazy weights"])
def test_r1_a_folder_made_at_the_output_during_the_run_is_never_replaced(tmp_path, llama, tokenizer, capsys,
                                                                         monkeypatch, case):
    from zsfw.checkpoint.destination import is_zsfw_output
    from zsfw.compression import pipeline

    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    out, flags = tmp_path / "out", ["--held-out", "0"]
    if case == "overwrite":  # an empty folder may be replaced: the run starts
        out.mkdir()
        flags.append("--overwrite")
    if case == "lazy weights":  # the layers are written as they are compressed
        with (tmp_path / "r.yaml").open("a") as recipe:
            recipe.write(LAZY)
    real = pipeline.truncate

    def notes_appear(*args, **kwargs):  # another program writes there while zsfw works
        out.mkdir(exist_ok=True)
        (out / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "truncate", notes_appear)
    assert main([*command, "--output", str(out), *flags]) == 2
    line = _one_line_error(capsys, "the compressed model is saved in",
                           "not a zsfw output" if case == "overwrite" else "already exists")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(("out.", ".out."))]
    assert kept.name.startswith("out.zsfw-saved-") and str(kept) in line
    assert is_zsfw_output(kept) and (kept / "model.safetensors").is_file() and (kept / "tokenizer.json").is_file()


@pytest.mark.parametrize("where", ["save", "factors", "hidden states"])
def test_r7_a_full_disk_mid_run_is_one_line_and_leaves_nothing(tmp_path, llama, tokenizer, capsys, monkeypatch,
                                                               where):
    import errno
    import os

    from safetensors import SafetensorError

    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    spill, out = tmp_path / "spill", tmp_path / "out"
    monkeypatch.setenv("ZSFW_SPILL", str(spill))
    out.mkdir()  # an earlier output, replaced only once the new one is complete
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "zsfw"}}))
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where != "save":  # safetensors' writer raises its own error, the errno in its message
        full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    if where == "hidden states":  # the streamed driver's boundaries wait in the spill folder
        with (tmp_path / "r.yaml").open("a") as recipe:
            recipe.write("      execution: {driver: streamed, offload: disk}\n")

    def disk_full(*args, **kwargs):
        raise full

    module = {"save": "checkpoint.save", "factors": "compression.factor_store", "hidden states": "compression.streaming"}
    monkeypatch.setattr(f"zsfw.{module[where]}.save_file", disk_full)
    assert main([*command, "--output", str(out), "--overwrite", "--held-out", "0"]) == 2
    folder = out if where == "save" else spill
    _one_line_error(capsys, f"in {str(folder)!r}: No space left on device; free space there or choose a folder "
                            f"on another disk: {'give it as --output' if where == 'save' else 'point ZSFW_SPILL'}")
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "model", "out", "r.yaml", "spill"]
    assert list(spill.iterdir()) == []


def test_r7_an_unwritable_spill_folder_fails_before_the_model_loads(tmp_path, llama, windows, capsys, monkeypatch):
    import zsfw
    from zsfw.errors import DestinationError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("ZSFW_SPILL", str(blocker / "spill"))
    assert main(["compress", "--model", str(tmp_path / "no-model")]) == 2
    _one_line_error(capsys, f"cannot write in {str(blocker / 'spill')!r}: ", "point ZSFW_SPILL to it")
    with pytest.raises(DestinationError, match="ZSFW_SPILL"):
        zsfw.compress(llama, None, windows)
    assert blocker.read_text() == "x" and list(tmp_path.iterdir()) == [blocker]


def test_r13_sigterm_is_one_line_exit_143_and_the_handler_is_restored(tmp_path, monkeypatch, capsys):
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr("zsfw.models.load_model", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["eval", str(tmp_path)]) == 143
    assert capsys.readouterr().err.strip() == "zsfw: terminated"
    assert signal.getsignal(signal.SIGTERM) is before


def test_r13_sigterm_mid_run_removes_the_temporary_folders(tmp_path, llama, tokenizer):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    import zsfw

    command = _tiny_model_folder(tmp_path, llama, tokenizer)
    with (tmp_path / "r.yaml").open("a") as recipe:  # a temporary output folder from the start
        recipe.write(LAZY)
    spill, out = tmp_path / "spill", tmp_path / "out"
    script = textwrap.dedent("""
        import runpy, sys, time
        from zsfw.compression import pipeline

        def working(*args, **kwargs):  # the factors in the spill folder, the output being written
            print("truncating", file=sys.stderr, flush=True)
            time.sleep(300)

        pipeline.truncate = working
        runpy.run_module("zsfw", run_name="__main__")
        """)
    root = str(Path(zsfw.__file__).parents[1])
    env = {**os.environ, "ZSFW_SPILL": str(spill),
           "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "plugins"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, *command, "--output", str(out)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = []
        for line in proc.stderr:
            err.append(line)
            if line.strip() == "truncating":
                break
        assert err and err[-1].strip() == "truncating", "".join(err)
        assert [p.name for p in spill.iterdir()][0].startswith("factors-")
        assert [p.name for p in tmp_path.glob(".out.zsfw-tmp-*")]
        proc.send_signal(signal.SIGTERM)
        err += proc.stderr.read().splitlines(keepends=True)
        assert proc.wait(timeout=60) == 143
    finally:
        proc.kill()
    lines = "".join(err).strip().splitlines()
    assert lines[-1] == "zsfw: terminated" and not any("Traceback" in line for line in lines), lines
    assert list(spill.iterdir()) == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "model", "r.yaml", "spill"]
