"""Copies between host memory and the device the layers compute on.

With a GPU, host buffers are page-locked (pinned) and the copies do not block the host: a
page-locked buffer is what lets a copy run asynchronously at the bus's full speed, where pageable
memory makes every copy a wait. On the CPU the same calls are no copies at all: whether to pin is
a flag chosen by the device's type, so the CPU runs (and tests) the code the GPU runs.
"""

from __future__ import annotations

import torch


def pinned(device: torch.device) -> bool:
    """Whether host memory exchanged with ``device`` is page-locked: only for a GPU."""
    return device.type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through page-locked memory without blocking
    the host (the device's later work on its stream waits for the copy)."""
    pin = pinned(device) and tensor.device.type == "cpu"
    if pin and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=pin)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous host copies of ``tensors``, ready to read (to write a file): from a GPU every
    copy is started into page-locked memory, then one wait covers them all; host tensors are
    returned as they are."""
    devices = {t.device for t in tensors.values() if pinned(t.device)}
    host = {key: t.detach().contiguous().to("cpu", non_blocking=pinned(t.device)) for key, t in tensors.items()}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()
    return host
