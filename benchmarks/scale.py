"""Compressing a model larger than we want in memory: a ≈1.1B-parameter Llama-shaped checkpoint
(TinyLlama's shape, random weights: memory and time do not depend on the values) compressed with
``execution: {driver: streamed, weights: lazy, offload: disk}``.

The checkpoint is written tensor by tensor (never a whole model in memory), fp32, in 1 GiB
shards. The compression runs in its own process so its peak RSS is its own; the target is a peak
RSS of at most half the fp32 weights, proof that they are never all resident.

    python benchmarks/scale.py                 # writes the checkpoint once, runs, writes its log section
    python benchmarks/scale.py --samples 8     # more calibration windows (time grows, memory does not)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import protocol
from results_md import write_section

SHAPE = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=False)
"""TinyLlama-1.1B's shape."""


def checkpoint_folder() -> Path:
    from zsfw.sources import cache_dir

    return cache_dir() / "bench" / "llama-1.1b-random"


def write_checkpoint(folder: Path, shape: dict | None = None, dtype: str = "float32", seed: int = 0,
                     shard_bytes: int = 1024**3, device: str = "cpu") -> None:
    """A random-weight Llama checkpoint of ``shape`` (default ``SHAPE``) in ``dtype``, one tensor
    in memory at a time (drawn on ``device``)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (folder / "config.json").is_file():
        return
    shape = shape or SHAPE
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llama-", dir=folder.parent))
    shapes = _shapes(shape)
    size_of = getattr(torch, dtype).itemsize
    g = torch.Generator(device).manual_seed(seed)
    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for key, tensor_shape in shapes.items():
        nbytes = size_of * tensor_shape.numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor_shape
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.ones(s) if "norm" in k else torch.randn(s, generator=g, device=device) * 0.02
                       ).to(getattr(torch, dtype)).cpu() for k, s in shard.items()}
        save_file(tensors, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size_of * sum(s.numel() for s in shapes.values())}, "weight_map": weight_map}))
    LlamaConfig(**shape, dtype=dtype).save_pretrained(tmp)
    tmp.rename(folder)


def run_one(folder: Path, samples: int, length: int, out: Path) -> dict:
    """Compress the checkpoint lazily in this process; the cell with times and memory."""
    import torch

    import zsfw
    from zsfw.compression.report import peak_rss_mb
    from zsfw.memory import return_large_frees_to_the_os
    from zsfw.residency import lazy_model

    return_large_frees_to_the_os()  # as the CLI does
    start = time.perf_counter()
    model = lazy_model(folder)
    load_seconds = time.perf_counter() - start
    rss_loaded = peak_rss_mb()
    windows = torch.randint(0, SHAPE["vocab_size"], (samples, length), generator=torch.Generator().manual_seed(0))
    recipe = {"scale": {"modifiers": {"ZeroSumSVDModifier": {
        "ratio": 0.8, "storage": "bf16",
        "calibration": {"samples": samples, "sequence_length": length},
        "execution": {"driver": "streamed", "weights": "lazy", "offload": "disk"}}}}}
    start = time.perf_counter()
    _, report = zsfw.compress(model, recipe, windows, output_dir=out, overwrite=True)
    weights = sum(4 * s.numel() for s in _shapes().values())
    return {"compress_seconds": time.perf_counter() - start, "load_seconds": load_seconds,
            "phases": report.timings, "peak_rss_mb": peak_rss_mb(), "rss_after_lazy_load_mb": rss_loaded,
            "fp32_weights_mb": weights / 2**20, "threads": torch.get_num_threads(),
            "kept": report.total_bytes / report.reference_bytes, "samples": samples, "length": length,
            "written_mb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20}


def _shapes(shape: dict | None = None) -> dict:
    """Tensor name → shape of a Llama of ``shape`` (default ``SHAPE``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        config = LlamaConfig(**(shape or SHAPE))
        return {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="calibration windows")
    parser.add_argument("--length", type=int, default=512, help="tokens per window")
    parser.add_argument("--cell", type=Path, help=argparse.SUPPRESS)  # internal: run, write the cell here
    args = parser.parse_args()
    folder = checkpoint_folder()
    if args.cell:
        out = Path(tempfile.mkdtemp(prefix="scale-out-"))
        try:
            args.cell.write_text(json.dumps(run_one(folder, args.samples, args.length, out / "model"), indent=1))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    write_checkpoint(folder)
    cell_file = Path(tempfile.mkstemp(suffix=".json")[1])
    subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--length", str(args.length),
                    "--cell", str(cell_file)], check=True)
    cell = json.loads(cell_file.read_text())
    cell_file.unlink()
    write_section("scale", _table(cell))
    print(json.dumps(cell, indent=1))


def _table(c: dict) -> str:
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in c["phases"].items())
    verdict = "met" if c["peak_rss_mb"] <= 0.5 * c["fp32_weights_mb"] else "missed"
    return "\n".join([
        "## Scale: a 1.1B-parameter model compressed one layer at a time",
        "",
        f"Command: `python benchmarks/scale.py --samples {c['samples']}`. Machine: {protocol.machine_line()}.",
        f"TinyLlama-1.1B-shaped Llama, random fp32 weights ({c['fp32_weights_mb']:.0f} MB in 1 GiB "
        f"safetensors shards), zero_sum at ratio 0.8 (bf16 factors), {c['samples']}×{c['length']} random "
        "calibration tokens, `execution: {driver: streamed, weights: lazy, offload: disk}`.",
        "",
        "| peak RSS MB | ÷ fp32 weights | target ≤ 0.5 | RSS after lazy load MB | compress s | written MB | kept bytes |",
        "|---|---|---|---|---|---|---|",
        f"| {c['peak_rss_mb']:.0f} | {c['peak_rss_mb'] / c['fp32_weights_mb']:.2f} | {verdict} | "
        f"{c['rss_after_lazy_load_mb']:.0f} | {c['compress_seconds']:.0f} | {c['written_mb']:.0f} | {c['kept']:.3f} |",
        "",
        f"Phases: {phases}.",
    ])


if __name__ == "__main__":
    main()
