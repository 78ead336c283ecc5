"""llm-compressor's side of ``peers.py``: one ``oneshot`` run, in the peers' own virtual environment.

Never imported by zsfw nor run in its environment: ``peers.py`` starts it with the peers' Python.
It loads the checkpoint in fp32, calibrates on the exact windows ``peers.py`` saved (fed as they
are: no shuffle, no BOS, no truncation), and writes into ``--out``:

- ``weights.safetensors``: each quantized layer's weight as llm-compressor's own ``fake_quantize``
  gives it (its integers × its scales), in fp32, for ``peers.py`` to evaluate with zsfw's code;
- ``cell.json``: the seconds ``oneshot`` took, the quantization arguments, the bytes of each
  layer's tensors in the compressed checkpoint llm-compressor writes (``save_compressed``), the
  versions, and the layers where GPTQ fell back to round-to-nearest.

    python peers_llmcompressor.py --model DIR --calibration ids.safetensors --algorithm gptq \
        --bits 4 --group 64 --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def modifier(algorithm: str, bits: int, group: int):
    """The recipe: symmetric int weights, activations untouched (W{bits}A16 with group ``group``,
    or one scale per output channel when ``group`` is 0), every Linear but ``lm_head``;
    GPTQ with its defaults (block 128, dampening 0.01, static activation order)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, dynamic=False,
                               strategy="group" if group else "channel", group_size=group or None)
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    kind = {"gptq": GPTQModifier, "rtn": QuantizationModifier}[algorithm]
    return kind(config_groups=groups, ignore=["lm_head"])


def dequantized(model) -> dict[str, torch.Tensor]:
    """Every quantized layer's weight on llm-compressor's grid, fp32; checks each is on it (GPTQ
    leaves its rounded weights in place: quantizing them again must not move them)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or scheme.weights is None:
            continue
        zero_point = getattr(module, "weight_zero_point", None)
        weight = fake_quantize(module.weight, module.weight_scale, zero_point, scheme.weights)
        again = fake_quantize(weight, module.weight_scale, zero_point, scheme.weights)
        if not torch.equal(weight, again):
            raise SystemExit(f"{name}: llm-compressor's weights are not on its own grid")
        out[name] = weight.detach().float().contiguous()
    return out


def stored_bytes(checkpoint: Path, layers: list[str]) -> dict[str, int]:
    """Bytes of each layer's tensors (``<layer>.*``) in the compressed checkpoint."""
    sizes = dict.fromkeys(layers, 0)
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                layer = key.rsplit(".", 1)[0]
                if layer in sizes:
                    tensor = f.get_tensor(key)
                    sizes[layer] += tensor.numel() * tensor.element_size()
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face checkpoint folder")
    parser.add_argument("--calibration", type=Path, required=True,
                        help="safetensors file with 'ids': windows × tokens, int64")
    parser.add_argument("--algorithm", choices=["gptq", "rtn"], required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group", type=int, required=True, help="group size; 0: per output channel")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot

    torch.manual_seed(0)
    ids = load_file(args.calibration)["ids"].to(torch.int64)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = modifier(args.algorithm, args.bits, args.group)
    start = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0],
            shuffle_calibration_samples=False, max_seq_length=ids.shape[1], batch_size=1)
    seconds = time.perf_counter() - start
    weights = dequantized(model)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "weights.safetensors"))
    scheme = next(m.quantization_scheme for m in model.modules() if getattr(m, "quantization_scheme", None))
    scale_dtype = str(next(m.weight_scale.dtype for m in model.modules() if hasattr(m, "weight_scale")))
    config = {"modifier": type(recipe).__name__, "weights": scheme.weights.model_dump(mode="json"),
              "ignore": ["lm_head"], "scale_dtype": scale_dtype,
              **({"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                  "actorder": str(scheme.weights.actorder)} if args.algorithm == "gptq" else {})}
    fallback = list(getattr(recipe, "_rtn_fallback_module_names", []) or [])
    checkpoint = args.out / "checkpoint"
    model.save_pretrained(checkpoint, save_compressed=True)
    cell = {"compress_seconds": seconds, "config": config, "rtn_fallback_layers": fallback,
            "stored_bytes": stored_bytes(checkpoint, list(weights)), "threads": torch.get_num_threads(),
            "versions": {"llmcompressor": llmcompressor.__version__,
                         "compressed_tensors": compressed_tensors.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__}}
    (args.out / "cell.json").write_text(json.dumps(cell, indent=1))


if __name__ == "__main__":
    main()
