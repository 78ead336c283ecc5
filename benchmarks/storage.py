"""What a compressed model costs to store and reload: SmolLM2-135M at ratio 0.8 as bf16, int8, packed.

For each format: compress (zero_sum on zsfw's protocol, ``protocol.zsfw_windows``: 32×512
Wikipedia calibration tokens, statistics shared through the statistics cache so only the first
format runs the calibration pass), save, then in a fresh process time ``zsfw.load`` and measure
held-out Wikipedia PPL of the reloaded model (8 windows × 2048 tokens after token 400000).
Writes its section of the log (``log/storage-formats.md``).

    python benchmarks/storage.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
FORMATS = ("bf16", "int8", "packed")
RATIO = 0.8

# a fresh process: the import and load times are those of a user's first call
RELOAD = """
import json, sys, time
start = time.perf_counter()
import zsfw
imported = time.perf_counter()
model = zsfw.load(sys.argv[1])
loaded = time.perf_counter()
sys.path.insert(0, sys.argv[2])
import protocol
from transformers import AutoTokenizer
windows = protocol.zsfw_windows(AutoTokenizer.from_pretrained(sys.argv[1]))
figures = protocol.held_out(model, windows.validation, {"wiki": windows.evaluation})
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, **figures}))
"""


def main() -> None:
    """Compress, save and reload each format; write the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    args = parser.parse_args()
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    import zsfw
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.sources import cache_dir

    return_large_frees_to_the_os()
    stats_cache = cache_dir() / "statistics"
    work = Path(tempfile.mkdtemp(prefix="zsfw-storage-bench-"))
    rows = []
    for fmt in args.formats:
        model, tokenizer = protocol.load_default_model()
        windows = protocol.zsfw_windows(tokenizer)
        original = {n: m.weight for n, m in model.named_modules() if n.endswith("_proj")}
        fp32_bytes = sum(w.nbytes for w in original.values())
        recipe = {"s": {"m": {"ZeroSumSVDModifier": {"ratio": RATIO, "storage": fmt,
                                                     "calibration": protocol.CALIBRATION}}}}
        start = time.perf_counter()
        _, report = zsfw.compress(model, recipe, windows.calibration, output_dir=work / fmt,
                                  tokenizer=tokenizer, statistics_cache=stats_cache)
        seconds = time.perf_counter() - start
        totals = report.to_dict()["totals"]
        del model
        out = subprocess.run([sys.executable, "-c", RELOAD, str(work / fmt), str(HERE)],
                             capture_output=True, text=True, check=True)
        reload = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"format": fmt, "compress_s": seconds, "cached": report.statistics_cached,
                     "phases": report.timings, "predicted": totals["bytes"],
                     "written": totals["written_bytes"], "reference16": totals["reference_bytes"],
                     "fp32": fp32_bytes, "file_bytes": totals["file_bytes"],
                     "ranks": sum(l.rank for l in report.layers if not l.dense),
                     "dense": totals["dense_layers"], **reload})
        print(json.dumps(rows[-1]), flush=True)
    _write(rows)


def _write(rows: list[dict]) -> None:
    lines = [f"## Issue 3: SmolLM2-135M at ratio {RATIO} stored as {', '.join(r['format'] for r in rows)} "
             f"({datetime.date.today().isoformat()})\n",
             f"Command: `python {' '.join(sys.argv)}`. Machine: {protocol.machine_line()}. zero_sum "
             f"allocation, 32×512 calibration tokens from the first {protocol.CUT} Wikipedia tokens; "
             "the statistics come from the cache after the first format. Reload and PPL in a fresh "
             f"process (`zsfw.load`), wiki PPL on {protocol.EVAL_N} × {protocol.EVAL_LEN} tokens after "
             f"token {protocol.CUT}.\n",
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
    section = "\n".join(lines)
    write_section("storage", section)
    print(section)


if __name__ == "__main__":
    main()
