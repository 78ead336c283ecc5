"""Correctors and storage formats on the reference protocol, one configuration per process, from
cached statistics.

Each run compresses SmolLM2-135M-Instruct (fp32) with ``recipes/zero_sum_oneshot.yaml`` at ``--ratio``
on the authors' 32×512 calibration windows, stores it as ``--storage`` (a name or a JSON object;
bf16 by default), runs ``--corrector`` (a JSON object: name and options) judged on 8 validation windows of the first 400K tokens drawn with ``--seed``, and
measures PPL on the reference evaluation windows (last 8×2048 of wiki.txt) and on zsfw's news
text (8×2048: a text nothing was chosen on). The one-shot statistics and factorizations come
from ``--cache`` after the first run, so ``compress s`` counts the correction, not the
calibration pass: the cell records both. Every run appends one JSON line to
``benchmarks/correction-sweep.jsonl`` and rewrites the table of all of them in RESULTS.md.

    python benchmarks/correction_sweep.py --corrector '{"name": "refine", "lr": 1e-4}' --seed 4
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
LOG = HERE / "correction-sweep.jsonl"


def run(ratio: float, corrector: dict | None, storage: str | dict, seed: int, cache: Path, text: Path,
        label: str) -> dict:
    import torch

    import zsfw
    from zsfw.recipe import PluginSpec
    from zsfw.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()
    model, tokenizer = protocol.load_default_model()
    windows = protocol.reference_windows(tokenizer, text, validation_seed=seed)
    recipe = zsfw.load_recipe(protocol.REPO / "recipes" / "zero_sum_oneshot.yaml")
    recipe.modifier.ratio = ratio
    recipe.modifier.storage = PluginSpec.model_validate(storage)
    if corrector:
        recipe.modifier.corrector = PluginSpec.model_validate(corrector)
    start = time.perf_counter()
    model, report = zsfw.compress(model, recipe, windows.calibration, statistics_cache=cache,
                                  validation=windows.validation)
    cell = {"label": label, "ratio": ratio, "corrector": corrector, "storage": storage, "seed": seed,
            "compress_seconds": time.perf_counter() - start, "phases": report.timings,
            "threads": torch.get_num_threads(), "machine": protocol.machine_line(),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=HERE).stdout.strip(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "correction_result": report.correction_result, "correction_steps": report.correction_steps,
            "wiki_ppl": protocol.perplexity(model, windows.evaluation),
            "news_ppl": protocol.perplexity(model, protocol.news_windows(tokenizer))}
    return cell


def table(cells: list[dict]) -> str:
    lines = ["## Correctors and storage formats on the reference protocol (`benchmarks/correction_sweep.py`)", "",
             "One run a row, in the order run; each row's machine, commit and date are in "
             "`benchmarks/correction-sweep.jsonl`. Seed: the validation windows' draw "
             "(`protocol.validation_starts`); the corrector's own `seed` is in its options. "
             "`correct s` includes the validation passes.", "",
             f"Machine (last run): {cells[-1]['machine']}.", "",
             "| label | ratio | storage | corrector | seed | wiki PPL | news PPL | val loss one-shot → final | correct s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        r = c["correction_result"] or {}
        val = f"{r['one_shot']:.4f} → {r['final']:.4f}" if r else ""
        lines.append(f"| {c['label']} | {c['ratio']} | `{json.dumps(c.get('storage', 'bf16'))}` | "
                     f"`{json.dumps(c['corrector'])}` | {c['seed']} | "
                     f"{c['wiki_ppl']:.2f} | {c['news_ppl']:.2f} | {val} | {c['phases'].get('correct', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--corrector", type=json.loads, default=None, help="JSON: {name, options...}")
    parser.add_argument("--storage", type=lambda s: json.loads(s) if s.startswith("{") else s, default="bf16",
                        help="a storage format's name, or JSON: {name, options...}")
    parser.add_argument("--seed", type=int, default=protocol.VAL_SEED, help="validation windows' draw")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/zsfw-reference-cache"))
    parser.add_argument("--text", type=Path, default=protocol.DEFAULT_REFERENCE_TEXT)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    cell = run(args.ratio, args.corrector, args.storage, args.seed, args.cache, args.text, args.label)
    with LOG.open("a") as f:
        f.write(json.dumps(cell) + "\n")
    write_section("correction-sweep", table([json.loads(line) for line in LOG.read_text().splitlines()]))
    print(table([cell]))


if __name__ == "__main__":
    main()
