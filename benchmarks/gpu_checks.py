"""Checks of the code paths only a GPU takes (issue 35, G1–G5), run by ``gpu_llama7b.py`` before
its measurement, or alone, so that the first session with a GPU measures them:

    python benchmarks/gpu_checks.py                 # on cuda
    python benchmarks/gpu_checks.py --device cpu    # the same code on the CPU (a check that it runs)

Each check takes the device as a parameter; on the CPU the comparisons agree trivially and the
sync count (CUDA's own sync debug mode) is not measured.

- G1/G2 ``pivga``: PivGa factors built on the device and on the CPU through the storage plugin's
  public interface (``lowrank_module``, then the module's forward): the outputs' difference, each
  one's error to the exact low-rank product, seconds of each build.
- G3 ``binding``: a torchrun-like process (LOCAL_RANK 0, one process) gets cuda:0 as its current
  device and an NCCL group bound to it that reduces; a LOCAL_RANK past the GPUs is a one-line
  error; two processes both told 'cuda:0' end in a one-line error, not a hang.
- G4 ``syncs``: the statistics pass of each driver under ``torch.cuda.set_sync_debug_mode("warn")``:
  syncs by source line for n and 2n micro-batches (zsfw's own must not grow with them); the
  factor store's host copies are pinned.
- G5 ``cpu_vs_device``: a small model compressed lazily on the CPU and on the device:
  ``allocation_gaps`` (tests/helpers.py, what tests/test_device.py allows) and both losses.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # helpers: the tiny model and allocation_gaps the tests use


def _synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pivga(device: torch.device) -> list[dict]:
    """G1/G2: PivGa's factors built on ``device`` vs on the CPU (bf16 and int8; one layer with
    σ = 0 components kept), only through the storage plugin."""
    from zsfw import plugins

    g = torch.Generator().manual_seed(0)
    rows = []
    for dtype in ("bf16", "int8"):
        storage = plugins.create("storage", "pivga", {"dtype": dtype})
        for m, n, k, zero in ((1024, 1024, 256, 0), (2752, 1024, 300, 0), (1024, 1024, 128, 32)):
            B, A = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g) / n ** 0.5
            A[k - zero:] = 0  # a rank-deficient A: components of σ = 0 kept
            x = torch.randn(64, n, generator=g)
            exact = x.double() @ (B.double() @ A.double()).T
            out, seconds = {}, {}
            for label, where in (("cpu", torch.device("cpu")), ("device", device)):
                start = time.perf_counter()
                module = storage.lowrank_module(B.to(where), A.to(where), None)
                _synced(where)
                seconds[label] = time.perf_counter() - start
                with torch.no_grad():
                    out[label] = module(x.to(where)).double().cpu()
            error = {label: float((y - exact).norm() / exact.norm()) for label, y in out.items()}
            rows.append({"dtype": dtype, "shape": [m, n], "rank": k, "zero_components": zero,
                         "error": error, "seconds": seconds,
                         "device_vs_cpu": float((out["device"] - out["cpu"]).norm() / exact.norm()),
                         "ok": error["device"] <= 2 * error["cpu"] + 1e-6})
    return rows


BINDING = """
import json, sys, torch
from zsfw.compression import distributed
from zsfw.errors import ZsfwError
from zsfw.residency import compute_device
try:
    device = compute_device(sys.argv[1])
    distributed.join(device)
    t = torch.ones(1, device=device)
    torch.distributed.all_reduce(t)
    print(json.dumps({"device": str(device), "backend": torch.distributed.get_backend(), "reduced": t.item(),
                      "current": torch.cuda.current_device() if device.type == "cuda" else None}))
    torch.distributed.destroy_process_group()
except ZsfwError as e:
    print(json.dumps({"error": str(e)}))
