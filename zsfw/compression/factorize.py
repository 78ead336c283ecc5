"""Factorize and score: each input group's whitening factor, each layer's whitened SVD and the
scorer's score of every component, one group at a time as the driver (or the statistics cache)
completes it; or the whole factorization from the cache.

A group's C and its members' G are dropped as soon as the group is done, and the SVD factors go
to the factor store, so only one group's statistics are ever held here.

For a storage format with a quantized base (``has_base``), each layer's weight is quantized
(GPTQ formats with H = S Sᵀ, the damped input second moment C) and the residual W − Q(W) is
factorized and scored in the same whitened coordinates (EoRA/LQER's construction): dropping a
residual component costs what its score says, the base alone is rank 0. The store keeps the
base and the residual under the format's ``base_key``.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from zsfw.budget import fits
from zsfw.compression.cache import CompressionCache, factorization_key, statistics_key
from zsfw.compression.driver import Driver
from zsfw.compression.linalg import Whitening, lowrank_factors, whitened_svd, whitening_factor
from zsfw.compression.report import Report
from zsfw.compression.statistics import GroupStatistics
from zsfw.compression.factor_store import FactorStore
from zsfw.protocols import LayerScores, LayerSpectrum, Scorer, StorageFormat
from zsfw.recipe import ZeroSumSVDModifier
from zsfw.residency import RESIDENT, Resident, residency

log = logging.getLogger(__name__)


def factorize(targets: dict[str, nn.Linear], groups: Iterable[GroupStatistics], scorer: Scorer,
              damping: float, store: FactorStore, weights: Resident = RESIDENT,
              bases: Mapping[str, StorageFormat] | None = None, plain: bool = True) -> None:
    """Fill ``store`` with the whitened SVD and scores of every target (unless not ``plain``) and
    of its residual on the base of each format of ``bases`` (by base key), group by group (each
    group's layer held in memory while its members are factorized)."""
    bar = None  # opened with the first group: the driver's pass may run before it arrives
    try:
        for group in groups:
            if bar is None:
                bar = tqdm(total=len(targets), desc="factorize + score", unit="layer")
            _factorize_group(targets, group, scorer, damping, store, weights, bar, bases or {}, plain)
    finally:  # closed before an error is printed, not after it
        if bar is not None:
            bar.close()


def _factorize_group(targets: dict[str, nn.Linear], group: GroupStatistics, scorer: Scorer, damping: float,
                     store: FactorStore, weights: Resident, bar: tqdm, bases: Mapping[str, StorageFormat],
                     plain: bool) -> None:
    """One group's whitening and its members' SVDs, scores and factors, into ``store``.

    A function of its own so that its float64 temporaries (S, U, Vᵀ, factors: ~0.5 GB for a
    5632-wide group) are gone when it returns: a streamed driver computes the next layer's
    statistics while the loop above waits, and must not do so next to them.
    """
    S, note = None, ""
    if group.covariance is not None:
        whitening = whitening_factor(group.take_covariance(), damping)  # C freed once S is made
        S, note = whitening.S, whitening_note(whitening, damping)
        store.put_whitener(group.group, S)
        if note:
            log.warning("whitening of %s needed %s", group.members, note)
    hessian = None if S is None or not any(f.needs_hessian for f in bases.values()) else S.to(torch.float64) @ S.mT
    with weights.holding_names(group.members):
        for name in group.members:
            weight, gradient = targets[name].weight.detach(), group.gradients.pop(name, None)
            if plain:
                _factorize_layer(name, weight, targets[name].bias is not None, S, gradient, scorer, store,
                                 group.group, note)
            for key, storage in bases.items():
                if not fits(storage, *weight.shape):  # auto gives this layer another format
                    continue
                base = storage.quantize(weight, hessian if storage.needs_hessian else None)
                store.put_base(key, name, storage.base_tensors(base))
                residual = weight - storage.dequantize(base).to(weight.device, weight.dtype)
                _factorize_layer(name, residual, targets[name].bias is not None, S, gradient, scorer, store,
                                 group.group, note, key)
                del base, residual
            bar.update()


def _factorize_layer(name: str, weight: torch.Tensor, bias: bool, S: torch.Tensor | None,
                     gradient: torch.Tensor | None, scorer: Scorer, store: FactorStore, group: str, note: str,
                     variant: str = "") -> None:
    """One weight's (or residual's) whitened SVD, scores and factors, into ``store``."""
    U, sigma, Vh = whitened_svd(weight, S)
    scores = scorer.score(LayerSpectrum(name, U, sigma, Vh, S, gradient))
    layer = LayerScores(name, weight.shape[0], weight.shape[1], bias, sigma.cpu(), scores.to(torch.float64).cpu())
    B, A = lowrank_factors(U, sigma, Vh, S, store.kept_rank(layer))
    del U, Vh  # not next to the next member's SVD
    store.put_layer(layer, B, A, None if S is None else group, note, variant)


def factor_store(model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                 modifier: ZeroSumSVDModifier, scorer: Scorer, driver: Driver,
                 cache: CompressionCache | None, report: Report, spill: StorageFormat | None = None,
                 whiteners: bool = True, bases: Mapping[str, StorageFormat] | None = None,
                 plain: bool = True) -> FactorStore:
    """The factorization of every target: a cached one when the cache holds it, else computed
    from statistics (cached, or from the driver's pass) and, with a cache, stored there (cache
    entries keep everything; a temporary store what ``spill`` and ``whiteners`` say). ``bases``
    and ``plain``: see ``factorize``."""
    m, cal = modifier, modifier.calibration
    if cache is not None:
        settings = {"gradient_samples": cal.gradient_samples, "batch_size": cal.batch_size,
                    "moments": m.whiten, "gradients": scorer.needs_gradient,
                    "stages": [s.to_yaml() for s in m.stages]}
        stats_key = statistics_key(model, list(targets), windows, settings)
        factorized = {"whiten": m.whiten, "damping": m.damping, "scorer": m.scorer.name, "options": m.scorer.options}
        if bases:  # what each base is depends on the format's options, all in its key
            factorized.update(bases=sorted(bases), plain=plain)
        key = factorization_key(stats_key, factorized)
        store = cache.factors(key)
        if store is not None:
            report.statistics_cached = report.factors_cached = True
            return store
        statistics = cache.statistics(stats_key)
        report.statistics_cached = statistics is not None
        if statistics is None:
            statistics = cache.record(stats_key, driver.statistics(targets, m.whiten, scorer.needs_gradient))
        store = cache.new_factors(key)
    else:
        statistics = driver.statistics(targets, m.whiten, scorer.needs_gradient)
        store = FactorStore.temporary(spill, whiteners)
    try:
        start = time.perf_counter()
        factorize(targets, report.timed("statistics", statistics), scorer, m.damping, store, residency(model),
                  bases, plain)
        report.add_time("factorize + score", time.perf_counter() - start - report.timings["statistics"])
        store.tokens, store.loss = statistics.tokens, statistics.loss
        if cache is not None:
            store.commit()
    except BaseException:
        store.close()
        raise
    return store


def whitening_note(whitening: Whitening, damping: float) -> str:
    """How S was obtained, for the report, when it was not a plain Cholesky at ``damping``."""
    if whitening.method != "cholesky":
        return f"{whitening.method} whitening"
    if whitening.relative_damping > damping:
        return f"damping raised to {whitening.relative_damping:.0e}"
    return ""
