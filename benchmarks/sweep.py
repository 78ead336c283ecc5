"""Stages, allocators, correctors and storage formats on the reference protocol, one configuration
per process, from cached statistics.

Each run compresses SmolLM2-135M-Instruct (fp32) with ``recipes/zero_sum_oneshot.yaml`` at ``--ratio``
on the authors' 32×512 calibration windows, with ``--stages`` (a JSON list, e.g. prehab) before the
statistics, ``--allocator`` (zero_sum by default), storage ``--storage`` (a name or a JSON object;
bf16 by default; ``{"name": "priced_as", "price": "packed", "store": "bf16"}`` is a control: one
format's ranks with another's modules) and ``--corrector`` (a JSON object: name and options). Validation windows (8) and
training windows (8) are drawn with ``--seed`` from the first 400K tokens, apart from the
calibration windows and each other. PPL is measured on the reference evaluation windows (last
8×2048 of wiki.txt) and on zsfw's news text (8×2048: a text nothing was chosen on). Statistics and
factorizations come from ``--cache`` after the first run with the same (possibly prehabbed)
weights, so ``compress s`` may not include the calibration pass: the cell records every phase.
Every run appends one JSON line to ``benchmarks/sweep.jsonl`` and rewrites the table of all of them
in ``log/sweep.md``.

    python benchmarks/sweep.py --corrector '{"name": "refine", "lr": 1e-4}' --seed 4
    python benchmarks/sweep.py --allocator '{"name": "fermigrad", "seed": 5}' --seed 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
LOG = HERE / "sweep.jsonl"


class PricedAs:
    """A control, not a format: one format's byte costs (so its ranks) with another's modules —
    e.g. packed's ranks with bf16 factors, to tell packed's loss from truncation apart from its
    8-bit rounding (issue 13, finding 9). ``kept bytes`` is then the priced format's."""

    name = "priced_as"

    def __init__(self, price: str = "packed", store: str = "bf16") -> None:
        import zsfw

        self.price, self.store = zsfw.storage_format(price), zsfw.storage_format(store)
        self.lowrank_bytes, self.dense_bytes = self.price.lowrank_bytes, self.price.dense_bytes
        self.dense_module, self.lowrank_module = self.price.dense_module, self.store.lowrank_module

    def skeleton(self, out_features: int, in_features: int, rank: int | None, bias: bool):
        return (self.price if rank is None else self.store).skeleton(out_features, in_features, rank, bias)


def register_controls() -> None:
    """Make ``priced_as`` a storage name in this process only."""
    import zsfw
    from zsfw import plugins

    class Controls:
        @zsfw.hookimpl
        def zsfw_register_storage_formats(self, register) -> None:
            register(PricedAs)

    plugins.register_plugin(Controls(), name="sweep_controls")


def run(ratio: float, stages: list[dict], allocator: str | dict, corrector: dict | None, storage: str | dict,
        seed: int, cache: Path, text: Path, label: str, damping: float | None = None,
        calibration_seed: int = protocol.SEED, geometry: tuple[int, int] = (protocol.CAL_N, protocol.CAL_LEN),
        training_windows: int = protocol.TRAIN_N, training_length: int = protocol.CAL_LEN) -> dict:
    import torch

    import zsfw
    from zsfw.recipe import PluginSpec
    from zsfw.compression.report import peak_rss_mb
    from zsfw.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()
    register_controls()
    model, tokenizer = protocol.load_default_model()
    windows = protocol.reference_windows(tokenizer, text, validation_seed=seed, calibration_seed=calibration_seed,
                                         calibration_samples=geometry[0], calibration_length=geometry[1],
                                         training_samples=training_windows, training_length=training_length)
    recipe = zsfw.load_recipe(protocol.REPO / "recipes" / "zero_sum_oneshot.yaml")
    recipe.modifier.ratio = ratio
    recipe.modifier.storage = PluginSpec.model_validate(storage)
    recipe.modifier.allocator = PluginSpec.model_validate(allocator)
    recipe.modifier.stages = [PluginSpec.model_validate(stage) for stage in stages]
    if damping is not None:
        recipe.modifier.damping = damping
    if corrector:
        recipe.modifier.corrector = PluginSpec.model_validate(corrector)
    start = time.perf_counter()
    model, report = zsfw.compress(model, recipe, windows.calibration, statistics_cache=cache,
                                  validation=windows.validation, training=windows.training)
    peak_mb = peak_rss_mb()  # before evaluation adds its own
    cell = {"label": label, "ratio": ratio, "damping": recipe.modifier.damping, "stages": stages, "allocator": allocator, "corrector": corrector,
            "storage": storage, "seed": seed, "calibration_seed": calibration_seed, "calibration_md5": windows.md5,
            "calibration_windows": list(windows.calibration.shape), "training_windows": training_windows,
            "training_length": training_length,
            "compress_seconds": time.perf_counter() - start, "phases": report.timings, "peak_rss_mb": peak_mb,
            "threads": torch.get_num_threads(), "machine": protocol.machine_line(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=HERE).stdout.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "correction_result": report.correction_result, "correction_steps": report.correction_steps,
            "stage_reports": report.stages, "allocation": report.allocation,
            "ranks": {layer.name: None if layer.dense else layer.rank for layer in report.layers},
            "formats": report.format_counts, "kept": report.total_bytes / report.reference_bytes,
            **protocol.held_out(model, windows.validation,
                                {"wiki": windows.evaluation, "news": protocol.news_windows(tokenizer)})}
    return cell


