"""Paired inputs, decoder layer by decoder layer: what sequential error compensation fits on.

For each decoder layer in order, and each group of the given layers in it that read the same
input (q/k/v; gate/up), the inputs x of the uncompressed model and x̂ of the model as it is now,
over the same calibration tokens, reduced to their second moments E[x x̂ᵀ] and E[x̂ x̂ᵀ]
(float64). Both models' hidden states wait at the current decoder layer's input (two tensors of
windows × tokens × width); a group's inputs come from running that layer up to the group. The
pass is lazy: what the caller installs before asking for the next group shapes every input
after it, and a decoder layer's output is computed only once its last group has been handed out
and the caller is done with it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from zsfw.compression.layers import Stopped, hidden_of, layer_arguments, owners
from zsfw.residency import decoder_layers


@dataclass
class PairedMoments:
    """One input group's paired second moments (``cross`` = E[x x̂ᵀ], ``own`` = E[x̂ x̂ᵀ])."""

    layer: int  # the decoder layer's index
    names: list[str]  # the layers that read this input, in call order
    cross: torch.Tensor  # float64, in × in
    own: torch.Tensor  # float64, in × in
    tokens: int
    last: bool  # the last group of its decoder layer: the layer's output is computed after it


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input a module was called with (its first argument, positional or not)."""
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def _input_of(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The input ``module`` is called with, the forward stopped right there."""
    seen: list[torch.Tensor] = []

    def grab(mod, args, kwargs):
        seen.append(_first_input(args, kwargs))
        raise Stopped  # the input is in hand: the rest of the forward is not needed

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield seen
    except Stopped:
        pass
    finally:
        handle.remove()


def _groups(layer: nn.Module, names: list[str], model: nn.Module, hidden: torch.Tensor, call: tuple) -> list[list[str]]:
    """``names`` (layers inside decoder ``layer``) grouped by the input they are called with, in
    call order, from one run of the layer (the inputs are held, so no two are confused)."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: order.append((name, _first_input(args, kwargs))),
        with_kwargs=True) for name in names]
    try:
        with torch.no_grad():
            layer(hidden, *call[0], **call[1])
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[int, list[str]] = {}
    for name, x in order:
        groups.setdefault(id(x), []).append(name)
    return list(groups.values())


def paired_moments(model: nn.Module, teacher: nn.Module, names: list[str], windows: torch.Tensor,
                   batch_size: int = 1) -> Iterator[PairedMoments]:
    """The paired second moments of every group of ``names`` (see the module docstring), in the
    order the model computes them; ``teacher`` is the uncompressed model (same architecture)."""
    layers, teacher_layers = decoder_layers(model), decoder_layers(teacher)
    owner = owners({name: model.get_submodule(name) for name in names}, layers, "sequential compensation",
                   "leave them out with ignore, or use another corrector")
    device = next(model.parameters()).device
    student, uncompressed, calls = [], [], []
    for start in range(0, windows.shape[0], batch_size):
        hidden, call = layer_arguments(model, layers, windows[start:start + batch_size].to(device))
        student.append(hidden)
        uncompressed.append(hidden)  # the embeddings are not compressed: the same input (never written in place)
        calls.append(call)
    for i, (layer, teacher_layer) in enumerate(zip(layers, teacher_layers)):
        mine = [name for name in names if owner[name] == i]
        groups = _groups(layer, mine, model, student[0], calls[0][i]) if mine else []
        for g, group in enumerate(groups):
            cross = own = None
            tokens = 0
            for b, call in enumerate(calls):
                x_hat = _run_to(layer, model.get_submodule(group[0]), student[b], call[i])
                x = _run_to(teacher_layer, teacher.get_submodule(group[0]), uncompressed[b], call[i])
                x, x_hat = (t.reshape(-1, t.shape[-1]).to(torch.float64) for t in (x, x_hat))
                cross = x.mT @ x_hat if cross is None else cross.addmm_(x.mT, x_hat)
                own = x_hat.mT @ x_hat if own is None else own.addmm_(x_hat.mT, x_hat)
                tokens += x.shape[0]
            yield PairedMoments(i, group, cross.div_(tokens), own.div_(tokens), tokens, g == len(groups) - 1)
        with torch.no_grad():
            for b, call in enumerate(calls):
                args, kwargs = call[i]
                student[b] = hidden_of(layer(student[b], *args, **kwargs))
                uncompressed[b] = hidden_of(teacher_layer(uncompressed[b], *args, **kwargs))


def _run_to(layer: nn.Module, module: nn.Module, hidden: torch.Tensor, call: tuple) -> torch.Tensor:
    """``module``'s input when decoder ``layer`` runs on ``hidden``."""
    with torch.no_grad(), _input_of(module) as seen:
        layer(hidden, *call[0], **call[1])
    return seen[0]
