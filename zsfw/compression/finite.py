"""Refuse to save a compressed model whose output is NaN or Inf.

After truncation (and again after correction) one calibration window runs through the compressed
model with a forward hook on every module: the first module, in the order they finish, whose
output holds NaN or Inf is named in a ``NonFiniteError``, raised before anything is saved; or,
when the caller allows a non-finite model (``compress(..., allow_non_finite=True)``,
``zsfw compress --allow-non-finite``), in a warning of the report. A lazily loaded model is never
whole in memory: truncation checks each decoder layer as it compresses it, before the layer is
written, carrying the window's hidden states from one layer to the next, and after the last
layer the model's tail (final norm, head, loss).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from zsfw.compression.layers import hidden_of, layer_arguments, passthrough
from zsfw.errors import NonFiniteError
from zsfw.residency import decoder_layers, layer_prefixes

log = logging.getLogger(__name__)


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module's output (nested tuples, lists, dicts)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):  # transformers' ModelOutput too
        for item in output.values():
            yield from _tensors(item)


@contextmanager
def _watching(module: nn.Module, prefix: str = "") -> Iterator[list[str]]:
    """For the block, a forward hook on ``module`` and every module in it: the list gets the name
    (under ``prefix``) of the first whose output holds NaN or Inf ('' for ``module`` itself)."""
    found: list[str] = []

    def watch(name: str):
        def hook(_, args, output):
            if not found and not all(bool(torch.isfinite(t).all()) for t in _tensors(output)):
                found.append(name)
        return hook

    handles = [m.register_forward_hook(watch(".".join(p for p in (prefix, name) if p)))
               for name, m in module.named_modules()]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


class FiniteCheck:
    """Whether ``model``'s output on ``window`` (1 × tokens ids) is finite after a step; what is
    found goes to ``warnings`` when ``allow`` is set, else it is a ``NonFiniteError``."""

    def __init__(self, model: nn.Module, window: torch.Tensor, allow: bool, warnings: list[str]) -> None:
        self.model, self.allow, self.warnings = model, allow, warnings
        self.window = window.to(next(model.parameters()).device)
        self._carried: tuple[torch.Tensor, list[tuple[tuple, dict]]] | None = None  # lazy: hidden, layer calls
        self._found: set[str] = set()  # the steps found non-finite (their later layers are not checked)

    def after(self, step: str, prefix: str | None = None) -> None:
        """Check the model after ``step`` ("truncation", "correction"): the whole model, or, with
        ``prefix``, only that decoder layer (on the hidden states the layers before it produced)
        and, after the last one, the model's tail."""
        if step in self._found:
            return
        if prefix is None:
            with torch.no_grad(), _watching(self.model) as found:
                self.model(input_ids=self.window, labels=self.window, use_cache=False)
        else:
            found = self._layer(prefix)
        if found:
            self._refuse(step, found[0])

    def _layer(self, prefix: str) -> list[str]:
        layers, prefixes = decoder_layers(self.model), layer_prefixes(self.model)
        if self._carried is None:
            self._carried = layer_arguments(self.model, layers, self.window)
        hidden, calls = self._carried
        i = prefixes.index(prefix)
        args, kwargs = calls[i]
        with torch.no_grad(), _watching(layers[i], prefix) as found:
            hidden = hidden_of(layers[i](hidden, *args, **kwargs))
        self._carried = hidden, calls
        if found or i < len(layers) - 1:
            return found
        with torch.no_grad(), passthrough(layers, [hidden]), _watching(self.model) as found:
            self.model(input_ids=self.window, labels=self.window, use_cache=False)  # the tail runs, the layers pass
        return found

    def _refuse(self, step: str, name: str) -> None:
        where = f"the output of {name!r}" if name else "the loss"
        message = f"after {step}, {where} is NaN or Inf on a calibration window"
        self._found.add(step)
        if not self.allow:
            raise NonFiniteError(f"{message}: the compressed model was not saved; try another ratio or "
                                 f"storage format, or pass allow_non_finite=True (zsfw compress "
                                 f"--allow-non-finite) to save it anyway")
        self.warnings.append(f"{message}; kept as asked (allow_non_finite)")
        log.warning(self.warnings[-1])
