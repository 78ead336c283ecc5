"""The compression pipeline, one way through:

recipe → targets + calibration windows → statistics (one pass: C and G) → whitened SVD and
scores, layer group by layer group → allocation under the byte budget → truncation →
correction (optional) → modules of the storage format → report.

Memory stays bounded: a group's covariance is freed once factorized, a layer's gradient once
scored, and the SVD factors wait on disk (safetensors, in a temporary folder) until the
allocation says which of them to keep.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from zsfw import plugins
from zsfw.calibration import DatasetLike, calibration_windows
from zsfw.checkpoint import ModuleRecord, check_destination, quantization_config, save
from zsfw.interfaces import Allocation, ByteBudget, LayerScores, LayerSpectrum, rank_of
from zsfw.linalg import (dropped, lowrank_factors, relative_tail_energy, truncate, whitened_svd,
                         whitening_factor)
from zsfw.recipe import RecipeLike, load_recipe
from zsfw.report import LayerReport, Report
from zsfw.statistics import CalibrationStatistics, collect
from zsfw.stats_cache import Factorization, StatisticsCache, factorization_key, statistics_key
from zsfw.targets import find_targets

log = logging.getLogger(__name__)


class _Spill:
    """Tensors parked on disk between phases, so they are never all in memory at once.

    In a temporary folder by default; in ``directory`` (kept) when the factorization cache
    holds them.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="zsfw-")
        self.directory = Path(directory or self._tmp.name)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def put(self, key: str, **tensors: torch.Tensor) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self._path(key))

    def get(self, key: str, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in load_file(self._path(key)).items()}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class _Correction:
    """The truncated model as a corrector sees it (implements ``CorrectionProblem``)."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Linear], ranks: dict[str, int],
                 spill: _Spill, whitener_of: dict[str, str], windows: torch.Tensor, cal) -> None:
        self.model, self.targets, self.ranks, self.spill = model, targets, ranks, spill
        self.whitener_of, self.windows, self.cal = whitener_of, windows, cal
        self.layers = list(ranks)
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.originals: dict[str, torch.Tensor] = {}

    def install(self, name: str, B: torch.Tensor, A: torch.Tensor) -> None:
        weight = self.targets[name].weight
        self.originals.setdefault(name, weight.detach().clone())
        self.factors[name] = (B.to(weight.dtype), A.to(weight.dtype))
        with torch.no_grad():
            weight.copy_(B @ A)

    def original(self, name: str) -> torch.Tensor:
        return self.originals[name]

    def weight(self, name: str) -> torch.Tensor:
        return self.targets[name].weight.detach()

    def gradients(self) -> tuple[float, dict[str, torch.Tensor]]:
        stats = collect(self.model, {n: self.targets[n] for n in self.layers}, self.windows,
                        batch_size=self.cal.batch_size, moments=False,
                        checkpoint_layers=self.cal.checkpoint_layers, desc="correction gradient")
        return stats.loss, stats.gradients

    def retruncate(self, name: str, weight: torch.Tensor) -> None:
        S = _whitener(self.spill, self.whitener_of.get(name), weight.device)
        self.install(name, *truncate(weight, S, self.ranks[name]))


def _whitener(spill: _Spill, group: str | None, device: torch.device) -> torch.Tensor | None:
    return None if group is None else spill.get(f"S.{group}", device)["S"]


def compress(
    model: nn.Module,
    recipe: RecipeLike = None,
    dataset: DatasetLike | torch.Tensor | None = None,
    output_dir: str | Path | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    statistics_cache: str | Path | None = None,
) -> tuple[nn.Module, Report]:
    """Compress ``model`` in place as ``recipe`` says, calibrating on ``dataset``.

    ``dataset`` is text (see ``zsfw.calibration``) or a ready (windows × tokens) tensor of ids.
    Text needs ``tokenizer`` (default: the model's own, from ``model.name_or_path``).
    Returns the model and a report. With ``output_dir`` the model is saved there as a
    ``save_pretrained`` folder (``zsfw.checkpoint.save``) with the tokenizer, the effective
    recipe and the report; an existing folder is refused up front unless ``overwrite``.
    With ``statistics_cache`` (a folder), the calibration statistics are reused from there when
    the model, data and statistics settings are unchanged (``zsfw.stats_cache``), and stored
    there otherwise: compressing at another ratio or with another allocator skips the pass.
    """
    if output_dir is not None:
        check_destination(Path(output_dir), overwrite)
    recipe = load_recipe(recipe)
    m = recipe.modifier
    scorer = plugins.create("scorer", m.scorer.name, m.scorer.options)
    allocator = plugins.create("allocator", m.allocator.name, m.allocator.options)
    corrector = m.corrector and plugins.create("corrector", m.corrector.name, m.corrector.options)
    storage = plugins.create("storage", m.storage.name, m.storage.options)
    report = Report(recipe=recipe.to_dict())
    cal = m.calibration

    targets = find_targets(model, m.targets, m.ignore)
    with report.phase("calibration data"):
        windows = _windows(model, dataset, tokenizer, cal)
    settings = {"gradient_samples": cal.gradient_samples, "batch_size": cal.batch_size,
                "moments": m.whiten, "gradients": scorer.needs_gradient}
    cache = StatisticsCache(statistics_cache) if statistics_cache is not None else None
    keys = cache and _cache_keys(model, targets, windows, settings, m)
    found = cache and cache.load_factors(keys[1])
    if found:
        spill, factors = _Spill(found[0]), found[1]
        report.statistics_cached = report.factors_cached = True
    else:
        with report.phase("statistics"):
            if not (m.whiten or scorer.needs_gradient):
                stats = CalibrationStatistics()  # unwhitened SVD scored by σ: nothing to measure
            else:
                stats = _statistics(model, targets, windows, settings, cal.checkpoint_layers,
                                    cache, keys and keys[0], report)
        spill = _Spill(cache.new_factors_dir() if cache else None)
    try:
        if not found:
            with report.phase("factorize + score"):
                factors = _factorize(targets, stats, m.whiten, m.damping, scorer, spill)
                factors.tokens = stats.tokens or windows.numel()
            del stats
            if cache:
                spill.directory = cache.save_factors(keys[1], spill.directory, factors)
        report.calibration_tokens, report.calibration_loss = factors.tokens, factors.loss
        layer_scores, whitener_of, notes = factors.layers, factors.whitener_of, factors.notes

        with report.phase("allocate"):
            ordered = [layer_scores[name] for name in targets]
            budget = ByteBudget(ordered, m.ratio, storage)
            allocation = allocator.allocate(ordered, budget)
            ranks = _check_allocation(m.allocator.name, ordered, allocation, budget)
        report.budget_bytes = budget.limit
        lowrank = {l.name: allocation[l.name] for l in ordered if not budget.is_dense(l, ranks[l.name])}

        device = next(model.parameters()).device
        problem = _Correction(model, targets, {n: ranks[n] for n in lowrank}, spill, whitener_of,
                              windows[: cal.gradient_samples], cal)
        with report.phase("truncate"):
            for name, linear in tqdm(targets.items(), desc="truncate", unit="layer"):
                if name not in lowrank:
                    model.set_submodule(name, storage.dense_module(linear))
                    continue
                svd = spill.get(f"svd.{name}", device)
                B, A = lowrank_factors(svd["U"], layer_scores[name].sigma.to(device), svd["Vh"],
                                       _whitener(spill, whitener_of.get(name), device),
                                       lowrank[name])
                if corrector:
                    problem.install(name, B, A)
                else:
                    model.set_submodule(name, storage.lowrank_module(B, A, linear.bias))
        if corrector:
            with report.phase("correct"):
                report.correction_losses = corrector.correct(problem)
                for name, (B, A) in problem.factors.items():
                    model.set_submodule(name, storage.lowrank_module(B, A, targets[name].bias))
    finally:
        spill.close()
        if cache and spill.directory.name.startswith(".factors-"):  # an entry left unfinished
            shutil.rmtree(spill.directory, ignore_errors=True)

    for layer in ordered:
        rank, kept = ranks[layer.name], allocation[layer.name]
        dense = layer.name not in lowrank
        report.layers.append(LayerReport(
            name=layer.name, shape=(layer.out_features, layer.in_features),
            rank=layer.full_rank if dense else rank, full_rank=layer.full_rank, dense=dense,
            bytes=budget.cost(layer, layer.full_rank if dense else rank),
            reference_bytes=budget.reference_bytes(layer),
            predicted_delta_loss=0.0 if dense else layer.scores[dropped(layer.full_rank, kept)].sum().item(),
            whitened_error=0.0 if dense else relative_tail_energy(layer.sigma, kept),
            whitening=notes.get(layer.name, "")))
    model.config.quantization_config = quantization_config(
        {"name": m.storage.name, "options": m.storage.options},
        {l.name: ModuleRecord(m.storage.name, l.out_features, l.in_features,
                              None if l.name not in lowrank else ranks[l.name], l.has_bias)
         for l in ordered})
    if output_dir is not None:
        with report.phase("save"):
            save(model, output_dir, tokenizer or _own_tokenizer(model), recipe, report, overwrite)
    return model, report


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


def _statistics(model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                settings: dict, checkpoint_layers: bool, cache: StatisticsCache | None,
                key: str | None, report: Report) -> CalibrationStatistics:
    """The calibration pass, or its result from the statistics cache when one is given."""
    stats = cache and cache.load(key)
    report.statistics_cached = stats is not None
    if stats is None:
        stats = collect(model, targets, windows, checkpoint_layers=checkpoint_layers,
                        desc="statistics + gradient", **settings)
        if cache:
            cache.save(key, stats)
    return stats


def _cache_keys(model: nn.Module, targets: dict[str, nn.Linear], windows: torch.Tensor,
                settings: dict, m) -> tuple[str, str]:
    """Keys of the statistics and of the factorization (which also depends on how C is
    whitened and on the scorer)."""
    key = statistics_key(model, list(targets), windows, settings)
    return key, factorization_key(key, {"whiten": m.whiten, "damping": m.damping,
                                        "scorer": m.scorer.name, "options": m.scorer.options})


def _factorize(targets: dict[str, nn.Linear], stats: CalibrationStatistics, whiten: bool,
               damping: float, scorer, spill: _Spill) -> Factorization:
    """Whitened SVD and scores of every target, group by group; the SVD factors and each
    group's S go to ``spill``, the spectra and scores stay in memory."""
    groups = stats.groups if whiten else {name: [name] for name in targets}
    out = Factorization(loss=stats.loss)
    bar = tqdm(total=len(targets), desc="factorize + score", unit="layer")
    for group, members in groups.items():
        S, note = None, ""
        if whiten:
            whitening = whitening_factor(stats.covariances.pop(group), damping)
            S = whitening.S
            spill.put(f"S.{group}", S=S)
            note = _whitening_note(whitening, damping)
            if note:
                log.warning("whitening of %s needed %s", members, note)
        for name in members:
            weight = targets[name].weight.detach()
            U, sigma, Vh = whitened_svd(weight, S)
            scores = scorer.score(LayerSpectrum(name, U, sigma, Vh, S, stats.gradients.pop(name, None)))
            out.layers[name] = LayerScores(name, weight.shape[0], weight.shape[1],
                                           targets[name].bias is not None,
                                           sigma.cpu(), scores.to(torch.float64).cpu())
            spill.put(f"svd.{name}", U=U.float(), Vh=Vh.float())
            if S is not None:
                out.whitener_of[name] = group
                out.notes[name] = note
            bar.update()
    bar.close()
    return out


def _windows(model: nn.Module, dataset: Any, tokenizer: Any, cal) -> torch.Tensor:
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.dtype != torch.long:
            raise ValueError(f"a tensor dataset must be (windows × tokens) int64 ids, got "
                             f"{tuple(dataset.shape)} {dataset.dtype}")
        return dataset
    if dataset is None:
        raise ValueError("compress needs calibration data: a text file/folder, a datasets.Dataset, "
                         "an iterable of strings, or a tensor of token ids")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    return calibration_windows(tokenizer, dataset, cal.samples, cal.sequence_length, cal.seed,
                               cal.max_tokens)


def _whitening_note(whitening, damping: float) -> str:
    if whitening.method != "cholesky":
        return f"{whitening.method} whitening"
    if whitening.relative_damping > damping:
        return f"damping raised to {whitening.relative_damping:.0e}"
    return ""


def _check_allocation(name: str, layers: list[LayerScores], allocation: dict[str, Allocation],
                      budget: ByteBudget) -> dict[str, int]:
    """The ranks of a valid allocation; a RuntimeError naming the allocator otherwise."""
    ranks = {}
    for layer in layers:
        kept = allocation.get(layer.name)
        if isinstance(kept, torch.Tensor):
            valid = (kept.dim() == 1 and kept.dtype in (torch.int32, torch.int64) and kept.numel() > 0
                     and kept.unique().numel() == kept.numel()
                     and 0 <= int(kept.min()) and int(kept.max()) < layer.full_rank)
        else:
            valid = isinstance(kept, int) and 1 <= kept <= layer.full_rank
        if not valid:
            raise RuntimeError(f"allocator {name!r} gave {layer.name!r} {kept!r}; allowed: a rank "
                               f"in 1..{layer.full_rank} or a 1-D tensor of distinct component "
                               f"indices in 0..{layer.full_rank - 1}")
        ranks[layer.name] = rank_of(kept)
    spent = budget.total(layers, ranks)
    if spent > budget.limit:
        raise RuntimeError(f"allocator {name!r} spent {spent} bytes, over the budget of "
                           f"{budget.limit}")
    return ranks
