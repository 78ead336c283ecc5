"""Peers on zsfw's work: the quantizers a user would pick instead, on the reference protocol.

SmolLM2-135M-Instruct in fp32, the decoder's linear layers (``[Linear]`` minus ``lm_head``: what
zsfw compresses), the reference protocol's 32×512 calibration windows (md5 checked) and its
evaluation windows, perplexity by zsfw's own code (``protocol.held_out``: wiki = the last 8×2048
tokens of the reference text, news = the first 8×2048 of the news text). Each peer hands back the
weights it would compute with (its integers × its scales, fp32); they replace the targets of a
freshly loaded model, which is evaluated as zsfw's rows are.

- llm-compressor 0.14 (``oneshot``: GPTQ, and round-to-nearest with ``QuantizationModifier``),
  symmetric int weights, activations untouched: W4 and W3 with one scale per 64 weights (SmolLM2's
  width 576 is no multiple of 128), W8 with one scale per output channel. It runs in its own
  virtual environment (``<zsfw cache>/peers-venv``, made on first use from PyPI; never zsfw's),
  through ``peers_llmcompressor.py``.
- torchao's weight-only round-to-nearest, in zsfw's environment: int4 per 64 weights
  (``IntxWeightOnlyConfig``) and int8 per output channel (``Int8WeightOnlyConfig``).

Each finished method leaves a cell in ``benchmarks/.peer-cells/`` (committed, for plots), and the
table of every cell goes to the log (section ``peers``).

    python benchmarks/peers.py [--only llmc_gptq_w4g64 torchao_int4g64] [--skip-install]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import protocol
from results_md import write_section

HERE = Path(__file__).resolve().parent
CELLS = HERE / ".peer-cells"
WORKER = HERE / "peers_llmcompressor.py"
PEER_PACKAGES = ("torch==2.13.0", "llmcompressor==0.14.0.1")  # the CPU torch first: no CUDA wheels
TARGETS, IGNORE = ["Linear"], ["lm_head"]  # zsfw's recipes' targets
FORMAT_SCALE_BITS = 16  # llm-compressor keeps scales in the model's dtype: bf16 for a bf16 checkpoint


@dataclass(frozen=True)
class Peer:
    """One row: who quantizes, how (``algorithm``), ``bits`` per weight, one scale per ``group``
    weights of a row (0: per output channel)."""

    library: str
    algorithm: str
    bits: int
    group: int


PEERS = {
    "llmc_rtn_w4g64": Peer("llm-compressor", "rtn", 4, 64),
    "llmc_gptq_w4g64": Peer("llm-compressor", "gptq", 4, 64),
    "llmc_rtn_w3g64": Peer("llm-compressor", "rtn", 3, 64),
    "llmc_gptq_w3g64": Peer("llm-compressor", "gptq", 3, 64),
    "llmc_rtn_w8ch": Peer("llm-compressor", "rtn", 8, 0),
    "llmc_gptq_w8ch": Peer("llm-compressor", "gptq", 8, 0),
    "torchao_int4g64": Peer("torchao", "rtn", 4, 64),
    "torchao_int8ch": Peer("torchao", "rtn", 8, 0),
}
METHODS = ["uncompressed", *PEERS]


def peers_python(skip_install: bool) -> Path:
    """The peers' Python with llm-compressor importable, making its environment if needed."""
    from zsfw._fs import cache_dir

    venv = cache_dir() / "peers-venv"
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llmcompressor"],
                                          capture_output=True).returncode == 0:
        return python
    if skip_install:
        raise SystemExit(f"--skip-install: the peers' environment {venv} has no llmcompressor; "
                         f"run once without --skip-install to make it")
    steps = [[sys.executable, "-m", "venv", str(venv)],
             *([str(python), "-m", "pip", "install", "--quiet", package] for package in PEER_PACKAGES)]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise SystemExit(f"could not make the peers' environment {venv}: `{' '.join(step[-3:])}` "
                             f"failed ({reason}); llm-compressor needs PyPI reachable once")
    return python


def format_bits(shapes: list[tuple[int, int]], bits: int, group: int, side_bits: int) -> float:
    """Bits per weight of ``shapes`` (out × in) stored as packed ``bits``-bit integers plus
    ``side_bits`` (scale and zero point) per ``group`` weights of a row (0: per row)."""
    weights = sum(o * i for o, i in shapes)
    sides = sum(o * (math.ceil(i / group) if group else 1) for o, i in shapes)
    return (weights * bits + sides * side_bits) / weights


