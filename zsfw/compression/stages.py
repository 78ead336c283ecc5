"""Pre-compression stages: plugins that change the model before the statistics pass.

They run in recipe order on the model, its target layers and the calibration windows (Low-Rank
Prehab is one); a stage that declares ``needs_training = True`` also gets ``training=``, windows
held out from calibration and validation, and ``validation=``, the windows it may judge its steps on
(None when the run has none). Their names and options enter the cache keys; their
summaries go to the report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsfw import plugins
from zsfw.recipe import PluginSpec


def run_stages(specs: list[PluginSpec], model: nn.Module, targets: dict[str, nn.Linear],
               windows: torch.Tensor, training: torch.Tensor | None = None,
               validation: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Apply each stage; returns per stage its name, options and summary."""
    done = []
    for spec in specs:
        stage = plugins.create("stage", spec.name, spec.options)
        extra = ({"training": training, "validation": validation} if getattr(stage, "needs_training", False)
                 else {})
        summary = stage.apply(model, targets, windows, **extra)
        done.append({"name": spec.name, "options": spec.options, "summary": summary or {}})
    return done
