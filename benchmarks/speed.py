"""Issue-5 speed benchmark: dense vs zsfw SmolLM2-135M, eager vs compiled vs .pt2, in one process.

Prefill: batch 1 × 512 tokens, one forward. Decode: batch 1, 128 new greedy tokens after a
64-token prompt with a static KV cache (eager: transformers' generate with the compile switched
off; compiled: ``zsfw.generate``); decode tokens/s = 127 / (time of 128 new tokens − time of 1).
The ``.pt2`` package has no KV cache (``zsfw.serve.export``), so it is timed on prefill only.

Variants are interleaved round by round and repeated; the table gives medians with min–max and
each speedup as a ratio to the dense model of the same dtype and mode, measured in the same run
(this machine's timings swing up to 3× between runs). Theoretical limits: bytes of weights read
per decoded token and multiply-accumulates per prefill token (linear layers and attention).

In the fp32 model, bf16 factors run two ways: as loaded (cast to fp32 on every call, memory
kept at 2 bytes per factor weight) and upcast once after loading (``bf16→fp32`` rows: exact, 4
bytes per factor weight, no cast). Results go between markers in the log, ``log/`` (a re-run replaces
its section) and the compiled speedups beside their limits to ``speed.png``.

    python benchmarks/speed.py                 # fp32 + bf16, ratios 0.8 and 0.6, bf16/int8 factors
    python benchmarks/speed.py --quick         # fp32, ratio 0.6, bf16 factors, 2 rounds
    python benchmarks/speed.py --profile --ratios 0.6 --formats bf16 --dtypes float32
                                               # where compiled decoding spends its time
    python benchmarks/speed.py --ratios 0.8 --formats bf16 pivga --dtypes float32 --modes eager compiled \
        --no-upcast --section speed-pivga
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent


@dataclass
class Variant:
    label: str
    dtype: str
    mode: str  # eager | compiled | pt2
    model: object  # (model, what is timed: the model, its compiled form or the loaded package)
    weight_bytes: int = 0
    macs_per_token: int = 0
    prefill: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


def _compressed_models(ratios, formats, cache):
    """zero_sum models (statistics from the cache), built once and saved under ``cache``."""
    import zsfw
    from zsfw.sources import cache_dir

    paths = {}
    for ratio in ratios:
        for fmt in formats:
            path = cache / f"smollm2-zero_sum-{ratio}-{fmt}"
            if not path.exists():
                model, tokenizer = protocol.load_default_model()
                windows = protocol.zsfw_windows(tokenizer)
                recipe = {"s": {"m": {"ZeroSumSVDModifier": {"ratio": ratio, "storage": fmt,
                                                             "calibration": protocol.CALIBRATION}}}}
                zsfw.compress(model, recipe, windows.calibration, output_dir=path, tokenizer=tokenizer,
                              statistics_cache=cache_dir() / "statistics")
            paths[(ratio, fmt)] = path
    return paths


def _weight_bytes(model) -> int:
    """Bytes of weights a decoded token reads: the tensors the forward of every linear layer
    (compressed or not) and of the output head uses; the embedding lookup reads one row."""
    from torch import nn

    from zsfw_packed import PackedLowRankLinear
    from zsfw_pivga import PivGaLinear

    total = 0
    for module in model.modules():
        if isinstance(module, PackedLowRankLinear):
            tensors = [module.A, module.B, module.bias]  # the unpacked factors the forward reads
        elif isinstance(module, PivGaLinear):
            tensors = [module.B, module.T, module.bias, module.pivots]
        elif isinstance(module, nn.Linear):
            tensors = [module.weight, module.bias]
        else:
            continue
        total += sum(_stored_bytes(t) for t in tensors if t is not None)
    return total


def _stored_bytes(t) -> int:
    """A tensor's bytes; for a torchao tensor, those of its inner data and scales."""
    names = list(getattr(t, "tensor_data_names", [])) + list(getattr(t, "optional_tensor_data_names", []))
    inner = [getattr(t, n, None) for n in names]
    inner = [x for x in inner if x is not None]
    return sum(x.nbytes for x in inner) if inner else t.nbytes


