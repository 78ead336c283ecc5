"""zsfw on the reference protocol: the tokens the authors' code was measured on.

SmolLM2-135M-Instruct in fp32; the shipped recipes at ratio 0.8 (``recipes/zero_sum_oneshot.yaml``,
the default ``recipes/zero_sum.yaml``, ``recipes/uniform_svd_llm.yaml``, …) calibrated on the
protocol's 32×512 windows (md5 checked);
perplexity on its last 8 windows of 2048 tokens (see ``protocol.py``). Each method runs in its own
process, so its peak RSS is its own, and leaves a cell with its PPL, timings and every layer's rank
in ``benchmarks/.reference-cells/`` (committed: a later run can check the ranks did not move).

    python benchmarks/reference.py [--text ../shared/anchor/wiki.txt] [--only zero_sum uniform]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
CELLS = HERE / ".reference-cells"
RECIPES = {"uncompressed": None, "zero_sum": "zero_sum_oneshot.yaml", "uniform": "uniform_svd_llm.yaml",
           "zero_sum_streamed": "zero_sum_oneshot.yaml", "zero_sum_lazy": "zero_sum_oneshot.yaml",
           "zero_sum_2proc": "zero_sum_oneshot.yaml", "default": "zero_sum.yaml",
           "zero_sum_refined": "zero_sum_refined.yaml", "zero_sum_refined_bf16": "zero_sum_refined_bf16.yaml",
           "zero_sum_corrected": "zero_sum_corrected.yaml",
           "zero_sum_corrected_published": "zero_sum_corrected.yaml",
           "zero_sum_corrected_rotating": "zero_sum_corrected.yaml",
           "zero_sum_replanned": "zero_sum_replanned.yaml", "zero_sum_pivga": "zero_sum_pivga.yaml",
           "fermigrad": "fermigrad.yaml"}
PROCESSES = {"zero_sum_2proc": 2}  # run under torchrun with this many processes
EXECUTION = {"zero_sum_streamed": {"driver": "streamed"},  # when not the default
             "zero_sum_lazy": {"driver": "streamed", "weights": "lazy", "offload": "disk"}}
RATIO = 0.8  # every row, whatever its recipe file says
CORRECTOR = {"zero_sum_corrected_published": {"backtrack": 0, "keep_best": False},  # over the recipe's
             "zero_sum_corrected_rotating": {"cycles": 6, "rotate": 4}}
AUTHORS = {"uncompressed": "19.13", "zero_sum": "41.66 (gradient from 32 windows)",
           "uniform": "125.77", "zero_sum_streamed": "41.66 (gradient from 32 windows)",
           "zero_sum_lazy": "41.66 (gradient from 32 windows)",
           "zero_sum_2proc": "41.66 (gradient from 32 windows)",
           "default": "41.66 (one shot; their correction: 42.34)",
           "zero_sum_refined": "41.66 (one shot, bf16 factors; their correction: 42.34)",
           "zero_sum_refined_bf16": "41.66 (one shot; their correction: 42.34)",
           "zero_sum_corrected": "42.34 (3 stages, re-planning, gradient 1)",
           "zero_sum_corrected_published": "42.34 (3 stages, re-planning, gradient 1)",
           "zero_sum_corrected_rotating": "42.34 (3 stages, re-planning, gradient 1)",
           "zero_sum_replanned": "42.34 (3 stages, re-planning, gradient 1)",
           "zero_sum_pivga": "41.66 (one shot, bf16 factors; their correction: 42.34)",
           "fermigrad": "41.66 (zero_sum one shot; FermiGrad: no code)"}


def run_one(method: str, text: Path) -> dict:
    """Compress (unless uncompressed) and evaluate in this process; returns the cell."""
    import torch

    import zsfw
    from zsfw.compression.report import peak_rss_mb
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.residency import lazy_model
    from zsfw.sources import default_model_path

    return_large_frees_to_the_os()  # as the CLI does
    lazy = EXECUTION.get(method, {}).get("weights") == "lazy"
    if lazy:  # never the whole model in memory: written as it is compressed, measured reloaded
        from transformers import AutoTokenizer

        model, tokenizer = lazy_model(default_model_path()), AutoTokenizer.from_pretrained(default_model_path())
    else:
        model, tokenizer = protocol.load_default_model()
    recipe = RECIPES[method] and zsfw.load_recipe(protocol.REPO / "recipes" / RECIPES[method])
    training = recipe and recipe.modifier.training_windows  # e.g. refine on training windows
    windows = protocol.reference_windows(tokenizer, text, training_samples=training or protocol.TRAIN_N)
    cell: dict = {"method": method, "md5": windows.md5, "threads": torch.get_num_threads()}
    if recipe:
        for key, value in EXECUTION.get(method, {}).items():
            setattr(recipe.modifier.execution, key, value)
        recipe.modifier.ratio = RATIO
        if method in CORRECTOR:
            recipe.modifier.corrector.options.update(CORRECTOR[method])
        with tempfile.TemporaryDirectory() as out:
            before = peak_rss_mb()  # loading and tokenizing; then the peak of compression alone
            reset = protocol.reset_peak_rss()
            start = time.perf_counter()
            model, report = zsfw.compress(model, recipe, windows.calibration,
                                          output_dir=Path(out) / "model" if lazy else None,
                                          tokenizer=tokenizer,  # saved with it: not loaded again
                                          validation=windows.validation,
                                          training=windows.training if training else None)
            cell.update(compress_seconds=time.perf_counter() - start, phases=report.timings,
                        peak_rss_mb=max(before, peak_rss_mb()), calibration_loss=report.calibration_loss)
            if reset:
                cell.update(compress_peak_rss_mb=peak_rss_mb())
            if report.correction_steps:
                cell.update(correction_losses=report.correction_losses, correction_steps=report.correction_steps,
                            correction_result=report.correction_result)
            if report.layers:  # not a helper process under torchrun
                cell.update(kept=report.total_bytes / report.reference_bytes,
                            ranks={l.name: None if l.dense else l.rank for l in report.layers})
            if torch.distributed.is_initialized():  # every process's peak, then only process 0 measures
                peaks = [None] * torch.distributed.get_world_size()
                torch.distributed.all_gather_object(peaks, max(before, peak_rss_mb()))
                cell.update(process_peak_rss_mb=peaks, peak_rss_mb=max(peaks))
                if torch.distributed.get_rank() != 0:
                    return cell
            if lazy:
                model = zsfw.load(Path(out) / "model")
    cell.update(protocol.held_out(model, windows.validation, {"wiki": windows.evaluation}))
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=protocol.DEFAULT_REFERENCE_TEXT,
                        help="the reference wiki.txt (default: ../shared/anchor/wiki.txt)")
    parser.add_argument("--only", nargs="+", choices=sorted(RECIPES), default=list(RECIPES),
                        help="methods to run (zero_sum_streamed: zero_sum with the layer-streamed driver; "
                             "zero_sum_lazy: streamed, lazily loaded weights, boundaries on disk; "
                             "zero_sum_2proc: two processes under torchrun, one thread each; "
                             "default: recipes/zero_sum.yaml (one shot + refinement); zero_sum_refined: "
                             "the longer refinement with PivGa factors (_bf16: with bf16 factors); zero_sum_corrected: the corrected recipe; _published: every step taken, "
                             "no keep-best; _rotating: 6 cycles over 4 rotating shares of the windows; "
                             "zero_sum_replanned: re-planning between cycles; zero_sum_pivga: the default "
                             "stored as PivGa; fermigrad: FermiGrad's allocation, one shot)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # internal: run one method, write its cell
    args = parser.parse_args()
    CELLS.mkdir(exist_ok=True)
    if args.cell:
        cell = run_one(args.cell, args.text)
        if "process_peak_rss_mb" in cell:
            import torch.distributed

            torch.distributed.destroy_process_group()
        if "wiki_ppl" in cell:  # not a helper process under torchrun
            (CELLS / f"{args.cell}.json").write_text(json.dumps(cell, indent=1))
        return
    for method in args.only:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={PROCESSES[method]}"] if method in PROCESSES else [sys.executable])
        subprocess.run([*launcher, __file__, "--text", str(args.text), "--cell", method], check=True)
    write_section("reference", _table([json.loads((CELLS / f"{m}.json").read_text())
                                       for m in RECIPES if (CELLS / f"{m}.json").exists()]))


def _table(cells: list[dict]) -> str:
    lines = ["## The reference protocol: zsfw on the authors' tokens",
             "",
             f"Command: `python benchmarks/reference.py`. Machine: {protocol.machine_line()}.",
             f"Tokens: `shared/anchor` (calibration ids md5 {cells[0]['md5']}), SmolLM2-135M-Instruct "
             "fp32, shipped recipes at ratio 0.8 (bf16 factors; zero_sum_pivga and zero_sum_refined: PivGa factors in bf16 at the "
             "same bytes), PPL on the last 8×2048 tokens.",
             "",
             "`peak RSS`: the process's, loading and tokenizing the reference text included; `compress "
             "peak`: from the start of `compress` on (the peak reset there; rows before it was recorded have none).",
             "",
             "| method | wiki PPL | authors' code | compress s | peak RSS MB | compress peak MB | kept bytes |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        peak = " + ".join(f"{p:.0f}" for p in c.get("process_peak_rss_mb", [c.get("peak_rss_mb", 0)]))
        alone = f"{c['compress_peak_rss_mb']:.0f}" if "compress_peak_rss_mb" in c else ""
        cost = (f"{c['compress_seconds']:.0f} | {peak} | {alone} | {c['kept']:.3f}"
                if "compress_seconds" in c else " | | | 1.000")
        ppl = c["wiki_ppl"] if "wiki_ppl" in c else c["ppl"]  # cells before the held-out figures were recorded
        lines.append(f"| {c['method']} | {ppl:.2f} | {AUTHORS[c['method']]} | {cost} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
