"""Which modules a recipe compresses.

A pattern is a class name (``Linear``) or an exact module name (``lm_head``), or ``re:`` and a
regex that must match the whole module name (``re:.*self_attn\\.[qkv]_proj``). The model's input
and output embeddings are never targets.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from zsfw.errors import NonFiniteError, TargetError


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name or pattern == type(module).__name__


def find_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules matched by ``targets`` and not by ``ignore``, by name."""
    embeddings = {id(m) for m in (_embedding(model, "get_input_embeddings"),
                                  _embedding(model, "get_output_embeddings")) if m is not None}
    used = {p: False for p in targets}
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        hits = [p for p in targets if _matches(p, name, module)]
        if not hits:
            continue
        for p in hits:
            used[p] = True
        if id(module) in embeddings or any(_matches(p, name, module) for p in ignore):
            continue
        if not isinstance(module, nn.Linear):
            raise TargetError(f"target {name!r} (matched by {hits[0]!r}) is a "
                              f"{type(module).__name__}, not a torch.nn.Linear; only linear "
                              f"layers can be factorized")
        for param_name, param in module.named_parameters(prefix=name):
            if not param.is_meta and not torch.isfinite(param).all():  # lazy layers: checked on load
                raise NonFiniteError(f"parameter {param_name!r} holds NaN or Inf values; the model's "
                                     f"weights are broken (re-load or re-convert the checkpoint)")
        found[name] = module
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        raise TargetError(f"target pattern(s) {unused} match no module of "
                          f"{type(model).__name__}; module names look like "
                          f"{_sample_names(model)}")
    if not found:
        raise TargetError(f"targets {targets} minus ignore {ignore} leave no linear layer to "
                          f"compress in {type(model).__name__}")
    return found


def _embedding(model: nn.Module, getter: str) -> nn.Module | None:
    fn = getattr(model, getter, None)
    try:
        return fn() if callable(fn) else None
    except NotImplementedError:
        return None


def _sample_names(model: nn.Module, count: int = 5) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:count]
