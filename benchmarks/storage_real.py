"""Issue-3 benchmark: SmolLM2-135M at ratio 0.8 saved as bf16, int8 and packed factors.

For each format: compress (zero_sum, 32×512 Wikipedia calibration tokens, statistics shared
through the statistics cache so only the first format runs the calibration pass), save, then in
a fresh process time ``zsfw.load`` and measure held-out Wikipedia PPL of the reloaded model
(8 windows × 2048 tokens after token 400000). Appends a section to RESULTS.md.

    python benchmarks/storage_real.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = ("bf16", "int8", "packed")
RATIO = 0.8
CAL_TOKENS = 400_000

RELOAD = """
import json, sys, time
start = time.perf_counter()
import zsfw
imported = time.perf_counter()
model = zsfw.load(sys.argv[1])
loaded = time.perf_counter()
from zsfw.calibration import load_texts, tokenize
from zsfw.evaluation import perplexity
from zsfw.sources import wikipedia_text_path
from transformers import AutoTokenizer
tokens = tokenize(AutoTokenizer.from_pretrained(sys.argv[1]), load_texts(wikipedia_text_path()))
ppl = perplexity(model, tokens, window=2048, windows=8, offset=int(sys.argv[2]), desc="wiki ppl")
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "wiki_ppl": ppl.perplexity}))
"""


def main() -> None:
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torch
    import transformers

    import zsfw
    from zsfw.calibration import load_texts, sample_windows, tokenize
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.models import load_model
    from zsfw.sources import cache_dir, default_model_path, wikipedia_text_path

    return_large_frees_to_the_os()
    stats_cache = cache_dir() / "statistics"
    work = Path(tempfile.mkdtemp(prefix="zsfw-storage-bench-"))
    rows = []
    for fmt in FORMATS:
        model, tokenizer = load_model(default_model_path())
        tokens = tokenize(tokenizer, load_texts(wikipedia_text_path()))
        windows = sample_windows(tokens, 32, 512, 0, CAL_TOKENS)
        original = {n: m.weight for n, m in model.named_modules() if n.endswith("_proj")}
        fp32_bytes = sum(w.nbytes for w in original.values())
        recipe = {"s": {"m": {"ZeroSumSVDModifier": {"ratio": RATIO, "storage": fmt, "calibration": {
            "samples": 32, "sequence_length": 512, "seed": 0, "max_tokens": CAL_TOKENS}}}}}
        start = time.perf_counter()
        _, report = zsfw.compress(model, recipe, windows, output_dir=work / fmt, tokenizer=tokenizer,
                                  statistics_cache=stats_cache)
        seconds = time.perf_counter() - start
        totals = report.to_dict()["totals"]
        del model
        out = subprocess.run([sys.executable, "-c", RELOAD, str(work / fmt), str(CAL_TOKENS)],
                             capture_output=True, text=True, check=True)
        reload = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"format": fmt, "compress_s": seconds, "cached": report.statistics_cached,
                     "phases": report.timings, "predicted": totals["bytes"],
                     "written": totals["written_bytes"], "reference16": totals["reference_bytes"],
                     "fp32": fp32_bytes, "file_bytes": totals["file_bytes"],
                     "ranks": sum(l.rank for l in report.layers if not l.dense),
                     "dense": totals["dense_layers"], **reload})
        print(json.dumps(rows[-1]), flush=True)
    _write(rows, torch.__version__, transformers.__version__, torch.get_num_threads())


def _write(rows: list[dict], torch_version: str, transformers_version: str, threads: int) -> None:
    lines = [f"\n## Issue 3: SmolLM2-135M at ratio {RATIO} stored as bf16, int8, packed "
             f"({datetime.date.today().isoformat()})\n",
             f"Command: `python benchmarks/storage_real.py`. Machine: {platform.machine()}, "
             f"{os.cpu_count()} cores, torch {torch_version} ({threads} threads), transformers "
             f"{transformers_version}, Python {platform.python_version()}. zero_sum allocation, 32×512 "
             "calibration tokens from the first 400000 Wikipedia tokens; the statistics come from the "
             "cache after the first format. Reload and PPL in a fresh process (`zsfw.load`), wiki PPL "
             "on 8 × 2048 tokens after token 400000.\n",
             "| format | target bytes on disk | vs fp32 original | vs 16-bit | predicted = written | "
             "summed rank | dense layers | file MB | compress s | reload s (import + load) | wiki PPL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['written']:,} | {r['written'] / r['fp32']:.3f} | "
            f"{r['written'] / r['reference16']:.3f} | {r['predicted'] == r['written']} | {r['ranks']} | "
            f"{r['dense']} | {r['file_bytes'] / 1e6:.1f} | {r['compress_s']:.0f}"
            f"{' (cached statistics)' if r['cached'] else ''} | {r['import_s']:.1f} + {r['load_s']:.1f} | "
            f"{r['wiki_ppl']:.2f} |")
    with open(HERE / "RESULTS.md", "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
