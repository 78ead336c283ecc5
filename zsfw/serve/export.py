"""A compressed model as an AOTInductor package (``.pt2``) that runs without zsfw or transformers.

What is exported: the forward ``input_ids (batch × seq, int64) -> logits (batch × seq × vocab)``
over the whole sequence, with dynamic batch (1..``max_batch``) and sequence length
(2..``max_sequence``), no KV cache. One package serves any prompt length without recompiling;
a generation loop over it recomputes the prefix each step (use ``zsfw.generate`` for cached
decoding in Python). Every shipped storage format exports as it is: torchao int8/fp8 weights
are traced into plain aten ops, the packed format's unpacked factors are constants.

Next to ``model.pt2`` go ``model.json`` (a manifest: shapes, dtypes, ranges, the storage
format), ``model.tokenizer/`` (the tokenizer, when given) and ``model_runner.py``, a standalone
loader that checks inputs against the manifest before running the package (see ``pt2_runner``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsfw._fs import atomic_file
from zsfw.checkpoint.schema import zsfw_config
from zsfw.errors import ServingError

MANIFEST_VERSION = 1


class _Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export(model: nn.Module, out: str | Path, tokenizer: Any = None, max_sequence: int = 2048,
           max_batch: int = 64) -> Path:
    """Export ``model``'s forward to the package ``out`` (``.pt2``), atomically."""
    out = Path(out)
    if out.suffix != ".pt2":
        raise ServingError(f"the package name must end in .pt2, got {str(out)!r}")
    if max_sequence < 3:
        raise ServingError(f"max_sequence must be at least 3, got {max_sequence}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(2, min(16, max_sequence), dtype=torch.long,
                          device=next(model.parameters()).device)
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=max_batch),
                          1: torch.export.Dim("seq", min=2, max=max_sequence)}}
    with torch.no_grad():
        program = torch.export.export(_Logits(model), (example,), dynamic_shapes=dims)
        with atomic_file(out, suffix=".pt2") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecation notes, not the user's
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        logits = _Logits(model)(example)
    config = getattr(model, "config", None)
    compressed = zsfw_config(config)
    storage = None if compressed is None else compressed.storage
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "package": out.name,
        "inputs": {"input_ids": {"dtype": "int64", "shape": ["batch", "seq"],
                                 "batch": [1, max_batch], "seq": list(_range(program, example, 1)),
                                 "compiled_batch": list(_range(program, example, 0))}},
        "outputs": {"logits": {"dtype": str(logits.dtype).removeprefix("torch."),
                               "shape": ["batch", "seq", logits.shape[-1]]}},
        "kv_cache": False,
        "model_type": getattr(config, "model_type", None),
        "storage": storage,
        "torch": torch.__version__,
        "tokenizer": None,
    }
    if tokenizer is not None:
        tokenizer.save_pretrained(out.with_suffix(".tokenizer"))
        manifest["tokenizer"] = out.with_suffix(".tokenizer").name
    out.with_suffix(".json").write_text(json.dumps(manifest, indent=2))
    shutil.copyfile(Path(__file__).with_name("pt2_runner.py"), out.with_name(f"{out.stem}_runner.py"))
    return out


def _range(program, example: torch.Tensor, dim: int) -> tuple[int, int]:
    """The sizes the compiled package accepts along ``dim`` of its input, from the exported
    program's own range constraints."""
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    size = node.meta["val"].shape[dim]
    found = program.range_constraints.get(getattr(size, "node", None) and size.node.expr)
    if found is None:
        return example.shape[dim], example.shape[dim]
    # a dynamic size is compiled as ≥ 2 (0 and 1 would specialize): the runtime guard says so
    return max(2, int(found.lower)), int(found.upper)

