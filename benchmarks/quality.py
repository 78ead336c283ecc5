"""Issue-4 quality benchmark: every method on SmolLM2-135M, PPL against kept bytes.

zsfw's protocol (``protocol.zsfw_windows``): calibration 32 × 512 tokens from the first 400K
tokens of the Wikipedia text; evaluation 8 windows × 2048 tokens after token 400K (text
calibration never saw) and the first 8 × 2048 of the news text. Every cell (method × ratio ×
format) runs in its own process (its own peak RSS) and is cached as JSON in
``benchmarks/.quality-cells/`` (committed, so the grid can span sessions): an interrupted run
resumes where it stopped; delete a cell's file to re-run it. The calibration statistics are
shared through zsfw's statistics cache, so a cell that differs from a finished one only by
ratio, allocator or format skips the calibration pass.

    python benchmarks/quality.py               # the full grid, then its log section and quality.png
    python benchmarks/quality.py --quick       # 3 cells, 8 calibration windows, 2 eval windows
    python benchmarks/quality.py --only zero_sum@0.8/bf16 uniform@0.8/bf16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"
CELLS = HERE / ".quality-cells"

METHODS = {  # name -> (recipe file, modifier overrides)
    "plain_svd": ("plain_svd.yaml", {}),
    "uniform": ("uniform_svd_llm.yaml", {}),
    "sigma": ("sigma_global.yaml", {}),
    "greedy_negative": ("greedy_negative.yaml", {}),
    "greedy_negative_topk": ("greedy_negative.yaml", {"allocator": {"name": "greedy_negative",
                                                                    "keep_top_k": True}}),
    "zero_sum": ("zero_sum_oneshot.yaml", {}),
    "zero_sum_g1": ("zero_sum_oneshot.yaml", {"calibration": {"gradient_samples": 1}}),
    "zero_sum_c1": ("zero_sum_oneshot.yaml", {"corrector": {"name": "projected_gradient", "cycles": 1}}),
    "zero_sum_c5": ("zero_sum_oneshot.yaml", {"corrector": {"name": "projected_gradient", "cycles": 5}}),
}


def grid(quick: bool) -> list[str]:
    """Cell ids ``method@ratio/format`` (``uncompressed`` alone)."""
    if quick:
        return ["uncompressed", "uniform@0.8/bf16", "zero_sum@0.8/bf16"]
    one_shot = [m for m in METHODS if m not in ("zero_sum_c1", "zero_sum_c5")]
    cells = ["uncompressed"]  # most telling first: the grid takes hours on 2 cores
    cells += [f"{m}@{r}/bf16" for r in (0.8, 0.6, 0.9) for m in one_shot]
    cells += [f"zero_sum@{r}/{f}" for r in (0.8, 0.6) for f in ("int8", "packed")]
    # below 0.5 of the 16-bit bytes, int8 layers can no longer all stay dense: low-rank int8 begins
    cells += [f"zero_sum@0.4/{f}" for f in ("bf16", "int8", "packed")]
    cells += [f"zero_sum_c1@{r}/bf16" for r in (0.8, 0.6, 0.9)]
    cells += [f"zero_sum_c5@{r}/bf16" for r in (0.8, 0.6)]
    return cells


def calibration(quick: bool) -> dict:
    """The protocol's calibration block (``--quick``: 8 windows instead of 32)."""
    return {**protocol.CALIBRATION, "samples": 8 if quick else protocol.CAL_N}


def recipe_for(cell: str, quick: bool) -> dict | None:
    """The recipe of ``cell`` with its ratio, format and the protocol's calibration (None: uncompressed)."""
    if cell == "uncompressed":
        return None
    method, rest = cell.split("@")
    ratio, storage = rest.split("/")
    file, overrides = METHODS[method]
    recipe = yaml.safe_load((RECIPES / file).read_text())
    modifier = next(iter(next(iter(recipe.values())).values()))["ZeroSumSVDModifier"]
    modifier.update(ratio=float(ratio), storage=storage)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(modifier.get(key), dict):
            modifier[key].update(value)
        else:
            modifier[key] = value
    modifier["calibration"].update(calibration(quick))
    return recipe