def _macs_per_token(model, seq: int) -> int:
    """Multiply-accumulates per prefill token: linear layers by their factors, plus attention."""
    from torch import nn

    from zsfw_packed import PackedLowRankLinear
    from zsfw_pivga import PivGaLinear

    macs = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):  # dense layers, the head, and LowRankLinear's A and B
            macs += module.in_features * module.out_features
        elif isinstance(module, PackedLowRankLinear):  # no nn.Linear inside
            macs += module.rank * (module.in_features + module.out_features)
        elif isinstance(module, PivGaLinear):  # T on the non-pivot inputs, then B
            macs += module.rank * (module.in_features - module.rank + module.out_features)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    macs += c.num_hidden_layers * 2 * c.num_attention_heads * head_dim * seq // 2  # QKᵀ and PV, causal mean
    return macs


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--ratios", type=float, nargs="*", help="default: 0.8 0.6 (quick: 0.6)")
    parser.add_argument("--formats", nargs="*", help="default: bf16 int8 (quick: bf16)")
    parser.add_argument("--dtypes", nargs="*", help="default: float32 bfloat16 (quick: float32)")
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled", "pt2"],
                        help="which of eager, compiled, pt2 to time (pt2 exports are the slowest to build)")
    parser.add_argument("--no-upcast", action="store_true",
                        help="leave out the bf16→fp32 rows (bf16 factors upcast once at load)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: profile 32 compiled decode steps of each variant")
    parser.add_argument("--section", help="the log section (and plot name) to write; "
                                          "default: speed (quick: speed-quick)")
    args = parser.parse_args()
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch

    # every variant's forward is the same code object (LlamaForCausalLM.forward), compiled for
    # several models and shapes: above dynamo's default of 8 cache entries per code object it
    # would recompile or fall back to eager in the middle of the timings
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 1024
    if args.profile:  # each generated C++ kernel shows up in the profile under its own name
        torch._inductor.config.cpp.enable_kernel_profile = True

    from zsfw.serve.export import export
    from zsfw.serve.generate import generate
    from zsfw.models import load_model
    from zsfw.modules import LowRankLinear
    from zsfw.sources import cache_dir, default_model_path

    ratios = args.ratios or ((0.6,) if args.quick else (0.8, 0.6))
    formats = args.formats or (("bf16",) if args.quick else ("bf16", "int8"))
    dtypes = args.dtypes or (("float32",) if args.quick else ("float32", "bfloat16"))
    rounds = args.rounds or (2 if args.quick else 5)
    models_dir = cache_dir() / "speed-models"
    paths = _compressed_models(ratios, formats, models_dir)
    work = Path(tempfile.mkdtemp(prefix="zsfw-speed-"))
    variants: list[Variant] = []
    _, tokenizer = protocol.load_default_model()
    prompt = "The history of the city begins " * 20
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :64]
    prompt64 = tokenizer.decode(prompt_ids[0])
    prefill_ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        sources = [("dense", default_model_path(), False)] + [
            (f"zsfw {r} {f}", paths[(r, f)], False) for r in ratios for f in formats]
        if dtype == torch.float32 and "bf16" in formats and not args.no_upcast:  # upcast once, at load
            sources += [(f"zsfw {r} bf16→fp32", paths[(r, "bf16")], True) for r in ratios]
        for label, path, upcast in sources:
            model, _ = load_model(path, dtype=dtype)
            if upcast:  # exact: every bf16 factor becomes an fp32 copy (2× its memory)
                for module in model.modules():
                    if isinstance(module, LowRankLinear):
                        module.float()
            model.eval()
            modes = [m for m in args.modes if not (upcast and m == "pt2")]
            for mode in ("compiled",) if args.profile else modes:
                name = f"{label} {dtype_name} {mode}"
                if mode == "compiled":
                    runner = torch.compile(model, fullgraph=True)
                elif mode == "pt2":
                    package = export(model, work / f"{label.replace(' ', '_')}-{dtype_name}.pt2", max_sequence=512)
                    runner = torch._inductor.aoti_load_package(str(package))
                else:
                    runner = model
                v = Variant(name, dtype_name, mode, (model, runner),
                            _weight_bytes(model), _macs_per_token(model, 512))
                variants.append(v)
                print(f"ready: {name}", flush=True)

    def prefill(v: Variant) -> float:
        model, runner = v.model
        with torch.no_grad():
            if v.mode == "pt2":
                return _time(lambda: runner(prefill_ids))
            return _time(lambda: runner(input_ids=prefill_ids, use_cache=False))

    def decode(v: Variant) -> float | None:
        if v.mode == "pt2":
            return None
        model, _ = v.model
        compile_ = v.mode == "compiled"
        run = lambda n: generate(model, tokenizer, prompt64, max_new_tokens=n, compile=compile_,
                                 buckets=(64,))
        return 127 / (_time(lambda: run(128)) - _time(lambda: run(1)))

    for v in variants:  # warm-up: compiles every graph before anything is timed
        prefill(v)
        decode(v)
    if args.profile:
        run = lambda v: generate(v.model[0], tokenizer, prompt64, max_new_tokens=32, buckets=(64,))
        _write_profiles({v.label: _profile(lambda: run(v), 32) for v in variants})
        return
    for r in range(rounds):
        for v in variants:
            v.prefill.append(512 / prefill(v))
            d = decode(v)
            if d is not None:
                v.decode.append(d)
        print(f"round {r + 1}/{rounds} done", flush=True)
    _write(variants, rounds, args.quick, args.section)


