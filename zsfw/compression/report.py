"""The compression report: per-layer ranks and bytes, totals, timings and memory."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from zsfw.budget import AllocationPlan
from zsfw.compression.linalg import relative_tail_energy

T = TypeVar("T")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rank: int  # kept rank; == full_rank for a layer left dense
    full_rank: int
    dense: bool
    bytes: int  # as priced by the storage format
    reference_bytes: int  # the original layer at 16 bits per weight
    predicted_delta_loss: float  # sum of the scores of the dropped components
    whitened_error: float  # ‖W S − (W S)_k‖_F / ‖W S‖_F
    whitening: str = ""  # how S was obtained, when not a plain Cholesky at the requested damping
    written_bytes: int | None = None  # tensor bytes in the saved file, once saved
    format: str = ""  # the storage format that holds it

    @property
    def kept(self) -> float:
        return self.bytes / self.reference_bytes


@dataclass
class Report:
    recipe: dict
    layers: list[LayerReport] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, options, summary of each
    warnings: list[str] = field(default_factory=list)  # what the user should know about the run
    budget_bytes: int = 0
    calibration_tokens: int = 0
    calibration_loss: float = float("nan")
    statistics_cached: bool = False  # the statistics came from a cache, not a calibration pass
    factors_cached: bool = False  # so did the whitened SVDs and scores
    allocation: dict[str, Any] = field(default_factory=dict)  # what a model-aware allocator measured
    correction_losses: list[float] = field(default_factory=list)
    correction_steps: list[dict[str, Any]] = field(default_factory=list)  # what the corrector measured
    correction_result: dict[str, Any] = field(default_factory=dict)  # validation loss one-shot → final
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    peak_rss_mb: dict[str, float] = field(default_factory=dict)  # phase -> peak so far
    files: dict[str, dict[str, int]] = field(default_factory=dict)  # saved file -> bytes, header_bytes

    @property
    def total_bytes(self) -> int:
        return sum(l.bytes for l in self.layers)

    @property
    def reference_bytes(self) -> int:
        return sum(l.reference_bytes for l in self.layers)

    @property
    def format_counts(self) -> dict[str, int]:
        """How many layers each storage format holds."""
        return dict(Counter(l.format for l in self.layers))

    def record_plan(self, plan: AllocationPlan, notes: dict[str, str]) -> None:
        """One row per layer of ``plan``, in plan order; ``notes``: how each S was obtained."""
        self.budget_bytes = plan.budget.limit
        for name, layer in plan.layers.items():
            dense = plan.is_dense(name)
            self.layers.append(LayerReport(
                name=name, shape=(layer.out_features, layer.in_features), rank=plan.rank(name),
                full_rank=layer.full_rank, dense=dense, bytes=plan.cost(name),
                reference_bytes=plan.budget.reference_bytes(layer),
                predicted_delta_loss=0.0 if dense else layer.scores[plan.dropped(name)].sum().item(),
                whitened_error=0.0 if dense else relative_tail_energy(layer.sigma, plan[name]),
                whitening=notes.get(name, ""), format=plan.format(name).name))

    def record_written(self, written: dict[str, int], files: dict[str, tuple[int, int]]) -> None:
        """Note the bytes a save wrote: per compressed module, and per file (size, header)."""
        for layer in self.layers:
            layer.written_bytes = written.get(layer.name)
        self.files = {name: {"bytes": size, "header_bytes": header} for name, (size, header) in files.items()}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a pipeline phase and record the peak memory after it."""
        start = time.perf_counter()
        yield
        self.add_time(name, time.perf_counter() - start)

    def add_time(self, name: str, seconds: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        self.peak_rss_mb[name] = peak_rss_mb()

    def timed(self, name: str, items: Iterable[T]) -> Iterator[T]:
        """``items`` passed through, the time spent producing them added to phase ``name``
        (for a phase interleaved with another, such as a pass the factorization consumes)."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.add_time(name, time.perf_counter() - start)
            yield item

    def _correction_lines(self) -> list[str]:
        """The corrector's measured steps and its result, when there was one."""
        result = self.correction_result
        if not result:
            return []
        tried = ", ".join(f"{s['cycle']}{'×%g' % s['scale'] if 'scale' in s else ''}: {s['validation_loss']:.4f}"
                          f"{'' if s['accepted'] else ' (rejected)'}" for s in self.correction_steps)
        return [f"correction: validation loss {result['one_shot']:.4f} one-shot → {result['final']:.4f} "
                f"({result['result']}){'; steps ' + tried if tried else ''}"]

    def to_dict(self) -> dict:
        out = asdict(self)
        for layer, row in zip(self.layers, out["layers"]):
            row["kept"] = layer.kept
        out["totals"] = {
            "bytes": self.total_bytes,
            "reference_bytes": self.reference_bytes,
            "kept": self.total_bytes / max(self.reference_bytes, 1),
            "predicted_delta_loss": sum(l.predicted_delta_loss for l in self.layers),
            "dense_layers": sum(l.dense for l in self.layers),
            "formats": self.format_counts,
            "seconds": sum(self.timings.values()),
        }
        if self.files:
            out["totals"]["written_bytes"] = sum(l.written_bytes or 0 for l in self.layers)
            out["totals"]["file_bytes"] = sum(f["bytes"] for f in self.files.values())
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        """A plain-text table: one row per layer, then totals, timings and memory."""
        mixed = len(self.format_counts) > 1  # storage: auto: a format column
        head = (f"{'module':<40} {'shape':>11} {'rank':>11} {'format ' if mixed else ''}"
                f"{'kept':>6} {'bits':>5} {'bytes':>10} {'ΔL sum':>10} {'w.err':>6}")
        rows = [head, "-" * len(head)]
        for l in self.layers:
            rank = "dense" if l.dense else f"{l.rank}/{l.full_rank}"
            fmt = f"{l.format:>6} " if mixed else ""
            rows.append(f"{l.name[-40:]:<40} {l.shape[0]:>5}x{l.shape[1]:<5} {rank:>11} {fmt}"
                        f"{l.kept:>6.3f} {8 * l.bytes / (l.shape[0] * l.shape[1]):>5.2f} {l.bytes:>10} "
                        f"{l.predicted_delta_loss:>10.3g} "
                        f"{l.whitened_error:>6.3f}{'  ' + l.whitening if l.whitening else ''}")
        t = self.to_dict()["totals"]
        rows += ["-" * len(head),
                 f"total: {t['bytes']} bytes of {t['reference_bytes']} (kept {t['kept']:.3f}, "
                 f"budget {self.budget_bytes}), {t['dense_layers']} dense layer(s), "
                 f"predicted ΔL {t['predicted_delta_loss']:.4g}",
                 *(["formats: " + ", ".join(f"{name} {count} layer(s)" for name, count in t["formats"].items())]
                   if mixed else []),
                 f"calibration: {self.calibration_tokens} tokens, loss {self.calibration_loss:.4f}"
                 + (" (statistics and factors from the cache)" if self.factors_cached else
                    " (statistics from the cache)" if self.statistics_cached else "")
                 + (f", after correction cycles {['%.4f' % x for x in self.correction_losses]}"
                    if self.correction_losses else ""),
                 *(["allocation: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in self.allocation.items())] if self.allocation else []),
                 *self._correction_lines(),
                 "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
                 + f" (total {t['seconds']:.1f}s)",
                 f"peak RSS: {max(self.peak_rss_mb.values(), default=peak_rss_mb()):.0f} MB",
                 "columns: rank kept/full ('dense': stored whole; in a format with a quantized base, the "
                 "residual's rank on it, 0: the base alone); kept = bytes / bytes at 16 bits per weight; "
                 "bits = bits per weight; ΔL sum = the scorer's predicted loss change of the dropped "
                 "components; w.err = ‖(W − W_k)S‖ / ‖W S‖, the whitened relative error (with a quantized base: of "
                 "the residual W − Q(W), what its rank k leaves of it)"]
        rows += [f"warning: {w}" for w in self.warnings]
        if self.files:
            rows.append(f"saved: {t['written_bytes']} bytes of compressed-module tensors (predicted "
                        f"{t['bytes']}), {t['file_bytes']} bytes in {len(self.files)} file(s)")
        return "\n".join(rows)
