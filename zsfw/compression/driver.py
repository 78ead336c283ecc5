"""Data drivers: who pushes the calibration windows through the model.

The steps (factorize, score, allocate, truncate, correct) never run the model themselves; they
ask a driver for

- ``statistics(targets, moments, gradients)``: the statistics of every input group, yielded one
  group at a time as soon as the group's C and G are complete (the factorize step turns each
  into SVDs and scores at once and drops it), with the token count and loss after the last one;
- ``gradients(targets, share, objective, windows)``: the loss and ∂L/∂W of the targets at their
  current weights over the gradient windows, or other ``windows`` (a corrector's training
  windows), or one of several interleaved shares of them, in one pass (the corrector and
  model-aware allocators use it); the loss is the model's next-token loss unless an
  ``objective`` replaces it (only the in-memory driver takes one);
- ``loss(windows)``: the mean next-token loss of other windows (a corrector's validation
  windows) at the current weights, forward only;
- ``gathered(store)``: the factor store with every layer's factorization, in the process that
  allocates, truncates and saves (None in the others).

``InMemoryDriver`` holds the whole model in memory and runs one pass over all windows (its
groups all complete at the end of that pass). The layer-streamed driver (``streaming``) and the
``torch.distributed`` one (``distributed``) implement the same methods, and nothing else in the
pipeline changes.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch import nn

from zsfw.compression import distributed
from zsfw.compression.statistics import GroupStatistics, Objective, collect
from zsfw.compression.factor_store import FactorStore
from zsfw.errors import CalibrationError
from zsfw.recipe import CalibrationConfig, ExecutionConfig


class StatisticsPass(Protocol):
    """Groups' statistics, one at a time; ``tokens`` and ``loss`` are set once exhausted."""

    tokens: int
    loss: float

    def __iter__(self) -> Iterator[GroupStatistics]: ...


class Driver(Protocol):
    """What the pipeline asks of whoever runs the model."""

    gradient_windows: int  # how many windows ``gradients`` can share out

    def statistics(self, targets: dict[str, nn.Linear], moments: bool, gradients: bool) -> StatisticsPass: ...

    def gradients(self, targets: dict[str, nn.Linear], share: tuple[int, int] = (0, 1),
                  objective: Objective | None = None, windows: torch.Tensor | None = None
                  ) -> tuple[float, dict[str, torch.Tensor]]: ...

    def loss(self, windows: torch.Tensor) -> float: ...

    def gathered(self, store: FactorStore) -> FactorStore | None: ...


def gradient_share(windows: torch.Tensor, calibration: CalibrationConfig, share: tuple[int, int]) -> torch.Tensor:
    """The gradient windows (the first ``gradient_samples``), or share ``part`` of ``parts``
    interleaved, disjoint shares of them (``share = (part, parts)``)."""
    return share_of(windows[: calibration.gradient_samples], share, "gradient")


def share_of(windows: torch.Tensor, share: tuple[int, int], what: str = "training") -> torch.Tensor:
    """Share ``part`` of ``parts`` interleaved, disjoint shares of ``windows`` (``what`` windows)."""
    part, parts = share
    if not 0 <= part < parts <= windows.shape[0]:
        raise CalibrationError(f"{what} share {part} of {parts}: there are {windows.shape[0]} {what} "
                               f"windows; rotate over at most that many shares")
    return windows[part::parts]


def chosen_windows(windows: torch.Tensor, calibration: CalibrationConfig, share: tuple[int, int],
                   other: torch.Tensor | None) -> torch.Tensor:
    """What a driver's ``gradients`` runs over: a share of ``other`` windows when given, else of
    the gradient windows."""
    return gradient_share(windows, calibration, share) if other is None else share_of(other, share)


class InMemoryPass:
    def __init__(self, driver: "InMemoryDriver", targets: dict[str, nn.Linear], moments: bool,
                 gradients: bool) -> None:
        self.driver, self.targets, self.moments, self.gradients = driver, targets, moments, gradients
        self.tokens, self.loss = 0, float("nan")

    def __iter__(self) -> Iterator[GroupStatistics]:
        d, cal = self.driver, self.driver.calibration
        if not (self.moments or self.gradients):  # unwhitened SVD scored by σ: nothing to measure
            self.tokens = d.windows.numel()
            for name in self.targets:
                yield GroupStatistics(name, [name], None)
            return
        stats = collect(d.model, self.targets, d.windows, gradient_samples=cal.gradient_samples,
                        batch_size=cal.batch_size, moments=self.moments, gradients=self.gradients,
                        checkpoint_layers=cal.checkpoint_layers, desc="statistics + gradient")
        self.tokens, self.loss = stats.tokens or d.windows.numel(), stats.loss
        groups = stats.groups if self.moments else {name: [name] for name in self.targets}
        for group, members in groups.items():
            yield GroupStatistics(group, members, stats.covariances.pop(group, None),
                                  {n: stats.gradients.pop(n) for n in members if n in stats.gradients})


class InMemoryDriver:
    """The whole model in memory; one pass over all windows (the default, for models that fit)."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, calibration: CalibrationConfig) -> None:
        self.model, self.windows, self.calibration = model, windows, calibration
        self.gradient_windows = gradient_share(windows, calibration, (0, 1)).shape[0]

    def statistics(self, targets: dict[str, nn.Linear], moments: bool, gradients: bool) -> StatisticsPass:
        return InMemoryPass(self, targets, moments, gradients)

    def gradients(self, targets: dict[str, nn.Linear], share: tuple[int, int] = (0, 1),
                  objective: Objective | None = None, windows: torch.Tensor | None = None
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        cal = self.calibration
        stats = collect(self.model, targets, chosen_windows(self.windows, cal, share, windows),
                        batch_size=cal.batch_size, moments=False,
                        checkpoint_layers=cal.checkpoint_layers, desc="gradient", objective=objective)
        return stats.loss, stats.gradients

    def loss(self, windows: torch.Tensor) -> float:
        return collect(self.model, {}, windows, batch_size=self.calibration.batch_size, moments=False,
                       gradients=False, desc="validation").loss

    def gathered(self, store: FactorStore) -> FactorStore:
        """The factor store holding every layer (one process: the one it filled)."""
        return store


def driver_for(execution: ExecutionConfig, model: nn.Module, windows: torch.Tensor,
               calibration: CalibrationConfig) -> Driver:
    """The driver a recipe's ``execution`` asks for; under torchrun, over this process's share
    of the windows with the statistics summed across processes."""
    from zsfw.compression.streaming import LayerStreamedDriver  # it builds on this module

    def local(windows: torch.Tensor, calibration: CalibrationConfig) -> Driver:
        if execution.driver == "streamed":
            return LayerStreamedDriver(model, windows, calibration, execution.offload)
        return InMemoryDriver(model, windows, calibration)

    if not distributed.launched():
        return local(windows, calibration)
    distributed.join(next(model.parameters()).device)
    mine, calibration, n_grad = distributed.share(windows, calibration)
    return distributed.DistributedDriver(local(mine, calibration), windows, n_grad)
