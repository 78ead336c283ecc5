"""``compress``: the pipeline's steps in order, each in its own module of ``zsfw.compression``.

recipe → targets → calibration windows → stages → statistics (driver) → factorize + score
(factor store, cached) → allocate → truncate → correct → report → config → save. After truncation
and after correction the model's output on one calibration window must be finite (``finite``),
or nothing is saved.

Memory stays bounded: the driver hands over one input group's statistics at a time, the
factorize step drops them once the group's SVDs and scores are done, and the SVD factors wait on
disk in the factor store until the plan says which of them to keep.

Arguments of ``compress``: it compresses ``model`` in place as ``recipe`` says, calibrating on
``dataset`` (text, read with ``tokenizer`` or the model's own, or a windows × tokens tensor of ids);
returns it and a report. With ``output_dir`` it is saved there (an existing folder only with
``overwrite``; a folder that another program makes there meanwhile is left alone, the model kept
beside it); with ``statistics_cache`` stages' results, statistics and factorizations are reused when
model, data and settings match. A corrector judges its steps on ``validation`` (windows × tokens ids
held out from the calibration text), by default ``calibration.validation_samples`` windows drawn
from ``dataset``'s text apart from the calibration windows. A training stage (prehab), or a
corrector set to train on them (``refine`` with ``windows: training``), learns from ``training``
windows, by default ``calibration.training_samples`` drawn apart from both. A compressed model whose
output on a calibration window is NaN or Inf (after truncation or after correction) is a
``NonFiniteError`` naming the first module that outputs it, and is not saved; ``allow_non_finite``
keeps (and saves) it with a warning in the report instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zsfw import capabilities, plugins
from zsfw.budget import AllocationPlan
from zsfw.checkpoint.destination import check_destination
from zsfw.checkpoint import save
from zsfw.checkpoint.save import CheckpointWriter, expected_bytes, tokenizer_bytes
from zsfw.checkpoint.schema import ZsfwConfig, zsfw_config
from zsfw.checkpoint.schema import ModuleRecord
from zsfw.compression.allocate import chooses_formats
from zsfw.compression.cache import open_cache
from zsfw.compression.calibration import DatasetLike, coverage_warnings, token_ids, vocabulary, windows_for
from zsfw.compression.correct import Correction, correct
from zsfw.compression import distributed
from zsfw.compression.driver import driver_for, gradient_share
from zsfw.compression.feedback import Feedback
from zsfw.compression.finite import FiniteCheck
from zsfw.compression.plan import Planner
from zsfw.compression.report import Report
from zsfw.compression.stages import run_stages
from zsfw.compression.factor_store import FactorStore, check_spill, spilling
from zsfw.compression.targets import find_targets
from zsfw.compression.truncate import truncate
from zsfw.errors import CalibrationError, ModelLoadError
from zsfw.memory import release_free_heap
from zsfw.models import own_tokenizer
from zsfw.recipe import RecipeLike, ZeroSumSVDModifier, load_recipe
from zsfw.residency import compute_device, place, residency, wanted_device

log = logging.getLogger(__name__)


def compress(model: nn.Module, recipe: RecipeLike = None, dataset: DatasetLike | torch.Tensor | None = None,
             output_dir: str | Path | None = None, tokenizer: Any = None, overwrite: bool = False,
             statistics_cache: str | Path | None = None, validation: torch.Tensor | None = None,
             training: torch.Tensor | None = None, allow_non_finite: bool = False) -> tuple[nn.Module, Report]:
    """Compress ``model`` in place as ``recipe`` says; returns it and a report (arguments: the module docstring)."""
    recipe = load_recipe(recipe)
    m = recipe.modifier
    _refuse_compressed(model)
    targets = find_targets(model, m.targets, m.ignore)
    output_dir, saved_tokenizer = _destination(model, targets, m, output_dir, overwrite, tokenizer)
    scorer, allocator, storage, corrector = _components(m)
    lazy = residency(model).lazy
    capabilities.check(m, lazy, output_dir, statistics_cache)
    _place(model, m)
    report = Report(recipe=recipe.to_dict())
    windows, validation, training = _windows(model, dataset, tokenizer, targets, m, validation, training, report)
    driver = driver_for(m.execution, model, windows, m.calibration)
    planner = Planner(model, targets, windows, m, scorer, allocator, storage, driver, validation,
                      open_cache(statistics_cache))
    if m.stages:
        with report.phase("stages"):
            report.stages = run_stages(m.stages, model, targets, windows, training, validation, planner.cache, planner)
    store = driver.gathered(planner.factorize(report, bool(corrector) or chooses_formats(storage)))
    if store is None:  # a helper process under torchrun: process 0 takes it from here
        return model, report
    writer = None  # with lazy weights, the writer that saves each layer as it is truncated
    try:
        plan = _allocate(planner, store, report)
        writer = CheckpointWriter(output_dir, overwrite, save.LAZY_MAX_SHARD_BYTES, checked=True) if lazy else None
        feedback = Feedback(driver, validation, training, windows, m.calibration.batch_size)
        correction = corrector and Correction(model, targets, plan, store, feedback, planner)
        check = FiniteCheck(model, windows[:1], allow_non_finite, report.warnings)
        with report.phase("truncate"):
            truncate(model, targets, plan, store, correction, writer, check)
        report.record_plan(*(_correct(corrector, correction, m, report, check) if corrector else (plan, store.notes)))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        store.close()
    if output_dir is not None:
        with report.phase("save"):
            save.save(model, output_dir, saved_tokenizer, recipe, report, overwrite, writer=writer, checked=True)
    return model, report


def _components(m: ZeroSumSVDModifier) -> tuple[Any, Any, Any, Any]:
    """The recipe's scorer, allocator, storage format and corrector (None without one)."""
    scorer, allocator, storage = (plugins.create(kind, spec.name, spec.options) for kind, spec in
                                  (("scorer", m.scorer), ("allocator", m.allocator), ("storage", m.storage)))
    return scorer, allocator, storage, m.corrector and plugins.create("corrector", m.corrector.name,
                                                                      m.corrector.options)


