"""The size/quality frontier on the reference protocol: zsfw's storage recipes at several byte
budgets against the peers (``benchmarks/peers.py``) on the same calibration windows.

Each (setting, ratio, calibration draw) runs in its own process and leaves a cell in
``benchmarks/.frontier-cells/`` (wiki and news PPL, validation loss, kept bytes, compress time,
every layer's format and rank; the calibration statistics are cached across cells, so
``compress s`` of a cell after the first of its draw leaves out the calibration pass). The table and the plot (``benchmarks/frontier.png``) take every
cell there and every peer cell in ``benchmarks/.peer-cells/``. Settings are chosen on the
validation loss (held-out windows of the calibration text), never on wiki or news.

    python benchmarks/frontier.py --settings int4 hybrid3 --ratios 0.203 0.266 [--draws 3 4 5]
    python benchmarks/frontier.py --table-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
CELLS = HERE / ".frontier-cells"
PEER_CELLS = HERE / ".peer-cells"
PLOT = HERE / "frontier.png"
STATISTICS = Path.home() / ".cache" / "zsfw" / "frontier-statistics"  # one calibration pass serves every cell of a draw
ONE_SHOT = {"scorer": "first_order", "allocator": "zero_sum", "corrector": None, "whiten": True}
SETTINGS = {
    # one format everywhere
    "lowrank": {"storage": "bf16"},  # pure low rank (Zero-Sum SVD one shot)
    "int4": {"storage": {"name": "int4", "rounding": "rtn"}},  # base + loss-allocated residual
    "int4_gptq": {"storage": {"name": "int4", "rounding": "gptq"}},
    "int3_gptq": {"storage": {"name": "int3", "rounding": "gptq"}},
    # the same residual budget, not allocated by loss: every layer the same share (EoRA-like), or
    # by whitened σ alone
    "int3_gptq_uniform": {"storage": {"name": "int3", "rounding": "gptq"}, "allocator": "uniform"},
    "int3_gptq_sigma": {"storage": {"name": "int3", "rounding": "gptq"}, "scorer": "sigma"},
    # bits per layer: a format (and residual rank) per layer under the one budget
    "auto_gptq": {"storage": {"name": "auto", "formats": [
        "bf16", "int8", {"name": "int4", "rounding": "gptq"}, {"name": "int3", "rounding": "gptq"}]}},
    "auto_rtn": {"storage": {"name": "auto", "formats": ["bf16", "int8", "int4", "int3"]}},
}


def cell_path(setting: str, ratio: float, draw: int) -> Path:
    return CELLS / f"{setting}@{ratio:g}@{draw}.json"


def run_one(setting: str, ratio: float, draw: int, text: Path) -> dict:
    """Compress with ``setting`` at ``ratio`` on calibration draw ``draw`` and evaluate."""
    import torch

    import zsfw

    model, tokenizer = protocol.load_default_model()
    windows = protocol.reference_windows(tokenizer, text, calibration_seed=draw)
    recipe = {"frontier": {"modifiers": {"ZeroSumSVDModifier": {
        **ONE_SHOT, **SETTINGS[setting], "ratio": ratio,
        "calibration": {"samples": protocol.CAL_N, "sequence_length": protocol.CAL_LEN}}}}}
    start = time.perf_counter()
    model, report = zsfw.compress(model, recipe, windows.calibration, tokenizer=tokenizer,
                                  validation=windows.validation, statistics_cache=STATISTICS)
    cell = {"setting": setting, "ratio": ratio, "draw": draw, "md5": windows.md5,
            "threads": torch.get_num_threads(), "compress_seconds": time.perf_counter() - start,
            "phases": report.timings, "kept": report.total_bytes / report.reference_bytes,
            "layers": {l.name: {"format": l.format, "rank": None if l.dense else l.rank} for l in report.layers}}
    cell.update(protocol.held_out(model, windows.validation,
                                  {"wiki": windows.evaluation, "news": protocol.news_windows(tokenizer)}))
    return cell


def cells() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(CELLS.glob("*.json"))]


def peers() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(PEER_CELLS.glob("*.json"))] if PEER_CELLS.is_dir() else []


def _passes() -> dict[int, float]:
    """Seconds of each draw's calibration pass (the cell that ran it; the others hit the cache)."""
    out: dict[int, float] = {}
    for c in cells():
        out[c["draw"]] = max(out.get(c["draw"], 0.0), c["phases"].get("statistics", 0.0))
    return out


