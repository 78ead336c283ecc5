"""Pre-compression stages: plugins that change the model before the statistics pass.

They run in recipe order on the model, its target layers and the calibration windows (Low-Rank
Prehab is one). Their names and options enter the cache keys; their summaries go to the report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsfw import plugins
from zsfw.recipe import PluginSpec


def run_stages(specs: list[PluginSpec], model: nn.Module, targets: dict[str, nn.Linear],
               windows: torch.Tensor) -> list[dict[str, Any]]:
    """Apply each stage; returns per stage its name, options and summary."""
    done = []
    for spec in specs:
        summary = plugins.create("stage", spec.name, spec.options).apply(model, targets, windows)
        done.append({"name": spec.name, "options": spec.options, "summary": summary or {}})
    return done