"""


def binding(device: torch.device) -> dict:
    """G3: the device a torchrun process computes on, its process group, and the refusals."""
    from zsfw.residency import cuda_device

    name = "cuda" if device.type == "cuda" else "cpu"
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    one = subprocess.run([sys.executable, "-c", BINDING, name], capture_output=True, text=True, env=env, timeout=300)
    result: dict = {"one_process": _last_json(one)}
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        cuda_device("cuda", str(count), count)
    except Exception as e:  # the refusal is the point
        result["local_rank_past_the_gpus"] = f"{type(e).__name__}: {e}"
    if device.type == "cuda":  # two processes on one GPU: NCCL refuses; it must say so in one line
        script = Path(tempfile.mkdtemp(prefix="gpu-checks-")) / "binding.py"
        script.write_text(BINDING)
        try:
            two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  str(script), "cuda:0"], capture_output=True, text=True, env={
                                      **env, "MASTER_PORT": "29534"}, timeout=60)
            result["two_processes_one_gpu"] = [json.loads(l) for l in two.stdout.splitlines() if l.startswith("{")]
        except subprocess.TimeoutExpired:
            result["two_processes_one_gpu"] = "hung for 60 s"
    return result


def _last_json(done: subprocess.CompletedProcess) -> dict:
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else {"rc": done.returncode, "stderr": done.stderr[-2000:]}


def syncs(device: torch.device) -> dict:
    """G4: device→host syncs of the statistics pass per source line, for n and 2n micro-batches;
    whether the factor store's host copies are pinned."""
    from helpers import patterned_windows, tiny_llama, train_briefly

    from zsfw.compression.driver import InMemoryDriver
    from zsfw.compression.streaming import LayerStreamedDriver
    from zsfw.compression.targets import find_targets
    from zsfw.compression.transfer import pinned, to_host
    from zsfw.recipe import CalibrationConfig

    windows = patterned_windows(16, 64)
    model = train_briefly(tiny_llama(), windows).to(device)
    targets = find_targets(model, ["Linear"], ["lm_head"])
    result: dict = {"pinned_host_copies": to_host({"x": torch.ones(8, device=device)})["x"].is_pinned(),
                    "pinned_expected": pinned(device)}
    if device.type != "cuda":
        return result
    zsfw_root = str(REPO / "zsfw")
    for name, kind in (("memory", InMemoryDriver), ("streamed", LayerStreamedDriver)):
        cal = CalibrationConfig(samples=4, sequence_length=64, gradient_samples=2, batch_size=1)
        list(kind(model, windows[:4], cal).statistics(targets, True, True))  # one-time work out of the counts
        counts = []
        for n in (4, 8):
            cal = CalibrationConfig(samples=n, sequence_length=64, gradient_samples=n // 2, batch_size=1)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    list(kind(model, windows[:n], cal).statistics(targets, True, True))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            lines: dict[str, int] = {}
            for w in seen:
                if "synchroniz" in str(w.message):
                    key = f"{Path(w.filename).name}:{w.lineno}" + (" (zsfw)" if w.filename.startswith(zsfw_root) else "")
                    lines[key] = lines.get(key, 0) + 1
            counts.append({"micro_batches": n, "zsfw": sum(v for k, v in lines.items() if k.endswith("(zsfw)")),
                           "other": sum(v for k, v in lines.items() if not k.endswith("(zsfw)")), "lines": lines})
        result[name] = {"counts": counts, "ok": counts[0]["zsfw"] == counts[1]["zsfw"]}
    return result


def cpu_vs_device(device: torch.device) -> dict:
    """G5: a small model compressed lazily on the CPU and on ``device`` (ratio 0.6)."""
    from helpers import allocation_gaps, patterned_windows, recipe, tiny_llama, train_briefly

    import zsfw
    from zsfw.compression.statistics import next_token_loss
    from zsfw.residency import lazy_model

    windows = patterned_windows()
    work = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    train_briefly(tiny_llama(), windows).save_pretrained(work / "source")
    lazy = {"driver": "streamed", "weights": "lazy"}
    reports, losses = {}, {}
    for label, execution in (("cpu", lazy), ("device", {**lazy, "device": str(device)})):
        _, reports[label] = zsfw.compress(lazy_model(work / "source"), recipe(ratio=0.6, execution=execution),
                                          windows, output_dir=work / label)
        with torch.no_grad():
            losses[label] = next_token_loss(zsfw.load(work / label), windows).item()
    cpu, other = reports["cpu"].layers, reports["device"].layers
    gaps = allocation_gaps(cpu, other)
    return {"gaps": gaps, "ranks_equal": [l.rank for l in cpu] == [l.rank for l in other], "loss": losses,
            "ok": not gaps and abs(losses["device"] - losses["cpu"]) <= 1e-2 * abs(losses["cpu"])}


def run_all(device: str) -> dict:
    """Every check on ``device``; a check that fails with an exception records it and the rest run."""
    where = torch.device(device)
    results: dict = {"device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"}
    for name, check in (("pivga", pivga), ("binding", binding), ("syncs", syncs), ("cpu_vs_device", cpu_vs_device)):
        start = time.perf_counter()
        try:
            results[name] = check(where)
        except Exception as e:  # a check's failure is its result
            results[name] = {"exception": f"{type(e).__name__}: {str(e)[:500]}"}
        results[name + "_seconds"] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the checks) or cpu (a check that they run)")
    print(json.dumps(run_all(parser.parse_args().device), indent=1))


if __name__ == "__main__":
    main()