def _spread(values: list[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table() -> str:
    rows: dict[tuple[str, float], list[dict]] = {}
    for c in cells():
        rows.setdefault((c["setting"], c["ratio"]), []).append(c)
    lines = ["## The size/quality frontier: zsfw against the peers",
             "",
             f"Command: `python benchmarks/frontier.py`. Machine: {protocol.machine_line()}.",
             "SmolLM2-135M-Instruct fp32 on the reference windows (`shared/anchor`, 32×512 calibration windows; "
             "draw 3 = the authors' windows, other draws the same way with another seed); wiki = its last "
             "8×2048 tokens, news = the first 8×2048 tokens of the news text; `val loss` = the 8 validation "
             "windows settings are chosen on. Bytes: of the target layers, against bf16. Several draws: "
             "mean ± standard deviation. Peers: `benchmarks/peers.py` on the same windows (draw 3).",
             "`compress s` leaves out the calibration pass, which the cells of a draw share through the "
             "statistics cache: " + ", ".join(f"draw {d}: {t:.0f} s" for d, t in sorted(_passes().items()))
             + " (threads: the cells' `threads`).",
             "",
             "| method | ratio | bytes vs bf16 | wiki PPL | news PPL | val loss | compress s | draws | layers (format: count) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(peers(), key=lambda p: (p["bytes_vs_bf16"], p["method"])):
        val = f"{p['val_loss']:.4f}" if p.get("val_loss") is not None else ""
        lines.append(f"| {p['method']} (peer) | | {p['bytes_vs_bf16']:.3f} | {p['wiki']:.2f} | {p['news']:.2f} | {val} | "
                     f"{p['seconds']:.0f} | 3 | |")
    for (setting, ratio), group in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        formats: dict[str, int] = {}
        for layer in group[0]["layers"].values():
            formats[layer["format"]] = formats.get(layer["format"], 0) + 1
        lines.append(f"| zsfw {setting} | {ratio:g} | {statistics.fmean(c['kept'] for c in group):.3f} | "
                     f"{_spread([c['wiki_ppl'] for c in group])} | {_spread([c['news_ppl'] for c in group])} | "
                     f"{_spread([c['val_loss'] for c in group], 4)} | "
                     f"{statistics.fmean(c['compress_seconds'] - c['phases'].get('statistics', 0) for c in group):.0f} | "
                     f"{', '.join(str(c['draw']) for c in group)} | "
                     f"{', '.join(f'{k}: {v}' for k, v in sorted(formats.items()))} |")
    return "\n".join(lines)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    for c in cells():
        series.setdefault(f"zsfw {c['setting']}", []).append((c["kept"], c["wiki_ppl"]))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot(*zip(*points), marker="o", label=name)
    for p in peers():
        ax.scatter([p["bytes_vs_bf16"]], [p["wiki"]], marker="x", label=f"{p['method']} (peer)")
    ax.set_xlabel("bytes of the target layers vs bf16")
    ax.set_ylabel("wiki PPL (reference protocol)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=protocol.DEFAULT_REFERENCE_TEXT)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=[])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.266])
    parser.add_argument("--draws", nargs="+", type=int, default=[protocol.SEED],
                        help="calibration draws (3: the authors' windows)")
    parser.add_argument("--again", action="store_true", help="rerun cells that exist")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)  # internal: setting ratio draw
    args = parser.parse_args()
    CELLS.mkdir(exist_ok=True)
    if args.cell:
        setting, ratio, draw = args.cell[0], float(args.cell[1]), int(args.cell[2])
        cell_path(setting, ratio, draw).write_text(json.dumps(run_one(setting, ratio, draw, args.text), indent=1))
        return
    if not args.table_only:
        for setting in args.settings:
            for ratio in args.ratios:
                for draw in args.draws:
                    if args.again or not cell_path(setting, ratio, draw).exists():
                        subprocess.run([sys.executable, __file__, "--text", str(args.text), "--cell", setting,
                                        str(ratio), str(draw)], check=True)
    write_section("frontier", table())
    plot()


if __name__ == "__main__":
    main()
