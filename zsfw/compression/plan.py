"""The plan of the model as it is now: statistics (driver) → factorize and score (factor store,
cached) → allocate, with the run's one statistics cache.

``Planner`` is what the pipeline, a stage that aims at the plan (Prehab's ``ranks: plan``) and a
re-planning corrector all call, so the three plan the model the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zsfw.budget import AllocationPlan, fits
from zsfw.capabilities import needs
from zsfw.compression.allocate import allocate, based_formats, chooses_formats, needs_plain
from zsfw.compression.cache import CompressionCache
from zsfw.compression.driver import Driver
from zsfw.compression.factorize import factor_store
from zsfw.compression.report import Report
from zsfw.compression.factor_store import FactorStore
from zsfw.errors import RecipeError
from zsfw.recipe import ZeroSumSVDModifier


def _check_fits(storage: Any, targets: dict[str, nn.Linear]) -> None:
    """Refuse, before any pass, a single storage format that cannot hold a target (``storage:
    auto`` gives such a layer another member instead)."""
    if chooses_formats(storage):
        return
    for name, linear in targets.items():
        if not fits(storage, linear.out_features, linear.in_features):
            raise RecipeError(f"storage {storage.name!r} cannot hold layer {name!r} ({linear.out_features}x"
                              f"{linear.in_features}) with its options {vars(storage)}; change them (e.g. a "
                              f"group_size that divides {linear.in_features}) or list it in storage: auto "
                              f"with formats that can")


class Planner:
    """Plans ``model``'s ``targets`` on the calibration ``windows`` as ``modifier`` says, with its
    ``scorer``, ``allocator`` and ``storage`` and the run's ``driver``; a model-aware allocator
    judges on ``validation``. ``cache`` (None: no cache) is the run's statistics cache, opened once."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                 modifier: ZeroSumSVDModifier, scorer: Any, allocator: Any, storage: Any, driver: Driver,
                 validation: torch.Tensor | None, cache: CompressionCache | None) -> None:
        self.model, self.targets, self.windows, self.modifier = model, targets, windows, modifier
        self.scorer, self.allocator, self.storage, self.driver = scorer, allocator, storage, driver
        self.validation, self.cache = validation, cache
        _check_fits(storage, targets)
        allocating = needs("allocator", modifier.allocator)
        # which member format keeps the most is not known yet: every component waits in the store
        self.every_component = allocating.needs_model or allocating.keeps_any_component or chooses_formats(storage)
        weight = next(iter(targets.values())).weight
        self._device, self._dtype = weight.device, torch.promote_types(weight.dtype, torch.float32)

    @property
    def settings(self) -> dict[str, Any]:
        """What a plan depends on besides the weights and windows (a stage's cache key has it)."""
        m = self.modifier
        return {"ratio": m.ratio, "whiten": m.whiten, "damping": m.damping, "calibration": m.calibration.model_dump(),
                **{kind: getattr(m, kind).model_dump() for kind in ("scorer", "allocator", "storage")}}

    def factorize(self, report: Report, whiteners: bool = True, cached: bool = True,
                  modifier: ZeroSumSVDModifier | None = None) -> FactorStore:
        """The factor store of every target: statistics, whitened SVDs and scores, from the cache
        (unless not ``cached``) when it holds them; ``whiteners``: keep each group's factor S."""
        return factor_store(self.model, self.targets, self.windows, modifier or self.modifier, self.scorer,
                            self.driver, self.cache if cached else None, report,
                            None if self.every_component else self.storage, whiteners,
                            based_formats(self.storage), needs_plain(self.storage))

    def allocate(self, store: FactorStore) -> AllocationPlan:
        """The allocator's plan of ``store``'s layers at the recipe's ratio."""
        m = self.modifier
        return allocate(self.allocator, m.allocator.name, m.ratio, self.storage, store, self.targets, self.driver,
                        self.validation)

    def replan(self, cached: bool = False, modifier: ZeroSumSVDModifier | None = None
               ) -> tuple[FactorStore, AllocationPlan]:
        """Statistics, factorization and the allocator's plan of the model as it is now (what a
        re-planning corrector runs: not cached, the weights are its own); the caller closes the store."""
        store = self.factorize(Report(recipe={}), cached=cached, modifier=modifier)
        try:
            return store, self.allocate(store)
        except BaseException:
            store.close()
            raise

    def for_stage(self) -> tuple[AllocationPlan, dict[str, torch.Tensor]]:
        """What a stage that aims at the allocation gets: the plan of the model before it (its
        statistics cached like a run without stages, so that run's entry serves it) and the
        whitening factors it was made with (one tensor per input group, on the targets' device in
        their dtype but at least fp32: not a float64 copy beside the stage's own)."""
        store, plan = self.replan(cached=True, modifier=self.modifier.model_copy(update={"stages": []}))
        try:
            groups: dict[str, torch.Tensor] = {}
            for name, group in store.whitener_of.items():
                if group not in groups:
                    groups[group] = store.whitener(name, self._device).to(self._dtype)
            return plan, {name: groups[group] for name, group in store.whitener_of.items()}
        finally:
            store.close()
