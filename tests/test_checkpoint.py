"""Saving compressed models: formats, exact bytes, reload with transformers, atomic writes, errors."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zsfw
from helpers import patterned_windows, recipe, tiny_llama
from zsfw.checkpoint.save import header_bytes, module_tensors
from zsfw.checksums import sha256_of
from zsfw.errors import CheckpointError, DestinationError

FORMATS = {  # label -> the recipe's storage spec
    "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8",
    "int8-dynamic": {"name": "int8", "activation": "dynamic"}, "fp8": "fp8", "packed": "packed",
    "pivga": "pivga", "pivga-int8": {"name": "pivga", "dtype": "int8"},
    "auto": ["bf16", "pivga", "int8", "packed"],  # auto: a format per layer
    "int4": {"name": "int4", "group_size": 16},  # a quantized base plus a residual (width 32)
    "int3-gptq": {"name": "int3", "group_size": 16, "rounding": "gptq"},
    "auto-bits": {"name": "auto", "formats": ["bf16", "int8", {"name": "int4", "group_size": 16},
                                             {"name": "int2", "group_size": 16}]},
}


def _recipe(storage, ratio=0.6):
    return recipe(ratio=ratio, storage=storage)


def _logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows).logits


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every format: a compressed tiny Qwen2 (biases) saved, and its in-memory logits."""
    from helpers import patterned_windows, tiny_qwen2, train_briefly

    windows = patterned_windows()
    base = train_briefly(tiny_qwen2(), windows)
    root = tmp_path_factory.mktemp("saved")
    out = {}
    for label, storage in FORMATS.items():
        model, report = zsfw.compress(copy.deepcopy(base), _recipe(storage), windows,
                                      output_dir=root / label)
        out[label] = (root / label, model, report, _logits(model, windows))
    return windows, out


def test_reload_in_a_fresh_process_gives_bit_identical_logits(saved):
    windows, runs = saved
    torch.save(windows, runs["bf16"][0].parent / "windows.pt")
    result = _run("""
        import sys, torch
        import zsfw  # registers the quantizer; the load itself is plain transformers
        from transformers import AutoModelForCausalLM
        from safetensors.torch import save_file
        windows = torch.load(sys.argv[1])
        out = {}
        for path in sys.argv[2:]:
            model = AutoModelForCausalLM.from_pretrained(path)
            with torch.no_grad():
                out[path] = model(input_ids=windows).logits
        save_file({str(i): v.contiguous() for i, v in enumerate(out.values())}, sys.argv[1] + ".logits")
        """, str(runs["bf16"][0].parent / "windows.pt"), *(str(p) for p, *_ in runs.values()))
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = load_file(str(runs["bf16"][0].parent / "windows.pt") + ".logits")
    for i, (label, (_, model, _, logits)) in enumerate(runs.items()):
        assert torch.equal(reloaded[str(i)], logits), label


def test_without_import_zsfw_a_saved_folder_refuses_to_load(saved):
    _, runs = saved
    result = _run("""
        import sys
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
        """, str(runs["bf16"][0]))
    assert result.returncode != 0 and "model type `zsfw`" in result.stderr, result.stderr[-2000:]
    config = json.loads((runs["bf16"][0] / "config.json").read_text())
    assert config["model_type"] == "zsfw" and config["zsfw_base_model_type"] == "qwen2"


def test_identical_runs_write_identical_files(saved, tmp_path):
    _, runs = saved
    path, model, report, _ = runs["int8"]  # torchao metadata: the most header keys
    zsfw.save(model, tmp_path / "again")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (path / name).read_bytes(), name


def test_outputs_honour_the_umask(saved, tmp_path):
    _, runs = saved
    old = os.umask(0o022)
    try:
        zsfw.save(runs["bf16"][1], tmp_path / "shared")
    finally:
        os.umask(old)
    assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "shared").iterdir() if p.is_file()} == {0o644}