def llmcompressor_weights(peer: Peer, windows: protocol.Windows, python: Path) -> tuple[dict, dict]:
    """llm-compressor's weights for ``peer`` (target name → fp32) and its worker's cell."""
    from safetensors.torch import load_file, save_file

    from zsfw.sources import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "calibration.safetensors"
        save_file({"ids": windows.calibration.contiguous()}, str(ids))
        subprocess.run([python, WORKER, "--model", str(default_model_path()), "--calibration", str(ids),
                        "--algorithm", peer.algorithm, "--bits", str(peer.bits), "--group", str(peer.group),
                        "--out", tmp], check=True)
        return load_file(str(Path(tmp) / "weights.safetensors")), json.loads((Path(tmp) / "cell.json").read_text())


def torchao_weights(peer: Peer) -> tuple[dict, dict]:
    """torchao's weights for ``peer`` (target name → fp32, dequantized by torchao) and a cell: the
    seconds ``quantize_`` took and the bytes of the tensors torchao keeps for each layer."""
    import torch
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, PerRow, quantize_

    from zsfw.compression.targets import find_targets

    logging.getLogger("torchao").setLevel(logging.ERROR)
    model, _ = protocol.load_default_model()
    names = set(find_targets(model, TARGETS, IGNORE))
    config = (IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(peer.group)) if peer.group
              else Int8WeightOnlyConfig(granularity=PerRow(), version=2, set_inductor_config=False))
    start = time.perf_counter()
    quantize_(model, config, filter_fn=lambda module, fqn: fqn in names)
    seconds = time.perf_counter() - start
    weights, stored, kinds = {}, {}, set()
    for name in sorted(names):
        weight = model.get_submodule(name).weight
        inner, _ = weight.__tensor_flatten__()
        stored[name] = sum(getattr(weight, n).numel() * getattr(weight, n).element_size() for n in inner)
        kinds.add(f"{type(weight).__name__}({', '.join(f'{n}: {getattr(weight, n).dtype}' for n in inner)})")
        weights[name] = weight.dequantize().float().contiguous()
    return weights, {"compress_seconds": seconds, "stored_bytes": stored, "threads": torch.get_num_threads(),
                     "config": {"torchao": repr(config), "tensors": sorted(kinds)},
                     "versions": {"torchao": torchao.__version__, "torch": torch.__version__}}


def evaluated_with(weights: dict | None, windows: protocol.Windows, news) -> tuple[dict, list[tuple[int, int]]]:
    """``protocol.held_out`` of a fresh fp32 model whose targets take ``weights`` (None: as
    loaded), and the targets' shapes."""
    import torch

    from zsfw.compression.targets import find_targets

    model, _ = protocol.load_default_model()
    targets = find_targets(model, TARGETS, IGNORE)
    if weights is not None:
        if set(weights) != set(targets):
            raise SystemExit(f"the peer quantized {sorted(set(weights) ^ set(targets))[:4]}…, not exactly "
                             f"zsfw's {len(targets)} target layers")
        with torch.no_grad():
            for name, linear in targets.items():
                linear.weight.copy_(weights[name])
    shapes = [tuple(linear.weight.shape) for linear in targets.values()]
    return protocol.held_out(model, windows.validation, {"wiki": windows.evaluation, "news": news}), shapes


