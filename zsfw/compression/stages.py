"""Pre-compression stages: plugins that change the model before the statistics pass.

They run in recipe order on the model, its target layers and the calibration windows (Low-Rank
Prehab is one); a stage that declares ``needs_training = True`` also gets ``training=``, windows
held out from calibration and validation, and ``validation=``, the windows it may judge its steps on
(None when the run has none). Their names and options enter the cache keys; their
summaries go to the report. With a cache, a stage's result (the weights after it and its summary)
is stored, and a later run with the same weights, stage options and windows loads it instead of
running the stage again (``"cached": true`` in its report entry).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsfw import plugins
from zsfw.compression.cache import StatisticsCache, stage_key
from zsfw.recipe import PluginSpec


def run_stages(specs: list[PluginSpec], model: nn.Module, targets: dict[str, nn.Linear],
               windows: torch.Tensor, training: torch.Tensor | None = None,
               validation: torch.Tensor | None = None, cache: StatisticsCache | None = None
               ) -> list[dict[str, Any]]:
    """Apply each stage (or load its cached result); returns per stage its name, options and summary."""
    done = []
    for spec in specs:
        stage = plugins.create("stage", spec.name, spec.options)
        trains = getattr(stage, "needs_training", False)
        extra = {"training": training, "validation": validation} if trains else {}
        key = cache and stage_key(model, spec.model_dump(), list(targets),
                                  [windows, training, validation] if trains else [windows])
        summary = cache and cache.stage(key, model)
        cached = summary is not None
        if not cached:
            summary = stage.apply(model, targets, windows, **extra) or {}
            if cache:
                cache.record_stage(key, model, summary)
        done.append({"name": spec.name, "options": spec.options, "summary": summary}
                    | ({"cached": True} if cached else {}))
    return done