def test_written_bytes_equal_predicted_and_files_add_up(saved):
    _, runs = saved
    for label, (path, _, report, _) in runs.items():
        on_disk = json.loads((path / "report.json").read_text())
        for layer in on_disk["layers"]:
            assert layer["written_bytes"] == layer["bytes"], (label, layer["name"])
        with safe_open(path / "model.safetensors", framework="pt") as f:
            data = sum(f.get_tensor(k).nbytes for k in f.keys())
        size = (path / "model.safetensors").stat().st_size
        assert size == data + header_bytes(path / "model.safetensors")
        assert on_disk["totals"]["file_bytes"] == size
        assert on_disk["totals"]["written_bytes"] == on_disk["totals"]["bytes"]


def test_saved_folder_is_a_normal_pretrained_folder(saved):
    _, runs = saved
    path = runs["int8"][0]
    config = json.loads((path / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "zsfw" and q["format_version"] == 1 and q["storage"]["name"] == "int8"
    assert set(q["modules"]) == {n for n, m in runs["int8"][1].named_modules()
                                 if n.endswith("_proj")}
    assert {"recipe.yaml", "report.json", "config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in path.iterdir())


def test_in_process_load_gives_the_same_model(saved):
    windows, runs = saved
    path, model, _, logits = runs["packed"]
    loaded = zsfw.load(path)
    assert torch.equal(_logits(loaded, windows), logits)
    # one config form: the same ZsfwConfig class and content after compress and after loading
    from zsfw.checkpoint.schema import ZsfwConfig

    before, after = model.config.quantization_config, loaded.config.quantization_config
    assert type(before) is ZsfwConfig and type(after) is ZsfwConfig
    assert before.to_dict() == after.to_dict() and before.records() == after.records()


def test_packed_is_smaller_on_disk_than_bf16_at_the_same_rank(tmp_path):
    torch.manual_seed(0)
    for out_f, in_f in ((64, 32), (32, 64), (48, 48)):
        B, A = torch.randn(out_f, 8), torch.randn(8, in_f)
        sizes = {}
        for name in ("bf16", "packed"):
            fmt = zsfw.plugins.create("storage", name)
            module = fmt.lowrank_module(B, A, torch.randn(out_f))
            tensors, metadata = module_tensors("layer", module)
            assert sum(t.nbytes for t in tensors.values()) == fmt.lowrank_bytes(out_f, in_f, 8, True)
            save_file(tensors, tmp_path / f"{name}.safetensors", metadata={"format": "pt"})
            sizes[name] = (tmp_path / f"{name}.safetensors").stat().st_size
        assert sizes["packed"] < sizes["bf16"]
        # bf16 factors: 8·(m+n)·2 bytes; packed: 8·max(m,n)·2 + scales
        assert sizes["bf16"] - sizes["packed"] >= 8 * min(out_f, in_f) * 2 - 2 * 8 * 4 - 200


def test_packed_roundtrip_is_int8_accurate():
    torch.manual_seed(0)
    for out_f, in_f in ((64, 32), (32, 64)):
        B, A = torch.randn(out_f, 8), torch.randn(8, in_f)
        module = zsfw.plugins.create("storage", "packed").lowrank_module(B, A, None)
        x = torch.randn(5, in_f)
        exact = x @ A.T @ B.T
        assert ((module(x) - exact).norm() / exact.norm()).item() < 0.02
        # the packed words really hold both int8 blocks: rebuilding from the buffers alone
        clone = type(module)(in_f, out_f, 8, bias=False)
        clone.load_state_dict(module.state_dict())
        assert torch.equal(clone(x), module(x))


def test_int8_keeps_about_twice_the_rank_of_bf16():
    from zsfw.budget import ByteBudget
    from zsfw.protocols import LayerScores

    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # SmolLM2-135M's layer shapes
    layers = [LayerScores(f"l{i}", m, n, False, torch.linspace(1, 0.01, min(m, n)), torch.zeros(min(m, n)))
              for i, (m, n) in enumerate(shapes)]
    ranks = {}
    for storage in ("bf16", "int8"):
        budget = ByteBudget(layers, 0.4, zsfw.plugins.create("storage", storage))
        chosen = zsfw.plugins.create("allocator", "uniform").allocate(layers, budget)
        assert budget.total(layers, chosen) <= budget.limit
        ranks[storage] = sum(chosen.values())
    # exactly 2× but for int8's 5 bytes per row of scale and zero point
    assert 1.9 < ranks["int8"] / ranks["bf16"] <= 2.0, ranks


def test_existing_output_is_refused_unless_overwrite(llama, windows, tmp_path):
    out = tmp_path / "out"
    _previous_output(out)
    with pytest.raises(DestinationError, match="overwrite"):
        zsfw.compress(copy.deepcopy(llama), _recipe("bf16"), windows, output_dir=out)
    assert (out / "keep.txt").read_text() == "mine"
    zsfw.compress(copy.deepcopy(llama), _recipe("bf16"), windows, output_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders left


@pytest.mark.parametrize("case", ["unrelated files", "model source", "working folder", "home"])
def test_overwrite_never_replaces_what_is_not_a_zsfw_output(llama, windows, tmp_path, monkeypatch, case):
    out = tmp_path / "sandbox"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("precious")
    model = copy.deepcopy(llama)
    expected = "not a zsfw output"
    if case == "model source":
        model.save_pretrained(out / "sub")
        (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "zsfw"}}))
        model = type(llama).from_pretrained(out / "sub")
        expected = "contains the model's source"
    elif case == "working folder":
        monkeypatch.chdir(out / "sub")
        expected = "contains the working folder"
    elif case == "home":
        monkeypatch.setenv("HOME", str(out))
        expected = "is or contains the home folder"
    with pytest.raises(DestinationError, match=expected):
        zsfw.compress(model, _recipe("bf16"), windows, output_dir=out, overwrite=True)
    assert (out / "thesis.txt").read_text() == "precious" and (out / "sub").is_dir()


def test_r7_a_full_disk_during_the_save_is_one_line_and_leaves_nothing(llama, windows, tmp_path, monkeypatch):
    import errno

    model, report = zsfw.compress(copy.deepcopy(llama), _recipe("bf16"), windows)
    monkeypatch.setattr("zsfw.checkpoint.save.save_file", lambda *args, **kwargs: _raise(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(DestinationError) as refused:
        zsfw.save(model, tmp_path / "new")
    message = str(refused.value)
    assert message.startswith(f"cannot write the compressed model in {str(tmp_path / 'new')!r}: "
                              f"No space left on device; free space there or choose a folder on another disk")
    assert "\n" not in message and "untouched" in message
    assert list(tmp_path.iterdir()) == []
    _previous_output(tmp_path / "old")
    with pytest.raises(DestinationError, match="No space left on device"):
        zsfw.save(model, tmp_path / "old", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (tmp_path / "old" / "keep.txt").read_text() == "mine"
    monkeypatch.undo()  # safetensors' own writer names the errno only in its message
    from safetensors import SafetensorError

    monkeypatch.setattr("zsfw.checkpoint.save.save_file", lambda *args, **kwargs: _raise(SafetensorError(
        "Error while serializing: I/O error: Read-only file system (os error 30)")))
    with pytest.raises(DestinationError, match="Read-only file system; choose a writable folder"):
        zsfw.save(model, tmp_path / "old", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    monkeypatch.setattr("zsfw.checkpoint.save.save_file", lambda *args, **kwargs: _raise(OSError("a bug")))
    with pytest.raises(OSError, match="a bug"):  # not a filesystem's errno: a bug, kept as it is
        zsfw.save(model, tmp_path / "new")


def _raise(exc: BaseException):
    raise exc


def _previous_output(folder: Path, exist_ok: bool = False) -> None:
    """A folder that looks like an earlier zsfw output (the only kind overwrite replaces)."""
    folder.mkdir(exist_ok=exist_ok)
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "zsfw"}}))
    (folder / "keep.txt").write_text("mine")


@pytest.mark.parametrize("existing", [False, True])
def test_a_save_killed_with_sigkill_leaves_no_output(tmp_path, existing):
    out = tmp_path / "out"
    if existing:
        _previous_output(out)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time, copy
        import zsfw, zsfw.checkpoint.save as ckpt
        from helpers import patterned_windows, tiny_llama
        real = ckpt.save_file
        def slow(*args, **kwargs):
            real(*args, **kwargs)
            print("writing", flush=True)
            time.sleep(120)
        ckpt.save_file = slow
        windows = patterned_windows()
        model, _ = zsfw.compress(tiny_llama(), {"s": {"m": {"ZeroSumSVDModifier": {
            "calibration": {"samples": 8, "sequence_length": 32}}}}}, windows)
        zsfw.save(model, sys.argv[1], overwrite=True)
        """), str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        cwd=Path(__file__).parent)
    try:
        assert proc.stdout.readline().strip() == "writing"  # mid-save: a weights file exists
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt"]
    else:
        assert not out.exists()
    assert all(p.name.startswith(".out.zsfw-tmp-") for p in tmp_path.iterdir() if p.name != "out")
    model, _ = zsfw.compress(tiny_llama(), recipe(), patterned_windows())
    zsfw.save(model, out, overwrite=True)  # the next save sweeps what the killed process left
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _broken_copy(saved, tmp_path, label="int8"):
    src = saved[1][label][0]
    dst = tmp_path / label
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, edit) -> None:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def test_missing_tensor_is_an_error_naming_the_module(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSFW_SKIP_CHECKSUM", "1")  # the file is edited on purpose
    path = _broken_copy(saved, tmp_path)
    name = "model.layers.1.mlp.down_proj"

    def drop_a_scale(tensors):
        del tensors[next(k for k in tensors if k.startswith(name + ".") and "scale" in k)]

    _rewrite(path / "model.safetensors", drop_a_scale)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        zsfw.load(path)


def test_misshaped_tensor_is_an_error_naming_the_module(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("ZSFW_SKIP_CHECKSUM", "1")  # the file is edited on purpose
    path = _broken_copy(saved, tmp_path, "bf16")
    name = "model.layers.0.self_attn.o_proj"

    def shrink(tensors):
        key = next(k for k in tensors if k.startswith(name + "."))
        tensors[key] = tensors[key][:-1].contiguous()

    _rewrite(path / "model.safetensors", shrink)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        zsfw.load(path)


@pytest.mark.parametrize("edit, message", [
    (lambda q: q.update(format_version=99), "format version 99"),
    (lambda q: q["modules"]["model.layers.0.mlp.up_proj"].update(format="int3"),
     r"model\.layers\.0\.mlp\.up_proj.*int3"),
    # D15: tampered module lists and ranks are named errors, never random dense layers
    (lambda q: q["modules"]["model.layers.0.mlp.down_proj"].update(rank=500),
     r"model\.layers\.0\.mlp\.down_proj.*rank 500"),
])
def test_unknown_version_or_format_is_an_error(saved, tmp_path, edit, message):
    path = _broken_copy(saved, tmp_path)
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        zsfw.load(path)


def test_d15_a_module_removed_from_the_config_is_an_error_not_a_random_layer(saved, tmp_path):
    path = _broken_copy(saved, tmp_path, "bf16")
    name = next(l.name for l in saved[1]["bf16"][2].layers if not l.dense)
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["modules"][name]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + r"\..*belongs to no module"):
        zsfw.load(path)


def _flip_a_weight_byte(path: Path, other: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # in the last tensor's data
    (path / "model.safetensors").write_bytes(data)


def _swap_for_another_runs_file(path: Path, other: Path) -> None:
    shutil.copyfile(other / "model.safetensors", path / "model.safetensors")


@pytest.mark.parametrize("damage", [_flip_a_weight_byte, _swap_for_another_runs_file], ids=["flipped", "swapped"])
def test_r2_weights_that_do_not_match_their_checksum_are_refused_naming_the_file(saved, tmp_path, monkeypatch,
                                                                                 capsys, damage):
    from zsfw.cli import main

    windows, runs = saved
    path = _broken_copy(saved, tmp_path, "bf16")
    other = copy.deepcopy(runs["bf16"][1])  # another run: the same shapes, another final norm
    with torch.no_grad():
        other.model.norm.weight.mul_(2)
    zsfw.save(other, tmp_path / "other")
    damage(path, tmp_path / "other")
    file = str(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"^'{re.escape(file)}' has sha256 [0-9a-f]{{12}}…, but config\.json records "
                                              rf"[0-9a-f]{{12}}….*set ZSFW_SKIP_CHECKSUM=1"):
        zsfw.load(path)
    capsys.readouterr()
    for command in (["eval", str(path), "--windows", "1"], ["inspect", str(path)],
                    ["run", str(path), "--prompt", "w1 w2", "--no-compile"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"zsfw: error: '{file}' has sha256") and err.count("\n") == 1, err
    monkeypatch.setenv("ZSFW_SKIP_CHECKSUM", "1")  # weights edited on purpose: loaded as they are
    loaded = zsfw.load(path)
    if damage is _swap_for_another_runs_file:
        assert torch.equal(_logits(loaded, windows), _logits(other, windows))


def test_r2_a_checkpoint_saved_before_checksums_loads_unchecked(saved, tmp_path):
    windows, runs = saved
    path = _broken_copy(saved, tmp_path, "bf16")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]["checksums"]
    (path / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(zsfw.load(path), windows), runs["bf16"][3])


def test_save_pretrained_of_a_loaded_model_points_to_zsfw_save(saved, tmp_path):
    model = zsfw.load(saved[1]["bf16"][0])
    with pytest.raises(CheckpointError, match=r"use zsfw\.save\(model, folder\)"):
        model.save_pretrained(tmp_path / "out")


def test_sharded_save_reloads(saved, tmp_path):
    windows, runs = saved
    _, model, _, logits = runs["int8"]
    zsfw.save(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    checksums = json.loads((tmp_path / "sharded" / "config.json").read_text())["quantization_config"]["checksums"]
    assert checksums == {f: sha256_of(tmp_path / "sharded" / f) for f in set(index["weight_map"].values())}
    assert torch.equal(_logits(zsfw.load(tmp_path / "sharded"), windows), logits)


def test_inspect_reads_bytes_from_headers_and_plots(saved, tmp_path, capsys):
    from zsfw.cli import main
    from zsfw.checkpoint.contents import saved_modules

    path, _, report, _ = saved[1]["packed"]
    found = {m.name: m for m in saved_modules(path)}
    for layer in report.layers:
        assert found[layer.name].bytes == layer.written_bytes
        assert (found[layer.name].rank is None) == layer.dense
    png = tmp_path / "ranks.png"
    assert main(["inspect", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "packed" in out and "total:" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(tmp_path)]) == 2  # not a saved model: a clear error, not a traceback


def test_d8_replace_swaps_atomically_and_the_fallback_restores_the_old_output(tmp_path, monkeypatch):
    from zsfw.checkpoint import destination

    def folders():
        tmp, out = tmp_path / ".new", tmp_path / "out"
        for folder, text in ((tmp, "new"), (out, "old")):
            _previous_output(folder, exist_ok=True)
            (folder / "keep.txt").write_text(text)
        return tmp, out

    tmp, out = folders()
    destination.replace(tmp, out, True)  # renameat2(RENAME_EXCHANGE) on Linux
    assert (out / "keep.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out"]
    # where the exchange is unavailable, a failure between the two renames puts the old one back
    tmp, out = folders()
    monkeypatch.setattr(destination, "_renameat2", lambda a, b, flags: False)
    real_rename = os.rename

    def second_rename_fails(src, dst):
        if Path(src) == tmp:
            raise OSError("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="between the renames"):
        destination.replace(tmp, out, True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".new", "out"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
@pytest.mark.parametrize("case", ["no overwrite", "overwrite, before the check", "overwrite, after the check"])
def test_r1_replace_never_swaps_out_what_appeared_while_zsfw_worked(tmp_path, monkeypatch, swap, case):
    from zsfw.checkpoint import destination

    tmp, out = tmp_path / ".out.zsfw-tmp-1", tmp_path / "out"
    _previous_output(tmp)
    if swap == "two renames":
        monkeypatch.setattr(destination, "_renameat2", lambda a, b, flags: False)
    overwrite = case != "no overwrite"
    out.mkdir()  # absent at the start of a run without overwrite, empty with it: both were fine
    if case == "overwrite, after the check":
        check, checks = destination.check_replaceable, []

        def then_notes_appear(*args):
            check(*args)
            if not checks:  # between the check before the swap and the swap
                (out / "notes.txt").write_text("mine")
            checks.append(args)

        monkeypatch.setattr(destination, "check_replaceable", then_notes_appear)
    else:
        (out / "notes.txt").write_text("mine")
    expected = "holds files that are not a zsfw output" if overwrite else "already exists; pass overwrite"
    with pytest.raises(DestinationError, match=expected) as refused:
        destination.replace(tmp, out, overwrite)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    (kept,) = [p for p in tmp_path.iterdir() if p.name != "out"]
    assert kept.name.startswith("out.zsfw-saved-") and str(refused.value).endswith(
        f"nothing there was changed: the compressed model is saved in {str(kept)!r} instead")
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "keep.txt"]


def test_d5_a_destination_without_room_is_refused_up_front(tmp_path):
    from zsfw.checkpoint.destination import check_destination

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DestinationError, match=r"MB free, the compressed model needs about"):
        check_destination(tmp_path / "out", False, needed=2 * free)
    assert check_destination(tmp_path / "out", False, needed=1) == (tmp_path / "out").resolve()
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []  # the probe is gone


def test_r7_the_space_check_counts_the_tokenizer_files(llama, tokenizer, windows, tmp_path, monkeypatch):
    import shutil

    from zsfw.checkpoint import destination
    from zsfw.checkpoint.save import expected_bytes, tokenizer_bytes
    from zsfw.compression.targets import find_targets
    from zsfw.recipe import load_recipe

    tokenizer.save_pretrained(tmp_path / "tokenizer")
    files = sum(p.stat().st_size for p in (tmp_path / "tokenizer").iterdir())
    (tmp_path / "scratch").mkdir()
    assert tokenizer_bytes(tokenizer, tmp_path / "scratch") == files > 0
    assert list((tmp_path / "scratch").iterdir()) == [] and tokenizer_bytes(None, tmp_path) == 0
    m = load_recipe(_recipe("bf16")).modifier
    weights = expected_bytes(llama, find_targets(llama, m.targets, m.ignore), m.ratio)
    usage = shutil.disk_usage(tmp_path)  # room for the weights alone, not for the tokenizer too
    monkeypatch.setattr(destination.shutil, "disk_usage",
                        lambda path: usage._replace(free=int(weights * destination.SPACE_MARGIN
                                                             + destination.SPACE_EXTRA) + 1))
    monkeypatch.setenv("ZSFW_SPILL", str(tmp_path / "spill"))
    with pytest.raises(DestinationError, match="MB free, the compressed model needs about"):
        zsfw.compress(llama, _recipe("bf16"), windows, output_dir=tmp_path / "out", tokenizer=tokenizer)
    assert not (tmp_path / "out").exists() and list((tmp_path / "spill").iterdir()) == []


@pytest.mark.parametrize("storage", ["int8", "fp8"])
def test_a_rank_one_torchao_layer_is_stored_as_rank_two_and_priced_so(storage, tmp_path):
    fmt = zsfw.storage_format(storage)
    assert fmt.lowrank_bytes(576, 64, 1, False) == fmt.lowrank_bytes(576, 64, 2, False)
    B, A = torch.randn(576, 1), torch.randn(1, 64)
    module = fmt.lowrank_module(B, A, None)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x).float(), (x @ A.T) @ B.T, rtol=0.05, atol=0.05 * (B.abs().max() * (x @ A.T).abs().max()).item())
    state, _ = module_tensors("m", module)
    assert sum(t.numel() * t.element_size() for t in state.values()) == fmt.lowrank_bytes(576, 64, 1, False)
    skeleton = fmt.skeleton(576, 64, 1, False)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}
