"""A LLaMA-2-7B-shaped model compressed on one GPU: zero_sum at ratio 0.8, 32 × 2048 calibration
tokens, bf16 weights read one decoder layer at a time (``execution: {driver: streamed, weights:
lazy, device: cuda, dtype: auto}``). Targets (issue 12): peak GPU memory ≤ 24 GB, wall ≤ 4 min
on an H100/H200-class GPU (the paper's own code: 15.9 min for LLaMA-7B).

Random weights (memory and time do not depend on the values), written once in bf16 safetensors
shards (13.5 GB: the lent GPU machine's disk holds it). Run it where a GPU is lent:

    python benchmarks/gpu_llama7b.py                              # the measurement, log section
    python benchmarks/gpu_llama7b.py --device cpu --layers 2 --shrink 8 --samples 2 --length 256 --no-results
                                                                  # a small check that the script runs

Before the measurement it runs the checks of the GPU-only code paths (``gpu_checks.py``, issue 35:
PivGa on the GPU, the torchrun device binding, the statistics pass's syncs, CPU vs GPU allocation;
about a minute), recorded with it; ``--checks only`` runs them alone, ``--checks skip`` not at all.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import gpu_checks
import protocol
import scale
from results_md import write_section

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)
"""LLaMA-2-7B's shape."""


def run(folder: Path, device: str, samples: int, length: int, out: Path) -> dict:
    """Compress the checkpoint in ``folder``; times, GPU and host memory."""
    import torch

    import zsfw
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.residency import lazy_model

    return_large_frees_to_the_os()
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    model = lazy_model(folder, "auto")
    load_seconds = time.perf_counter() - start
    windows = torch.randint(0, 32000, (samples, length), generator=torch.Generator().manual_seed(0))
    recipe = {"gpu": {"modifiers": {"ZeroSumSVDModifier": {
        "ratio": 0.8, "storage": "bf16",
        "calibration": {"samples": samples, "sequence_length": length, "batch_size": 4},
        "execution": {"driver": "streamed", "weights": "lazy", "device": device, "offload": "memory"}}}}}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, report = zsfw.compress(model, recipe, windows, output_dir=out, overwrite=True)
    seconds = time.perf_counter() - start
    return {"compress_seconds": seconds, "load_seconds": load_seconds, "phases": report.timings,
            "gpu_peak_allocated_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "gpu_peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "kept": report.total_bytes / report.reference_bytes, "samples": samples, "length": length,
            "layers": len(report.layers), "written_gb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a check)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32: LLaMA-2-7B)")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows")
    parser.add_argument("--length", type=int, default=2048, help="tokens per window")
    parser.add_argument("--shrink", type=int, default=1, help="widths and heads divided by this (a check)")
    parser.add_argument("--folder", type=Path, help="where the random checkpoint is written (default: "
                                                    "the zsfw cache)")
    parser.add_argument("--no-results", action="store_true", help="print only; leave the log as it is")
    parser.add_argument("--checks", choices=("first", "only", "skip"), default="first",
                        help="the GPU-path checks (gpu_checks.py): before the measurement, alone, or not at all")
    args = parser.parse_args()
    checks = None if args.checks == "skip" else gpu_checks.run_all(args.device)
    if args.checks == "only":
        print(json.dumps(checks, indent=1))
        return
    from zsfw.sources import cache_dir

    shape = {**LLAMA2_7B, "num_hidden_layers": args.layers,
             **{k: LLAMA2_7B[k] // args.shrink for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads")}}
    folder = args.folder or cache_dir() / "bench" / f"llama2-7b-shape-{args.layers}l-{args.shrink}x-bf16"
    start = time.perf_counter()
    scale.write_checkpoint(folder, shape, "bfloat16", shard_bytes=4 * 1024**3, device=args.device)
    print(f"checkpoint ready in {time.perf_counter() - start:.0f} s: {folder}", flush=True)
    out = Path(tempfile.mkdtemp(prefix="gpu7b-out-"))
    try:
        cell = run(folder, args.device, args.samples, args.length, out / "model")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    cell["checks"] = checks
    cell["command"] = ("python benchmarks/gpu_llama7b.py " + " ".join(
        f"--{k} {v}" for k, v in (("device", args.device), ("layers", args.layers), ("shrink", args.shrink),
                                  ("samples", args.samples), ("length", args.length)))).strip()
    print(json.dumps(cell, indent=1))
    if not args.no_results:
        write_section("gpu7b", _table(cell))


def _table(c: dict) -> str:
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in c["phases"].items())
    gpu = c["gpu_peak_allocated_gb"]
    memory = "n/a" if gpu is None else f"{gpu:.1f} ({'met' if gpu <= 24 else 'missed'})"
    wall = f"{c['compress_seconds']:.0f} ({'met' if c['compress_seconds'] <= 240 else 'missed'})"
    return "\n".join([
        "## Scale on one GPU: a LLaMA-2-7B-shaped model",
        "",
        f"Command: `{c['command']}`. GPU: {c['gpu']}. Host: {protocol.machine_line()}.",
        f"Random bf16 weights, {c['layers']} target layers, zero_sum at ratio 0.8 (bf16 factors), "
        f"{c['samples']}×{c['length']} random calibration tokens, `execution: {{driver: streamed, weights: lazy, "
        "device: cuda, offload: memory}`.",
        "",
        "| peak GPU GB (≤ 24) | GPU reserved GB | compress s (≤ 240) | host peak RSS GB | written GB | kept bytes |",
        "|---|---|---|---|---|---|",
        f"| {memory} | {c['gpu_peak_reserved_gb'] or 0:.1f} | {wall} | {c['host_peak_rss_gb']:.1f} | "
        f"{c['written_gb']:.1f} | {c['kept']:.3f} |",
        "",
        f"Phases: {phases}.",
        *([] if c["checks"] is None else ["", _checks_line(c["checks"])]),
    ])


def _checks_line(checks: dict) -> str:
    """One line on the GPU-path checks (the whole record is in the printed JSON)."""
    def verdict(result) -> str:
        if isinstance(result, dict) and "exception" in result:
            return "raised " + result["exception"].split(":")[0]
        if isinstance(result, list):
            return f"{sum(r['ok'] for r in result)}/{len(result)} layers ok"
        return "ok" if result.get("ok") else "not ok"
    syncs = checks["syncs"]
    counts = ", ".join(f"{d} {' → '.join(str(n['zsfw']) for n in syncs[d]['counts'])}"
                       for d in ("memory", "streamed") if d in syncs)
    return (f"GPU-path checks (`gpu_checks.py`, issue 35): PivGa on the GPU vs the CPU {verdict(checks['pivga'])}; "
            f"torchrun binding {json.dumps(checks['binding'].get('one_process'))}; zsfw's syncs in the statistics "
            f"pass for 4 → 8 micro-batches: {counts or 'not measured'}, host copies pinned "
            f"{syncs.get('pinned_host_copies')}; CPU vs GPU allocation {verdict(checks['cpu_vs_device'])}.")


if __name__ == "__main__":
    main()
