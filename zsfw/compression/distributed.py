"""Several processes share the calibration pass and the SVDs through ``torch.distributed``.

Launched by ``torchrun --nproc_per_node=N -m zsfw compress …`` (or any script calling
``compress`` under torchrun): every process loads the model and takes every N-th calibration
window (process r: windows r, r+N, …), and runs the recipe's driver on its share. C and G are
token sums, so as each input group completes its sums are reduced to the process that owns the
group (the least loaded one by SVD cost; every process keeps the same table, since all see the
groups in the same order), which factorizes and scores it. Then every factorization goes to
process 0, which allocates, truncates and saves exactly as a single process would; the others
are done. Only ``torch.distributed`` collectives and point-to-point calls carry data: gloo
between CPU processes, NCCL between GPUs.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from zsfw.compression.statistics import GroupStatistics, Objective
from zsfw.compression.factor_store import FactorStore
from zsfw.errors import CalibrationError, DeviceError
from zsfw.protocols import LayerScores
from zsfw.recipe import CalibrationConfig


def launched() -> bool:
    """Whether this process is one of several started by torchrun (its environment says so)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank under torchrun (its environment's RANK), 0 otherwise."""
    return int(os.environ.get("RANK", "0"))


def join(device: torch.device) -> None:
    """Join the process group torchrun set up (once): NCCL for a CUDA model (bound to its GPU, so
    that NCCL starts now and a failure is reported here, not in the first reduction), else gloo;
    one that cannot start is a one-line error."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        if backend == "nccl" and not dist.is_nccl_available():
            raise RuntimeError(f"torch {torch.__version__} was built without NCCL")
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as e:  # torch's DistBackendError is a RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DeviceError(f"process {rank()} of {os.environ.get('WORLD_SIZE', '1')} could not start "
                          f"torch.distributed's {backend!r} backend on {device}: {reason}; give each "
                          f"process its own GPU (execution.device 'cuda') or run on 'cpu' (gloo)") from None


def share(windows: torch.Tensor, calibration: CalibrationConfig) -> tuple[torch.Tensor, CalibrationConfig, int]:
    """This process's windows (every world-th, from its rank), the calibration settings for
    them, and the number of gradient windows across all processes."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n_grad = windows.shape[0] if calibration.gradient_samples is None else calibration.gradient_samples
    if n_grad < world:
        raise CalibrationError(f"calibration.gradient_samples is {n_grad} for {world} processes: each "
                               f"process needs at least one gradient window")
    if windows.shape[0] < world:
        raise CalibrationError(f"{windows.shape[0]} calibration windows for {world} processes: each "
                               f"process needs at least one")
    mine = windows[rank::world]
    local_grad = len(range(rank, n_grad, world))
    return mine, calibration.model_copy(update={"samples": mine.shape[0], "gradient_samples": local_grad}), n_grad


class DistributedDriver:
    """A driver over this process's share of the windows whose statistics are summed across
    processes (see the module docstring)."""

    def __init__(self, inner, windows: torch.Tensor, gradient_windows: int) -> None:
        self.inner, self.windows, self.gradient_windows = inner, windows, gradient_windows
        self.groups: list[tuple[str, list[str], int]] = []  # every group, its members and owner

    def statistics(self, targets: dict[str, nn.Linear], moments: bool, gradients: bool) -> "_DistributedPass":
        return _DistributedPass(self, targets, moments, gradients)

    def gradients(self, targets: dict[str, nn.Linear], share: tuple[int, int] = (0, 1),
                  objective: Objective | None = None, windows: torch.Tensor | None = None
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        raise _one_process_only()

    def loss(self, windows: torch.Tensor) -> float:
        raise _one_process_only()

    def gathered(self, store: FactorStore) -> FactorStore | None:
        """Every process's factorizations in process 0's store (returned there; None elsewhere,
        where the store is closed)."""
        rank = dist.get_rank()
        for group, members, owner in self.groups:
            if owner == 0:
                continue
            if rank == owner:
                _send(store, group, members)
            elif rank == 0:
                _receive(store, group, members, owner)
        if rank == 0:
            return store
        store.close()
        return None


class _DistributedPass:
    def __init__(self, driver: DistributedDriver, targets: dict[str, nn.Linear], moments: bool,
                 gradients: bool) -> None:
        self.driver, self.targets = driver, targets
        self.inner = driver.inner.statistics(targets, moments, gradients)
        self.tokens, self.loss = 0, float("nan")

    def __iter__(self) -> Iterator[GroupStatistics]:
        d, rank, world = self.driver, dist.get_rank(), dist.get_world_size()
        length = d.windows.shape[1]
        load = [0.0] * world
        d.groups.clear()
        total_tokens = None
        total_grad, local_grad = d.gradient_windows * (length - 1), d.inner.calibration.gradient_samples * (length - 1)
        for group in self.inner:
            if total_tokens is None:  # the share's token count is known once its first group is out
                total_tokens = _summed(self.inner.tokens)
            owner = min(range(world), key=load.__getitem__)
            load[owner] += sum(_cost(self.targets[m]) for m in group.members)
            d.groups.append((group.group, group.members, owner))
            covariance = None
            if group.covariance is not None:
                covariance = group.covariance.mul_(self.inner.tokens)
                dist.reduce(covariance, dst=owner)
                covariance = covariance.div_(total_tokens)
            gradients = {}
            for name in group.members:
                if name in group.gradients:
                    summed = group.gradients[name].mul_(local_grad)
                    dist.reduce(summed, dst=owner)
                    gradients[name] = summed.div_(total_grad)
            if rank == owner:
                yield GroupStatistics(group.group, group.members, covariance, gradients)
        loss = torch.tensor([self.inner.loss * self.inner.tokens, float(self.inner.tokens)], dtype=torch.float64,
                            device=_wire())
        dist.all_reduce(loss)
        self.tokens, self.loss = int(loss[1].item()), (loss[0] / loss[1]).item()


def _one_process_only() -> CalibrationError:
    return CalibrationError("a corrector or a model-aware allocator does not run across several "
                            "processes yet: run it in one process")


def _summed(value: int) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=_wire())
    dist.all_reduce(t)
    return int(t.item())


def _wire() -> torch.device:
    """Where tensors must be to travel: the current GPU under NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _cost(linear: nn.Linear) -> float:
    """About the flops of a layer's whitened SVD (and its share of the whitening)."""
    m, n = linear.out_features, linear.in_features
    return m * n * min(m, n) + n ** 3 / 3


def _send(store: FactorStore, group: str, members: list[str]) -> None:
    whitener = store.whitener(members[0], _wire()) if store.whiteners else None
    variants = [v for v in ("", *sorted(store.variants)) if members[0] in (store.variants[v] if v else store.layers)]
    parts = [(v, name) for v in variants for name in members]  # the plain factorization and each base's residual
    factors = {part: store.factors(part[1], _wire(), part[0]) for part in parts}
    bases = {(v, name): store.base(v, name, _wire()) for v, name in parts if v}
    dist.send_object_list([{"notes": {n: store.notes.get(n, "") for n in members},
                            "whitened": members[0] in store.whitener_of,
                            "S": None if whitener is None else (tuple(whitener.shape), whitener.dtype),
                            "ranks": {part: B.shape[1] for part, (B, _) in factors.items()},
                            "layers": {(v, n): store.spectrum(n, v) for v, n in parts},
                            "bases": {part: {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
                                      for part, tensors in bases.items()}}], dst=0)
    if whitener is not None:
        dist.send(whitener.contiguous(), dst=0)
    for B, A in factors.values():
        dist.send(B.contiguous(), dst=0)
        dist.send(A.contiguous(), dst=0)
    for tensors in bases.values():
        for tensor in tensors.values():
            dist.send(tensor.contiguous(), dst=0)


def _receive(store: FactorStore, group: str, members: list[str], owner: int) -> None:
    message = [None]
    dist.recv_object_list(message, src=owner)
    info = message[0]
    if info["S"] is not None:
        shape, dtype = info["S"]
        S = torch.empty(shape, dtype=dtype, device=_wire())
        dist.recv(S, src=owner)
        store.put_whitener(group, S)
    for (variant, name), layer in info["layers"].items():
        layer: LayerScores
        r = info["ranks"][variant, name]
        B = torch.empty(layer.out_features, r, device=_wire())
        A = torch.empty(r, layer.in_features, device=_wire())
        dist.recv(B, src=owner)
        dist.recv(A, src=owner)
        store.put_layer(layer, B, A, group if info["whitened"] else None, info["notes"][name], variant)
    for (variant, name), shapes in info["bases"].items():
        tensors = {key: torch.empty(shape, dtype=dtype, device=_wire()) for key, (shape, dtype) in shapes.items()}
        for tensor in tensors.values():
            dist.recv(tensor, src=owner)
        store.put_base(variant, name, tensors)