def _allocate(planner: Planner, store: FactorStore, report: Report) -> AllocationPlan:
    """The allocator's plan of ``store``, with the calibration numbers and the allocator's summary
    reported and the plan in the model's ``quantization_config``."""
    report.calibration_tokens, report.calibration_loss = store.tokens, store.loss
    with report.phase("allocate"):
        plan = planner.allocate(store)
        report.allocation = dict(getattr(planner.allocator, "summary", {}))
    planner.model.config.quantization_config = quantization_config(planner.modifier, plan)
    return plan


def _place(model: nn.Module, m: ZeroSumSVDModifier) -> None:
    """The model onto the device it computes on (``execution.device``; under torchrun a model on a
    GPU onto its process's own), when that is set."""
    device = wanted_device(m.execution.device, next(model.parameters()).device, distributed.launched())
    if device is not None:
        place(model, compute_device(device))


def _refuse_compressed(model: nn.Module) -> None:
    """Refuse a model zsfw already compressed: its factors' A/B would be targets."""
    if zsfw_config(getattr(model, "config", None)) is not None:
        raise ModelLoadError(already_compressed(getattr(model, "name_or_path", "") or type(model).__name__))


def _destination(model: nn.Module, targets: dict[str, nn.Linear], m: ZeroSumSVDModifier,
                 output_dir: str | Path | None, overwrite: bool, tokenizer: Any) -> tuple[Path | None, Any]:
    """The checked output folder (room for the weights and the tokenizer's files, measured) and the
    tokenizer saved there; (None, None) without ``output_dir``. The spill folder is probed first."""
    spill = check_spill()
    if output_dir is None:
        return None, None
    saved_tokenizer = tokenizer or own_tokenizer(model)
    with spilling("the tokenizer (saved there to measure it)"):
        needed = expected_bytes(model, targets, m.ratio) + tokenizer_bytes(saved_tokenizer, spill)
    return check_destination(output_dir, overwrite, [getattr(model, "name_or_path", "")], needed), saved_tokenizer