def run_cell(cell: str, quick: bool) -> dict:
    """Compress (unless uncompressed) and evaluate one cell in this process."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import zsfw
    from zsfw.compression.report import peak_rss_mb
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.sources import cache_dir

    return_large_frees_to_the_os()
    model, tokenizer = protocol.load_default_model()
    windows = protocol.zsfw_windows(tokenizer, calibration(quick)["samples"])
    evaluated = 2 if quick else protocol.EVAL_N
    result: dict = {"cell": cell, "threads": torch.get_num_threads()}
    recipe = recipe_for(cell, quick)
    if recipe is not None:
        start = time.perf_counter()
        model, report = zsfw.compress(model, recipe, windows.calibration,
                                      statistics_cache=cache_dir() / "statistics")
        by_type: dict[str, list[float]] = {}
        for layer in report.layers:
            by_type.setdefault(layer.name.rsplit(".", 1)[-1], []).append(layer.kept)
        result.update(compress_s=time.perf_counter() - start, phases=report.timings,
                      cached=report.statistics_cached, peak_rss_mb=peak_rss_mb(),
                      kept=report.total_bytes / report.reference_bytes,
                      dense_layers=sum(l.dense for l in report.layers),
                      correction_losses=report.correction_losses,
                      kept_by_type={k: round(sum(v) / len(v), 3) for k, v in by_type.items()})
    result.update(protocol.held_out(model, windows.validation, {"wiki": windows.evaluation[:evaluated],
                                                                "news": protocol.news_windows(tokenizer)[:evaluated]}))
    return result


def _cell_file(cell: str, quick: bool) -> Path:
    return CELLS / ("quick" if quick else "full") / f"{cell.replace('/', '_')}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="cell ids to run (default: the whole grid)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # the per-cell subprocess
    args = parser.parse_args()
    if args.cell:
        out = _cell_file(args.cell, args.quick)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(run_cell(args.cell, args.quick), indent=2))
        os.replace(tmp, out)
        return
    cells = args.only or grid(args.quick)
    for i, cell in enumerate(cells, 1):
        if _cell_file(cell, args.quick).exists():
            print(f"[{i}/{len(cells)}] {cell}: cached", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {cell}: running", flush=True)
        subprocess.run([sys.executable, __file__, "--cell", cell] + ["--quick"] * args.quick, check=True)
    results = [json.loads(p.read_text()) for c in grid(args.quick)
               if (p := _cell_file(c, args.quick)).exists()]
    _write(results, args.quick)


def _write(results: list[dict], quick: bool) -> None:
    rows = ["| cell | wiki PPL | news PPL | kept | dense | compress s | stats s (cached) | factorize s | "
            "correct s | peak RSS MB | kept by type (q k v o gate up down) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "kept" not in r:
            rows.append(f"| {r['cell']} | {r['wiki_ppl']:.2f} | {r['news_ppl']:.2f} | 1.000 | | | | | | | |")
            continue
        p, k = r["phases"], r["kept_by_type"]
        types = " ".join(f"{k.get(t, 0):.2f}" for t in
                         ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        rows.append(f"| {r['cell']} | {r['wiki_ppl']:.2f} | {r['news_ppl']:.2f} | {r['kept']:.3f} | "
                    f"{r['dense_layers']} | {r['compress_s']:.0f} | {p.get('statistics', 0):.0f}"
                    f"{' (yes)' if r['cached'] else ''} | {p.get('factorize + score', 0):.0f} | "
                    f"{p.get('correct', 0):.0f} | {r['peak_rss_mb']:.0f} | {types} |")
    head = [f"## Issue 4: quality of every method on SmolLM2-135M "
                   f"({datetime.date.today().isoformat()}{', quick' if quick else ''})\n",
            f"Command: `python benchmarks/quality.py{' --quick' if quick else ''}`. Machine: "
            f"{protocol.machine_line()}. Cells are `method@ratio/format`; the methods are the recipes "
            "in `recipes/` (g1: gradient from 1 window; c1/c5: 1 or 5 correction cycles; greedy_negative_topk: "
            "greedy_negative restricted to each layer's smallest remaining σ). Calibration "
            f"{'8' if quick else '32'} × 512 tokens from the first {protocol.CUT} Wikipedia tokens; wiki PPL on "
            f"{'2' if quick else '8'} × 2048 tokens after token {protocol.CUT}, news PPL on the first "
            f"{'2' if quick else '8'} × 2048 news tokens. `kept` is bytes against 16-bit targets. "
            f"Plot: `benchmarks/quality{'-quick' if quick else ''}.png`.\n"]
    section = "\n".join(head + rows)
    write_section("quality-quick" if quick else "quality", section)
    _plot(results, HERE / ("quality-quick.png" if quick else "quality.png"))
    print(section)


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    base = next((r["wiki_ppl"] for r in results if r["cell"] == "uncompressed"), None)
    for r in results:
        if "kept" in r:
            method, rest = r["cell"].split("@")
            lines.setdefault(f"{method} ({rest.split('/')[1]})", []).append((r["kept"], r["wiki_ppl"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab20").colors
    for i, (label, points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="os^Dv"[i % 5],
                color=colors[2 * i % 20 + i // 10 % 2], label=label)
    if base:
        ax.axhline(base, color="gray", ls="--", lw=1, label="uncompressed")
    ax.set_yscale("log")
    ax.set_xlabel("kept bytes (fraction of the 16-bit target layers)")
    ax.set_ylabel("held-out Wikipedia PPL")
    ax.set_title("SmolLM2-135M: PPL vs kept bytes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