def run_one(method: str, windows: protocol.Windows, news, python: Path | None) -> dict:
    """The cell of ``method``: its quantization, then zsfw's figures."""
    import torch

    peer = PEERS.get(method)
    cell: dict = {"method": method, "md5": windows.md5, "threads": torch.get_num_threads()}
    weights = None
    if peer and peer.library == "llm-compressor":
        weights, worker = llmcompressor_weights(peer, windows, python)
    elif peer:
        weights, worker = torchao_weights(peer)
    figures, shapes = evaluated_with(weights, windows, news)
    reference_bytes = 2 * sum(o * i for o, i in shapes)
    cell["targets"] = len(shapes)
    if peer is None:
        cell.update(library="none", bits_per_weight=16.0, bytes_vs_bf16=1.0, stored_bytes_vs_bf16=2.0,
                    compress_seconds=0.0, config={"dtype": "float32 (bf16 = 1.0)"},
                    versions={"torch": torch.__version__})
    else:
        if peer.library == "llm-compressor":  # symmetric: no zero point; scales in the model's dtype
            side, basis = FORMAT_SCALE_BITS, "packed ints + a bf16 scale per group (a bf16 model's checkpoint)"
        else:  # only the ints packed: torchao's fp32 scale and int8 zero point as it keeps them
            side, basis = 32 + 8, "ints bit-packed + torchao's fp32 scale and int8 zero point per group"
        bits = format_bits(shapes, peer.bits, peer.group, side)
        stored = sum(worker.pop("stored_bytes").values())
        cell.update(library=peer.library, algorithm=peer.algorithm, weight_bits=peer.bits, group=peer.group,
                    bits_per_weight=bits, bytes_vs_bf16=bits / 16, bytes_basis=basis,
                    stored_bytes_vs_bf16=stored / reference_bytes, **worker)
    cell.update(wiki=figures["wiki_ppl"], news=figures["news_ppl"], val_loss=figures["val_loss"],
                dropped_windows=figures["dropped_windows"], seconds=cell["compress_seconds"])
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, default=protocol.DEFAULT_REFERENCE_TEXT,
                        help="the reference wiki.txt (default: ../shared/anchor/wiki.txt)")
    parser.add_argument("--only", nargs="+", choices=METHODS, default=METHODS, help="methods to run")
    parser.add_argument("--skip-install", action="store_true",
                        help="never make the peers' environment: fail if it is not there")
    args = parser.parse_args()
    python = (peers_python(args.skip_install)
              if any(PEERS.get(m) and PEERS[m].library == "llm-compressor" for m in args.only) else None)
    _, tokenizer = protocol.load_default_model()
    windows = protocol.reference_windows(tokenizer, args.text)
    news = protocol.news_windows(tokenizer)
    CELLS.mkdir(exist_ok=True)
    for method in args.only:
        cell = run_one(method, windows, news, python)
        (CELLS / f"{method}.json").write_text(json.dumps(cell, indent=1))
        print(f"{method}: wiki {cell['wiki']:.2f}, news {cell['news']:.2f}, {cell['seconds']:.0f} s", flush=True)
    cells = [json.loads((CELLS / f"{m}.json").read_text()) for m in METHODS if (CELLS / f"{m}.json").exists()]
    write_section("peers", _table(cells))


def _table(cells: list[dict]) -> str:
    versions = {k: v for c in cells for k, v in c["versions"].items()}
    lines = ["## Peers on the reference protocol",
             "",
             f"Command: `python {' '.join(['benchmarks/peers.py', *sys.argv[1:]])}`. "
             f"Machine: {protocol.machine_line()}. "
             f"Versions: {', '.join(f'{k} {v}' for k, v in sorted(versions.items()))} "
             "(llm-compressor in its own environment).",
             f"Tokens: `shared/anchor` (calibration ids md5 {cells[0]['md5']}, the 32×512 windows zsfw "
             f"calibrates on), SmolLM2-135M-Instruct fp32, targets its {cells[0]['targets']} decoder linear "
             "layers; wiki PPL on the last 8×2048 reference tokens, news PPL on the first 8×2048 news "
             "tokens, both by zsfw's code on the peer's dequantized weights.",
             "",
             "llm-compressor: `oneshot`, symmetric int weights (`QuantizationArgs(num_bits=N, "
             "type='int', symmetric=True, strategy='group', group_size=64)`, or `strategy='channel'`), "
             "no activation quantization, `ignore=['lm_head']`; GPTQ with its defaults (block 128, "
             "dampening 0.01, static activation order), RTN = `QuantizationModifier` (min-max). "
             "torchao: `IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64))`, "
             "`Int8WeightOnlyConfig(granularity=PerRow())`.",
             "",
             "`bytes vs bf16`: the format's cost over the targets against 16 bits per weight, ints "
             "bit-packed; llm-compressor: + a 16-bit scale per group or row (its checkpoint of a bf16 "
             "model: scales in the model's dtype, no zero point); torchao: + its fp32 scale and int8 "
             "zero point per group or row. `stored here`: the bytes the library actually holds for "
             "the targets in this fp32 run (llm-compressor: its compressed checkpoint, ints in int32 "
             "words, fp32 scales; torchao: its tensors, int4 unpacked to one int8 each). `compress s`: "
             "`oneshot` / `quantize_` alone, model loaded.",
             "",
             "| method | bits / weight | bytes vs bf16 | stored here | wiki PPL | news PPL | compress s |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['method']} | {c['bits_per_weight']:.3f} | {c['bytes_vs_bf16']:.4f} | "
                     f"{c['stored_bytes_vs_bf16']:.4f} | {c['wiki']:.2f} | {c['news']:.2f} | {c['seconds']:.0f} |")
    fallbacks = {c["method"]: len(c["rtn_fallback_layers"]) for c in cells if c.get("rtn_fallback_layers")}
    if fallbacks:
        lines += ["", f"GPTQ fell back to round-to-nearest on some layers: {fallbacks}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