def configuration(cell: dict) -> str:
    """What the run changed from the one-shot recipe (zero_sum, bf16, no stage, no corrector)."""
    draw = cell.get("calibration_seed", protocol.SEED)
    shape = cell.get("calibration_windows", [protocol.CAL_N, protocol.CAL_LEN])
    parts = [("calibration draw", None if draw == protocol.SEED else draw),
             ("calibration windows", None if shape == [protocol.CAL_N, protocol.CAL_LEN] else "×".join(map(str, shape))),
             ("training windows", None if cell.get("training_windows", protocol.TRAIN_N) == protocol.TRAIN_N
                                  else cell["training_windows"]),
             ("training window length", None if cell.get("training_length", protocol.CAL_LEN) == protocol.CAL_LEN
                                        else cell["training_length"]),
             ("damping", None if cell.get("damping", 1e-4) == 1e-4 else cell["damping"]),
             ("stages", cell.get("stages") or None), ("allocator", cell.get("allocator", "zero_sum")),
             ("storage", cell.get("storage", "bf16")), ("corrector", cell["corrector"])]
    shown = [f"{what} `{json.dumps(value)}`" for what, value in parts
             if value not in (None, "zero_sum", "bf16")]
    if len(cell.get("formats", {})) > 1:  # storage: auto: what it chose
        shown.append("chose " + ", ".join(f"{name} {count}" for name, count in cell["formats"].items()))
    return "; ".join(shown) or "one shot"


def table(cells: list[dict]) -> str:
    lines = ["## Stages, allocators, correctors and storage formats on the reference protocol "
             "(`benchmarks/sweep.py`)", "",
             "One run a row, in the order run; each row's machine, commit and date are in "
             "`benchmarks/sweep.jsonl`. Seed: the validation and training windows' draw "
             "(`protocol.held_out_starts`); a component's own `seed` is in its options. The seconds "
             "are each run's stages + allocation + truncation + correction (validation passes included), "
             "not the statistics pass (cached); `peak RSS`: the process's peak resident memory when compression "
             "ended (model, cached statistics, the method's own state; rows before it was recorded have none); runs may have shared the 2 cores with other work, so compare "
             "seconds only where the text says they were measured alone.", "",
             f"Machine (last run): {cells[-1]['machine']}.", "",
             "`val loss`: the shipped model's mean next-token loss on the seed's validation windows (what a "
             "setting may be chosen on; rows before it was recorded have none); `one-shot → final`: a "
             "corrector's own validation record.", "",
             "| label | ratio | configuration | seed | kept bytes | val loss | wiki PPL | news PPL | val loss one-shot → final | s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        r = c["correction_result"] or {}
        val = f"{r['one_shot']:.4f} → {r['final']:.4f}" if r else ""
        seconds = sum(c["phases"].get(phase, 0) for phase in ("stages", "allocate", "truncate", "correct"))
        kept = f"{c['kept']:.3f}" if "kept" in c else ""
        held_out = f"{c['val_loss']:.4f}" if "val_loss" in c else ""
        peak = f"{c['peak_rss_mb']:.0f}" if "peak_rss_mb" in c else ""
        lines.append(f"| {c['label']} | {c['ratio']} | {configuration(c)} | {c['seed']} | {kept} | {held_out} | "
                     f"{c['wiki_ppl']:.2f} | {c['news_ppl']:.2f} | {val} | {seconds:.0f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--stages", type=json.loads, default=[], help="JSON list of {name, options...}")
    parser.add_argument("--allocator", type=lambda s: json.loads(s) if s.startswith("{") else s, default="zero_sum",
                        help="an allocator's name, or JSON: {name, options...}")
    parser.add_argument("--corrector", type=json.loads, default=None, help="JSON: {name, options...}")
    parser.add_argument("--storage", type=lambda s: json.loads(s) if s.startswith("{") else s, default="bf16",
                        help="a storage format's name, or JSON: {name, options...}")
    parser.add_argument("--seed", type=int, default=protocol.VAL_SEED, help="validation and training windows' draw")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/zsfw-reference-cache"))
    parser.add_argument("--text", type=Path, default=protocol.DEFAULT_REFERENCE_TEXT)
    parser.add_argument("--damping", type=float, default=None, help="the recipe's damping (default: its own)")
    parser.add_argument("--calibration-seed", type=int, default=protocol.SEED,
                        help="another draw of the 32×512 calibration windows from the same first 400K tokens "
                             f"(the authors' are {protocol.SEED}; others only for zsfw's own spread)")
    parser.add_argument("--calibration-windows", default=f"{protocol.CAL_N}x{protocol.CAL_LEN}",
                        help="another calibration geometry, SAMPLESxLENGTH (e.g. 8x2048: the same tokens in "
                             "evaluation-length windows); only for zsfw's own comparisons")
    parser.add_argument("--training-windows", type=int, default=protocol.TRAIN_N,
                        help="512-token training windows to draw from the first 400K tokens, apart from the "
                             "calibration and validation ones (prehab's, or refine's with windows: training)")
    parser.add_argument("--training-length", type=int, default=protocol.CAL_LEN,
                        help="tokens of each training window (e.g. 2048: the evaluation windows' length; "
                             "each is an aligned chunk of that length apart from the calibration and validation "
                             "windows)")
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    cell = run(args.ratio, args.stages, args.allocator, args.corrector, args.storage, args.seed, args.cache, args.text, args.label,
               args.damping, args.calibration_seed, tuple(int(v) for v in args.calibration_windows.split("x")),
               args.training_windows, args.training_length)
    with LOG.open("a") as f:
        f.write(json.dumps(cell) + "\n")
    write_section("sweep", table([json.loads(line) for line in LOG.read_text().splitlines()]))
    print(table([cell]))


if __name__ == "__main__":
    main()
