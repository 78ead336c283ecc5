"""Issue-5 speed benchmark: dense vs zsfw SmolLM2-135M, eager vs compiled vs .pt2, in one process.

Prefill: batch 1 × 512 tokens, one forward. Decode: batch 1, 128 new greedy tokens after a
64-token prompt with a static KV cache (eager: transformers' generate with the compile switched
off; compiled: ``zsfw.generate``); decode tokens/s = 127 / (time of 128 new tokens − time of 1).
The ``.pt2`` package has no KV cache (``zsfw.aoti``), so it is timed on prefill only.

Variants are interleaved round by round and repeated; the table gives medians with min–max and
each speedup as a ratio to the dense model of the same dtype and mode, measured in the same run
(this machine's timings swing up to 3× between runs). Theoretical limits: bytes of weights read
per decoded token and multiply-accumulates per prefill token (linear layers and attention).

    python benchmarks/speed.py                 # fp32 + bf16, ratios 0.8 and 0.6, bf16/int8 factors
    python benchmarks/speed.py --quick         # fp32, ratio 0.6, bf16 factors, 2 rounds
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAL_TOKENS = 400_000


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
    from zsfw.calibration import load_texts, sample_windows, tokenize
    from zsfw.models import load_model
    from zsfw.sources import cache_dir, default_model_path, wikipedia_text_path

    paths = {}
    for ratio in ratios:
        for fmt in formats:
            path = cache / f"smollm2-zero_sum-{ratio}-{fmt}"
            if not path.exists():
                model, tokenizer = load_model(default_model_path())
                windows = sample_windows(tokenize(tokenizer, load_texts(wikipedia_text_path())),
                                         32, 512, 0, CAL_TOKENS)
                recipe = {"s": {"m": {"ZeroSumSVDModifier": {"ratio": ratio, "storage": fmt, "calibration": {
                    "samples": 32, "sequence_length": 512, "seed": 0, "max_tokens": CAL_TOKENS}}}}}
                zsfw.compress(model, recipe, windows, output_dir=path, tokenizer=tokenizer,
                              statistics_cache=cache_dir() / "statistics")
            paths[(ratio, fmt)] = path
    return paths


def _weight_bytes(model) -> int:
    """Bytes of weights a decoded token reads: the tensors the forward of every linear layer
    (compressed or not) and of the output head uses; the embedding lookup reads one row."""
    from torch import nn

    total = 0
    for module in model.modules():
        if type(module).__name__ == "PackedLowRankLinear":
            tensors = [module.A, module.B, module.bias]  # the unpacked factors the forward reads
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

    macs = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):  # dense layers, the head, and LowRankLinear's A and B
            macs += module.in_features * module.out_features
        elif type(module).__name__ == "PackedLowRankLinear":  # no nn.Linear inside
            macs += module.rank * (module.in_features + module.out_features)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    macs += c.num_hidden_layers * 2 * c.num_attention_heads * head_dim * seq // 2  # QKᵀ and PV, causal mean
    return macs


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--ratios", type=float, nargs="*", help="default: 0.8 0.6 (quick: 0.6)")
    parser.add_argument("--formats", nargs="*", help="default: bf16 int8 (quick: bf16)")
    parser.add_argument("--dtypes", nargs="*", help="default: float32 bfloat16 (quick: float32)")
    args = parser.parse_args()
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch
    import transformers

    # every variant's forward is the same code object (LlamaForCausalLM.forward), compiled for
    # several models and shapes: above dynamo's default of 8 cache entries per code object it
    # would recompile or fall back to eager in the middle of the timings
    torch._dynamo.config.cache_size_limit = 256
    torch._dynamo.config.accumulated_cache_size_limit = 1024

    from zsfw.aoti import export
    from zsfw.generation import generate
    from zsfw.models import load_model
    from zsfw.sources import cache_dir, default_model_path

    ratios = args.ratios or ((0.6,) if args.quick else (0.8, 0.6))
    formats = args.formats or (("bf16",) if args.quick else ("bf16", "int8"))
    dtypes = args.dtypes or (("float32",) if args.quick else ("float32", "bfloat16"))
    rounds = args.rounds or (2 if args.quick else 5)
    models_dir = cache_dir() / "speed-models"
    paths = _compressed_models(ratios, formats, models_dir)
    work = Path(tempfile.mkdtemp(prefix="zsfw-speed-"))
    variants: list[Variant] = []
    _, tokenizer = load_model(default_model_path())
    prompt = "The history of the city begins " * 20
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids[:, :64]
    prompt64 = tokenizer.decode(prompt_ids[0])
    prefill_ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        sources = [("dense", default_model_path())] + [
            (f"zsfw {r} {f}", paths[(r, f)]) for r in ratios for f in formats]
        for label, path in sources:
            model, _ = load_model(path, dtype=dtype)
            model.eval()
            for mode in ("eager", "compiled", "pt2"):
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
    for r in range(rounds):
        for v in variants:
            v.prefill.append(512 / prefill(v))
            d = decode(v)
            if d is not None:
                v.decode.append(d)
        print(f"round {r + 1}/{rounds} done", flush=True)
    _write(variants, rounds, args.quick, torch.__version__, transformers.__version__, torch.get_num_threads())


def _stat(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def _write(variants, rounds, quick, torch_version, transformers_version, threads) -> None:
    by_label = {v.label: v for v in variants}
    lines = [f"\n## Issue 5: speed of SmolLM2-135M, dense vs zsfw ({datetime.date.today().isoformat()}"
             f"{', quick' if quick else ''})\n",
             f"Command: `python {' '.join(sys.argv)}`. Machine: "
             f"{platform.machine()}, {os.cpu_count()} cores, torch {torch_version} ({threads} threads), "
             f"transformers {transformers_version}, Python {platform.python_version()}. {rounds} interleaved "
             "rounds after a warm-up; tokens/s as median (min–max). Speedups are against the dense model "
             "in the same dtype and mode (eager vs eager, compiled vs compiled); a pt2 row compares the "
             "package with the same model compiled. "
             "limits are the ratio of weight bytes per decoded token and of multiply-accumulates per "
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
        p = statistics.median(v.prefill) / statistics.median(ref.prefill)
        p_limit = ref.macs_per_token / v.macs_per_token
        d = statistics.median(v.decode) / statistics.median(ref.decode)
        d_limit = ref.weight_bytes / v.weight_bytes
        row += [f"{p:.2f}", f"{p_limit:.2f}", f"{100 * p / p_limit:.0f}%",
                f"{d:.2f}", f"{d_limit:.2f}", f"{100 * d / d_limit:.0f}%"]
        lines.append("| " + " | ".join(row) + " |")
    with open(HERE / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
