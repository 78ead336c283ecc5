"""Two processes under torchrun (gloo) give what one process gives."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zsfw
from helpers import patterned_windows, recipe, source_model, tiny_llama, train_briefly

HERE = Path(__file__).resolve().parent
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch, zsfw
from helpers import patterned_windows, recipe, source_model

windows = patterned_windows()
model = source_model({source!r}, {execution!r})
_, report = zsfw.compress(model, recipe(ratio=0.6, gradient_samples=6, execution={execution!r}, storage={storage!r}),
                          windows, output_dir={out!r})
if torch.distributed.get_rank() == 0:
    json.dump({{"ranks": [l.rank for l in report.layers], "bytes": [l.written_bytes for l in report.layers],
               "loss": report.calibration_loss, "tokens": report.calibration_tokens}}, open({result!r}, "w"))
torch.distributed.destroy_process_group()
"""


def _torchrun(tmp_path: Path, execution: dict, storage) -> dict:
    script = tmp_path / "run.py"
    result = tmp_path / "result.json"
    script.write_text(SCRIPT.format(tests=str(HERE), execution=execution, storage=storage, out=str(tmp_path / "two"),
                                    result=str(result), source=str(tmp_path / "source")))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.parametrize("execution, storage", [
    ({"driver": "memory"}, "bf16"), ({"driver": "streamed"}, "bf16"), ({"driver": "streamed", "weights": "lazy"}, "bf16"),
    ({"driver": "streamed"}, ["bf16", {"name": "int4", "group_size": 16, "rounding": "gptq"}])])  # residuals too
def test_two_processes_give_what_one_gives(execution, storage, tmp_path):
    windows = patterned_windows()
    train_briefly(tiny_llama(), windows).save_pretrained(tmp_path / "source")
    two = _torchrun(tmp_path, execution, storage)
    model = source_model(str(tmp_path / "source"), execution)
    _, report = zsfw.compress(model, recipe(ratio=0.6, gradient_samples=6, execution=execution, storage=storage),
                              windows, output_dir=tmp_path / "one")
    assert two["ranks"] == [l.rank for l in report.layers]
    assert two["bytes"] == [l.written_bytes for l in report.layers]
    assert two["tokens"] == report.calibration_tokens
    assert two["loss"] == pytest.approx(report.calibration_loss, rel=1e-9)
    one, other = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == other.keys()
    for key, tensor in one.items():
        assert torch.allclose(other[key].float(), tensor.float(), rtol=1e-6, atol=1e-6 * tensor.float().abs().max()), key
    assert not list(tmp_path.glob(".two*"))  # the helper process wrote nothing
