"""Decoder-layer helpers the drivers share: a layer's output hidden states, the arguments each
layer is called with, a forward stopped after a layer, layers that pass stored outputs through,
and which decoder layer holds each target."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from zsfw.errors import CalibrationError


def hidden_of(output: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (some layers return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def layer_calls(layers: list[nn.Module]) -> Iterator[list[tuple[tuple, dict]]]:
    """Record each layer's call arguments (one entry per layer) during the block."""
    calls: list[tuple[tuple, dict]] = [((), {})] * len(layers)

    def recorder(i: int):
        def hook(module, args, kwargs):
            calls[i] = (args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class Stopped(Exception):
    """Raised by ``stop_after``'s hook to end a model's forward early."""


@contextmanager
def stop_after(layer: nn.Module) -> Iterator[None]:
    """End the model's forward right after ``layer`` (the block ends there, no error)."""
    def stop(module, args, output):
        raise Stopped

    handle = layer.register_forward_hook(stop)
    try:
        yield
    except Stopped:
        pass
    finally:
        handle.remove()


@contextmanager
def passthrough(layers: list[nn.Module], outputs: list[torch.Tensor]) -> Iterator[None]:
    """Every decoder layer returns its stored output instead of computing it (the last one the
    tensor in ``outputs[0]``), so running the model computes only its embedding and its tail."""
    last = layers[-1]

    def skip(module, args, kwargs, output):
        return outputs[0] if module is last else output

    def no_compute(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    handle = last.register_forward_hook(skip, with_kwargs=True)
    for layer in layers:
        layer.forward = no_compute
    try:
        yield
    finally:
        handle.remove()
        for layer in layers:
            del layer.forward  # the class's forward shows through again


def layer_arguments(model: nn.Module, layers: list[nn.Module], batch: torch.Tensor
                    ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """The first decoder layer's input for ``batch`` and every layer's other call arguments
    (masks, rotary embeddings: ``layer(hidden, *args, **kwargs)`` runs it), from one cheap run of
    the model, every layer passing its input through, stopped after the last layer (no final
    norm, no logits)."""
    with torch.no_grad(), layer_calls(layers) as recorded, passthrough(layers, [None]), stop_after(layers[-1]):
        model(input_ids=batch, use_cache=False)
    hidden = recorded[0][0][0] if recorded[0][0] else recorded[0][1]["hidden_states"]
    return hidden, [(args[1:] if args else (), {k: v for k, v in kwargs.items() if k != "hidden_states"})
                    for args, kwargs in recorded]


def owners(targets: dict[str, nn.Module], layers: list[nn.Module], who: str = "the streamed driver",
           remedy: str = "use execution.driver 'memory' or leave them out with ignore") -> dict[str, int]:
    """The index of the decoder layer holding each target; targets outside them are refused
    (``who`` works inside them only; ``remedy`` says what to do instead)."""
    index = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    found = {name: index.get(id(module)) for name, module in targets.items()}
    outside = [name for name, i in found.items() if i is None]
    if not layers or outside:
        raise CalibrationError(f"{who} works on layers inside the decoder blocks only; "
                               f"{outside[:3] or 'no decoder blocks were found'} are outside: {remedy}")
    return found