def _windows(model: nn.Module, dataset: Any, tokenizer: Any, targets: dict[str, nn.Linear], m: ZeroSumSVDModifier,
             validation: torch.Tensor | None, training: torch.Tensor | None, report: Report
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The calibration windows, the validation windows (those given when the run draws none) and
    the training windows (None when nothing trains on them)."""
    trains = m.training_windows
    with report.phase("calibration data"):
        drawn = windows_for(model, dataset, tokenizer, m.calibration, m.validation_windows, trains)
        report.warnings += coverage_warnings(targets, drawn.calibration)
        if m.validation_windows:
            validation = _validation(validation, drawn.validation, drawn.calibration, m, report, vocabulary(model))
        training = _training(training, drawn.training, m, vocabulary(model)) if trains else None
        release_free_heap()  # what tokenizing the text left behind is not carried through the passes
    return drawn.calibration, validation, training


def _correct(corrector: Any, correction: Correction, m: ZeroSumSVDModifier,
             report: Report, check: FiniteCheck) -> tuple[AllocationPlan, dict[str, Any]]:
    """Run the corrector on the truncated model (its output checked finite after); returns the plan
    and the factor store's notes to record (a re-plan's, whose ranks, and so quantization_config, are new)."""
    plan, notes = correction.plan, correction.store.notes
    with report.phase("correct"):
        report.correction_losses = correct(corrector, correction)
        report.correction_steps, report.correction_result = correction.history, correction.result
    check.after("correction")
    if correction.plan is not plan:
        plan, notes = correction.plan, correction.store.notes
        correction.model.config.quantization_config = quantization_config(m, plan)
    return plan, notes


def quantization_config(m: ZeroSumSVDModifier, plan: AllocationPlan) -> ZsfwConfig:
    """The ``quantization_config`` of a model compressed as ``plan`` says, in ``m``'s storage."""
    return ZsfwConfig.build(m.storage.model_dump(),
                            {name: ModuleRecord(plan.format(name).name, l.out_features, l.in_features,
                                                None if plan.is_dense(name) else plan.rank(name), l.has_bias)
                             for name, l in plan.layers.items()})


def already_compressed(model: str) -> str:
    """Why ``model``, already compressed by zsfw, is not compressed again (its low-rank factors
    would be factorized as if they were the model's layers)."""
    return (f"model {model!r} is already compressed by zsfw (its config has a zsfw "
            f"quantization_config); compressing a compressed model is not supported: compress the "
            f"original model instead, at the ratio you want")


def _validation(given: torch.Tensor | None, drawn: torch.Tensor | None, windows: torch.Tensor,
                m: ZeroSumSVDModifier, report: Report, vocab: int) -> torch.Tensor:
    """The windows a corrector (or a model-aware allocator) judges its steps on: those given, else those drawn from the text,
    else (a tensor dataset without ``validation``) the gradient windows, with a warning."""
    if given is not None:
        return token_ids(given, "validation", vocab)
    if drawn is not None:
        return drawn
    report.warnings.append("no validation windows (a tensor dataset without validation=): the "
                           "corrector judges its steps on its own gradient windows, which can overfit")
    log.warning(report.warnings[-1])
    return gradient_share(windows, m.calibration, (0, 1))


def _training(given: torch.Tensor | None, drawn: torch.Tensor | None, m: ZeroSumSVDModifier,
              vocab: int) -> torch.Tensor:
    """The windows a training stage or corrector learns from: those given, else those drawn from
    the text."""
    if given is not None:
        return token_ids(given, "training", vocab)
    if drawn is not None:
        return drawn
    trainers = [s.name for s in m.stages] + (
        [m.corrector.name] if m.corrector and capabilities.needs("corrector", m.corrector).needs_training else [])
    raise CalibrationError(f"{trainers} train on windows held out from calibration: with a tensor "
                           f"dataset pass training= (windows × tokens), or calibrate on text")
