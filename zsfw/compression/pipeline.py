"""``compress``: the pipeline's steps in order, each in its own module of ``zsfw.compression``.

recipe → targets → calibration windows → stages → statistics (driver) → factorize + score
(factor store, cached) → allocate → truncate → correct → report → config → save.

Memory stays bounded: the driver hands over one input group's statistics at a time, the
factorize step drops them once the group's SVDs and scores are done, and the SVD factors wait on
disk in the factor store until the plan says which of them to keep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsfw import plugins
from zsfw.allocation import AllocationPlan
from zsfw.checkpoint.destination import check_destination
from zsfw.checkpoint.save import expected_bytes, save
from zsfw.checkpoint.hf_quantizer import ZsfwConfig
from zsfw.checkpoint.schema import ModuleRecord
from zsfw.compression.allocate import allocate
from zsfw.compression.cache import open_cache
from zsfw.compression.calibration import DatasetLike, coverage_warnings, windows_for
from zsfw.compression.correct import Correction, correct
from zsfw.compression.streaming import driver_for
from zsfw.compression.factorize import factor_store
from zsfw.compression.report import Report
from zsfw.compression.stages import run_stages
from zsfw.compression.targets import find_targets
from zsfw.compression.truncate import truncate
from zsfw.recipe import RecipeLike, load_recipe

log = logging.getLogger(__name__)


def compress(model: nn.Module, recipe: RecipeLike = None, dataset: DatasetLike | torch.Tensor | None = None,
             output_dir: str | Path | None = None, tokenizer: Any = None, overwrite: bool = False,
             statistics_cache: str | Path | None = None) -> tuple[nn.Module, Report]:
    """Compress ``model`` in place as ``recipe`` says, calibrating on ``dataset`` (text, read with
    ``tokenizer`` or the model's own, or a windows × tokens tensor of ids); returns it and a report.
    With ``output_dir`` it is saved there (an existing folder only with ``overwrite``); with
    ``statistics_cache`` statistics and factorizations are reused when model, data and settings match.
    """
    recipe = load_recipe(recipe)
    m = recipe.modifier
    targets = find_targets(model, m.targets, m.ignore)
    if output_dir is not None:
        check_destination(output_dir, overwrite, [getattr(model, "name_or_path", "")],
                          expected_bytes(model, targets, m.ratio))
    scorer, allocator, storage = (plugins.create(kind, spec.name, spec.options) for kind, spec in
                                  (("scorer", m.scorer), ("allocator", m.allocator), ("storage", m.storage)))
    corrector = m.corrector and plugins.create("corrector", m.corrector.name, m.corrector.options)
    report = Report(recipe=recipe.to_dict())
    with report.phase("calibration data"):
        windows = windows_for(model, dataset, tokenizer, m.calibration)
        report.warnings += coverage_warnings(targets, windows)
    if m.stages:
        with report.phase("stages"):
            report.stages = run_stages(m.stages, model, targets, windows)
    driver = driver_for(m.execution, model, windows, m.calibration)
    store = factor_store(model, targets, windows, m, scorer, driver, open_cache(statistics_cache), report)
    try:
        report.calibration_tokens, report.calibration_loss = store.tokens, store.loss
        with report.phase("allocate"):
            plan = allocate(allocator, m.allocator.name, m.ratio, storage, store, targets, driver)
        correction = corrector and Correction(model, targets, plan, store, driver)
        with report.phase("truncate"):
            truncate(model, targets, plan, store, storage, correction)
        if corrector:
            with report.phase("correct"):
                report.correction_losses = correct(corrector, correction, storage)
        report.record_plan(plan, store.notes)
    finally:
        store.close()
    model.config.quantization_config = ZsfwConfig.build(m.storage.model_dump(), _records(plan, m.storage.name))
    if output_dir is not None:
        with report.phase("save"):
            save(model, output_dir, tokenizer or _own_tokenizer(model), recipe, report, overwrite)
    return model, report


def _records(plan: AllocationPlan, storage: str) -> dict[str, ModuleRecord]:
    return {name: ModuleRecord(storage, l.out_features, l.in_features,
                               None if plan.is_dense(name) else plan.rank(name), l.has_bias)
            for name, l in plan.layers.items()}


def _own_tokenizer(model: nn.Module) -> Any:
    from transformers import AutoTokenizer

    if not model.name_or_path:
        log.info("saving without a tokenizer: pass tokenizer= to include one")
        return None
    try:
        return AutoTokenizer.from_pretrained(model.name_or_path)
    except (OSError, ValueError) as e:
        log.warning("saving without a tokenizer: none found at %r (%s)", model.name_or_path, e)
        return None
