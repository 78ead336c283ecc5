"""``compress``: the pipeline's steps in order, each in its own module of ``zsfw.compression``.

recipe → targets → calibration windows → stages → statistics (driver) → factorize + score
(factor store, cached) → allocate → truncate → correct → report → config → save. After truncation
and after correction the model's output on one calibration window must be finite (``finite``),
or nothing is saved.

Memory stays bounded: the driver hands over one input group's statistics at a time, the
factorize step drops them once the group's SVDs and scores are done, and the SVD factors wait on
disk in the factor store until the plan says which of them to keep.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from zsfw import plugins
from zsfw.allocation import AllocationPlan
from zsfw.checkpoint.destination import check_destination
from zsfw.checkpoint import save
from zsfw.checkpoint.save import CheckpointWriter, expected_bytes, tokenizer_bytes
from zsfw.checkpoint.schema import ZsfwConfig, zsfw_config
from zsfw.checkpoint.schema import ModuleRecord
from zsfw.compression.allocate import allocate, chooses_formats
from zsfw.compression.cache import StatisticsCache, open_cache
from zsfw.compression.calibration import DatasetLike, coverage_warnings, token_ids, vocabulary, windows_for
from zsfw.compression import distributed
from zsfw.compression.correct import Correction, correct
from zsfw.compression.driver import driver_for, gradient_share
from zsfw.compression.finite import FiniteCheck
from zsfw.compression.factorize import factor_store
from zsfw.compression.report import Report
from zsfw.compression.stages import Planner, run_stages
from zsfw.compression.store import FactorStore, check_spill, spilling
from zsfw.compression.targets import find_targets
from zsfw.compression.truncate import truncate
from zsfw.errors import CalibrationError, ModelLoadError, RecipeError
from zsfw.memory import release_free_heap
from zsfw.recipe import RecipeLike, ZeroSumSVDModifier, load_recipe
from zsfw.residency import compute_device, place, residency, wanted_device

log = logging.getLogger(__name__)


def compress(model: nn.Module, recipe: RecipeLike = None, dataset: DatasetLike | torch.Tensor | None = None,
             output_dir: str | Path | None = None, tokenizer: Any = None, overwrite: bool = False,
             statistics_cache: str | Path | None = None, validation: torch.Tensor | None = None,
             training: torch.Tensor | None = None, allow_non_finite: bool = False) -> tuple[nn.Module, Report]:
    """Compress ``model`` in place as ``recipe`` says, calibrating on ``dataset`` (text, read with
    ``tokenizer`` or the model's own, or a windows × tokens tensor of ids); returns it and a report.
    With ``output_dir`` it is saved there (an existing folder only with ``overwrite``; a folder
    that another program makes there meanwhile is left alone, the model kept beside it); with
    ``statistics_cache`` stages' results, statistics and factorizations are reused when model, data and
    settings match.
    A corrector judges its steps on ``validation`` (windows × tokens ids held out from the
    calibration text), by default ``calibration.validation_samples`` windows drawn from ``dataset``'s
    text apart from the calibration windows. A training stage (prehab), or a corrector set to
    train on them (``refine`` with ``windows: training``), learns from ``training`` windows, by
    default ``calibration.training_samples`` drawn apart from both.
    A compressed model whose output on a calibration window is NaN or Inf (after truncation or
    after correction) is a ``NonFiniteError`` naming the first module that outputs it, and is not
    saved; ``allow_non_finite`` keeps (and saves) it with a warning in the report instead.
    """
    recipe = load_recipe(recipe)
    m = recipe.modifier
    if zsfw_config(getattr(model, "config", None)) is not None:  # its factors' A/B would be targets
        raise ModelLoadError(already_compressed(getattr(model, "name_or_path", "") or type(model).__name__))
    targets = find_targets(model, m.targets, m.ignore)
    spill = check_spill()
    saved_tokenizer = None
    if output_dir is not None:  # room for the weights and the tokenizer's files, measured
        saved_tokenizer = tokenizer or _own_tokenizer(model)
        with spilling("the tokenizer (saved there to measure it)"):
            needed = expected_bytes(model, targets, m.ratio) + tokenizer_bytes(saved_tokenizer, spill)
        output_dir = check_destination(output_dir, overwrite, [getattr(model, "name_or_path", "")], needed)
    scorer, allocator, storage = (plugins.create(kind, spec.name, spec.options) for kind, spec in
                                  (("scorer", m.scorer), ("allocator", m.allocator), ("storage", m.storage)))
    corrector = m.corrector and plugins.create("corrector", m.corrector.name, m.corrector.options)
    lazy = residency(model).lazy
    _check_execution(m, allocator, corrector, output_dir, lazy, statistics_cache)
    device = wanted_device(m.execution.device, next(model.parameters()).device, distributed.launched())
    if device is not None:
        place(model, compute_device(device))
    report = Report(recipe=recipe.to_dict())
    trains = m.training_windows  # a property that builds the corrector to ask it: read once
    with report.phase("calibration data"):
        drawn = windows_for(model, dataset, tokenizer, m.calibration, m.validation_windows, trains)
        windows = drawn.calibration
        report.warnings += coverage_warnings(targets, windows)
        if m.validation_windows:
            validation = _validation(validation, drawn.validation, windows, m, report, vocabulary(model))
        if trains:
            training = _training(training, drawn.training, m, corrector, vocabulary(model))
        release_free_heap()  # what tokenizing the text left behind is not carried through the passes
    driver = driver_for(m.execution, model, windows, m.calibration)
    every_component = (getattr(allocator, "needs_model", False) or getattr(allocator, "keeps_any_component", False)
                       or chooses_formats(storage))  # which member format keeps the most is not known yet

    def planned(cache: StatisticsCache | None, modifier: ZeroSumSVDModifier = m) -> tuple[FactorStore, AllocationPlan]:
        """Statistics, factorization and the allocator's plan of the model as it is now."""
        again = factor_store(model, targets, windows, modifier, scorer, driver, cache, Report(recipe={}),
                             None if every_component else storage)
        try:
            return again, allocate(allocator, m.allocator.name, m.ratio, storage, again, targets, driver, validation)
        except BaseException:
            again.close()
            raise

    if m.stages:
        weight = next(iter(targets.values())).weight
        planner = _planner(planned, statistics_cache, m, weight.device,
                           torch.promote_types(weight.dtype, torch.float32))
        with report.phase("stages"):
            report.stages = run_stages(m.stages, model, targets, windows, training, validation,
                                       open_cache(statistics_cache), planner)
    store = driver.gathered(factor_store(model, targets, windows, m, scorer, driver, open_cache(statistics_cache),
                                         report, None if every_component else storage,
                                         bool(corrector) or chooses_formats(storage)))
    if store is None:  # a helper process under torchrun: process 0 takes it from here
        return model, report
    writer = None
    try:
        report.calibration_tokens, report.calibration_loss = store.tokens, store.loss
        with report.phase("allocate"):
            plan = allocate(allocator, m.allocator.name, m.ratio, storage, store, targets, driver, validation)
            report.allocation = dict(getattr(allocator, "summary", {}))
        model.config.quantization_config = ZsfwConfig.build(m.storage.model_dump(), _records(plan))
        if lazy:  # its layers are saved as they are truncated
            writer = CheckpointWriter(output_dir, overwrite, save.LAZY_MAX_SHARD_BYTES, checked=True)

        correction = corrector and Correction(model, targets, plan, store, driver, validation,
                                              lambda: planned(None),  # what a re-planning corrector runs
                                              training if trains else None, windows, m.calibration.batch_size)
        check = FiniteCheck(model, windows[:1], allow_non_finite, report.warnings)
        with report.phase("truncate"):
            truncate(model, targets, plan, store, correction, writer, check)
        notes = store.notes
        if corrector:
            with report.phase("correct"):
                report.correction_losses = correct(corrector, correction)
                report.correction_steps, report.correction_result = correction.history, correction.result
            check.after("correction")
            if correction.plan is not plan:  # re-planned: the ranks (and the records) are new
                plan, notes = correction.plan, correction.store.notes
                model.config.quantization_config = ZsfwConfig.build(m.storage.model_dump(), _records(plan))
        report.record_plan(plan, notes)
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


def already_compressed(model: str) -> str:
    """Why ``model``, already compressed by zsfw, is not compressed again (its low-rank factors
    would be factorized as if they were the model's layers)."""
    return (f"model {model!r} is already compressed by zsfw (its config has a zsfw "
            f"quantization_config); compressing a compressed model is not supported: compress the "
            f"original model instead, at the ratio you want")


def _planner(planned: Callable[..., tuple[FactorStore, AllocationPlan]], statistics_cache: str | Path | None,
             m: ZeroSumSVDModifier, device: torch.device, dtype: torch.dtype) -> Planner:
    """What a stage that aims at the allocation gets: the plan of the model before it (its
    statistics cached like a run without stages, so that run's entry serves it) and the whitening
    factors it was made with (one tensor per input group, on the targets' ``device`` in their
    ``dtype`` but at least fp32: not a float64 copy beside the stage's own), so the stage need not
    compute them again."""
    def plan() -> tuple[AllocationPlan, dict[str, torch.Tensor]]:
        store, result = planned(open_cache(statistics_cache), m.model_copy(update={"stages": []}))
        try:
            groups: dict[str, torch.Tensor] = {}
            for name, group in store.whitener_of.items():
                if group not in groups:
                    groups[group] = store.whitener(name, device).to(dtype)
            return result, {name: groups[group] for name, group in store.whitener_of.items()}
        finally:
            store.close()

    settings = {"ratio": m.ratio, "whiten": m.whiten, "damping": m.damping, "calibration": m.calibration.model_dump(),
                **{kind: getattr(m, kind).model_dump() for kind in ("scorer", "allocator", "storage")}}
    return Planner(plan, settings)


def _check_execution(m: ZeroSumSVDModifier, allocator: Any, corrector: Any, output_dir: str | Path | None,
                     lazy: bool, statistics_cache: str | Path | None) -> None:
    """Refuse what a lazily loaded model (decoder layers read one at a time), the streamed driver
    or several processes under torchrun cannot do yet, before any work."""
    model_aware = getattr(allocator, "needs_model", False)
    needs_memory = getattr(corrector, "needs_memory_driver", None)
    if needs_memory and m.execution.driver != "memory":
        raise RecipeError(f"corrector {m.corrector.name!r} with {needs_memory} needs execution.driver 'memory', "
                          f"not {m.execution.driver!r}")
    if lazy:
        needs = ["execution.driver 'streamed'" if m.execution.driver != "streamed" else "",
                 "an output folder (its layers are written as they are compressed)" if output_dir is None else "",
                 "no stages" if m.stages else "", "no corrector" if m.corrector else "",
                 f"an allocator that needs no model, not {m.allocator.name!r}" if model_aware else ""]
        needs = [n for n in needs if n]
        if needs:
            raise RecipeError(f"a lazily loaded model needs {', '.join(needs)}; or load it with "
                              f"execution.weights 'resident' (recipes/zero_sum_oneshot.yaml has no corrector)")
    if distributed.launched():
        planning = ", ".join(repr(s.name) for s in m.stages
                             if getattr(plugins.create("stage", s.name, s.options), "needs_plan", False))
        unsupported = [what for what, used in (("a corrector", m.corrector), ("a statistics cache", statistics_cache),
                                               (f"allocator {m.allocator.name!r}", model_aware),
                                               (f"stage {planning} (it aims at the allocation plan)", planning))
                       if used]
        if unsupported:
            raise RecipeError(f"{' and '.join(unsupported)} cannot be used across several processes yet; "
                              f"run without torchrun (recipes/zero_sum_oneshot.yaml has no corrector)")


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
              corrector: Any, vocab: int) -> torch.Tensor:
    """The windows a training stage or corrector learns from: those given, else those drawn from
    the text."""
    if given is not None:
        return token_ids(given, "training", vocab)
    if drawn is not None:
        return drawn
    trainers = [s.name for s in m.stages] + ([m.corrector.name] if getattr(corrector, "needs_training", False) else [])
    raise CalibrationError(f"{trainers} train on windows held out from calibration: with a tensor "
                           f"dataset pass training= (windows × tokens), or calibrate on text")


def _records(plan: AllocationPlan) -> dict[str, ModuleRecord]:
    return {name: ModuleRecord(plan.format(name).name, l.out_features, l.in_features,
                               None if plan.is_dense(name) else plan.rank(name), l.has_bias)
            for name, l in plan.layers.items()}


def _own_tokenizer(model: nn.Module) -> Any:
    from zsfw.models import own_tokenizer

    return own_tokenizer(model)