def _profile(fn, tokens: int, top: int = 8) -> list[tuple[str, float, float]]:
    """The ``top`` operations and kernels by self CPU time in ``fn`` (after one unprofiled call):
    (name, ms per token, share of the profiled time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / 1e3 / tokens, e.self_cpu_time_total / total)
            for e in events[:top]]


def _write_profiles(profiles: dict[str, list[tuple[str, float, float]]]) -> None:
    lines = [f"\n### Where compiled decoding spends its time ({datetime.date.today().isoformat()})\n",
             f"Command: `python {' '.join(sys.argv)}`. Machine: {protocol.machine_line()}. "
             "32 greedy tokens after a 64-token prompt, "
             "torch.profiler, self CPU time per generated token (C++ kernels generated by Inductor "
             "are named `cpp_fused_*`; `_to_copy` in their names are dtype casts).\n"]
    for label, rows in profiles.items():
        lines += [f"**{label}**\n", "| op / kernel | ms per token | share |", "|---|---|---|"]
        lines += [f"| `{name[:70]}` | {ms:.2f} | {100 * share:.0f}% |" for name, ms, share in rows]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    write_section("speed-profile", text)


def _speedup(v: Variant, ref: Variant, phase: str) -> tuple[float, float]:
    """``v``'s median speedup over ``ref`` in ``phase`` (prefill | decode), and its limit: the
    ratio of multiply-accumulates per prefill token, or of weight bytes per decoded token."""
    measured = statistics.median(getattr(v, phase)) / statistics.median(getattr(ref, phase))
    if phase == "prefill":
        return measured, ref.macs_per_token / v.macs_per_token
    return measured, ref.weight_bytes / v.weight_bytes


def _stat(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def _write(variants: list[Variant], rounds: int, quick: bool, section: str | None) -> None:
    by_label = {v.label: v for v in variants}
    lines = [f"## Issue 5: speed of SmolLM2-135M, dense vs zsfw ({datetime.date.today().isoformat()}"
             f"{', quick' if quick else ''})\n",
             f"Command: `python {' '.join(sys.argv)}`. Machine: {protocol.machine_line()}. {rounds} interleaved "
             "rounds after a warm-up; tokens/s as median (min–max). Speedups are against the dense model "
             "in the same dtype and mode (eager vs eager, compiled vs compiled); a pt2 row compares the "
             "package with the same model compiled. "
             "Limits are the ratio of weight bytes per decoded token and of multiply-accumulates per "
             "prefill token (512 tokens).\n",
             "| variant | prefill tok/s | decode tok/s | prefill speedup | limit | % of limit | "
             "decode speedup | limit | % of limit |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        row = [v.label, _stat(v.prefill), _stat(v.decode)]
        if v.mode == "pt2":  # against the same model compiled: the package's own overhead
            same = by_label[v.label.replace(" pt2", " compiled")]
            p = statistics.median(v.prefill) / statistics.median(same.prefill)
            row += [f"{p:.2f} vs compiled", "", "", "n/a", "", ""]
            lines.append("| " + " | ".join(row) + " |")
            continue
        ref = by_label[f"dense {v.dtype} {v.mode}"]
        for phase in ("prefill", "decode"):
            measured, limit = _speedup(v, ref, phase)
            row += [f"{measured:.2f}", f"{limit:.2f}", f"{100 * measured / limit:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    section = section or ("speed-quick" if quick else "speed")
    plot = HERE / f"{section}.png"
    lines.append(f"\nPlot: `benchmarks/{plot.name}`.")
    write_section(section, "\n".join(lines))
    _plot([v for v in variants if v.mode == "compiled" and not v.label.startswith("dense")],
          by_label, plot)
    print("\n".join(lines))


def _plot(variants, by_label, path: Path) -> None:
    """Compiled speedups over compiled dense beside their limits, prefill and decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(variants) + 1.5), sharey=True)
    names = [v.label.replace(" compiled", "") for v in variants]
    y = range(len(variants))
    for ax, phase in zip(axes, ("prefill", "decode")):
        measured, limits = zip(*(_speedup(v, by_label[f"dense {v.dtype} compiled"], phase)
                                 for v in variants))
        ax.barh([i + 0.2 for i in y], limits, height=0.4, color="lightgray", label="limit")
        ax.barh([i - 0.2 for i in y], measured, height=0.4, color="tab:blue", label="measured")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_title(f"{phase}: speedup over compiled dense")
    axes[0].set_yticks(list(y), names)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
