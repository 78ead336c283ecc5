"""Pre-compression stages: plugins that change the model before the statistics pass.

They run in recipe order on the model, its target layers and the calibration windows (Low-Rank
Prehab is one); a stage that declares ``needs_training = True`` also gets ``training=``, windows
held out from calibration and validation, and ``validation=``, the windows it may judge its steps on
(None when the run has none). A stage that declares ``needs_plan = True`` also gets ``plan=``,
the ``AllocationPlan`` the recipe's own scorer, allocator, storage and ratio make of the model as
the stage finds it (what compression would keep if it ran now; Prehab aims at those ranks), and
``whiteners=``, each target's whitening factor S that plan was made with ({} without whitening). Their
names and options (and, for a stage given a plan, the settings that make it) enter the cache keys; their
summaries go to the report. With a cache, a stage's result (the weights after it and its summary)
is stored, and a later run with the same weights, stage options and windows loads it instead of
running the stage again (``"cached": true`` in its report entry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zsfw import plugins
from zsfw.capabilities import check_stage_plan, needs
from zsfw.compression.cache import CompressionCache, stage_key
from zsfw.recipe import PluginSpec

if TYPE_CHECKING:
    from zsfw.compression.plan import Planner


def run_stages(specs: list[PluginSpec], model: nn.Module, targets: dict[str, nn.Linear],
               windows: torch.Tensor, training: torch.Tensor | None = None,
               validation: torch.Tensor | None = None, cache: CompressionCache | None = None,
               planner: Planner | None = None) -> list[dict[str, Any]]:
    """Apply each stage (or load its cached result); returns per stage its name, options and summary.
    A stage that needs a plan gets ``planner.for_stage()`` of the model before it (only when it
    runs): ``plan=`` and ``whiteners=``."""
    done = []
    for spec in specs:
        stage = plugins.create("stage", spec.name, spec.options)
        check_stage_plan(spec, planner is not None)
        declared = needs("stage", spec)
        trains, plans = declared.needs_training, declared.needs_plan
        extra = {"training": training, "validation": validation} if trains else {}
        key = cache and stage_key(model, spec.model_dump() | ({"plan": planner.settings} if plans else {}),
                                  list(targets), [windows, training, validation] if trains else [windows])
        summary = cache and cache.stage(key, model)
        cached = summary is not None
        if not cached:
            if plans:
                extra["plan"], extra["whiteners"] = planner.for_stage()
            summary = stage.apply(model, targets, windows, **extra) or {}
            if cache:
                cache.record_stage(key, model, summary)
        done.append({"name": spec.name, "options": spec.options, "summary": summary}
                    | ({"cached": True} if cached else {}))
    return done
