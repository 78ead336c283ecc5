"""Truncate: every target becomes what the plan says, in the storage format's modules.

A layer the plan keeps dense gets the format's dense module; a low-rank layer gets
B = U_k Σ_k^½ and A = Σ_k^½ V_kᵀ S⁻¹ of its kept components, built into the format's low-rank
module, or handed to the correction step (which builds the modules once it is done).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from zsfw.allocation import Allocation, AllocationPlan
from zsfw.compression.linalg import lowrank_factors
from zsfw.compression.store import FactorStore
from zsfw.interfaces import StorageFormat


def kept_factors(store: FactorStore, name: str, kept: Allocation,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out×k) and A (k×in), float64, of the components ``kept`` of layer ``name``."""
    U, Vh = store.svd(name, device)
    return lowrank_factors(U, store.layers[name].sigma.to(device), Vh, store.whitener(name, device), kept)


def truncate(model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
             store: FactorStore, storage: StorageFormat, correction=None) -> None:
    """Replace every target of ``model`` as ``plan`` says; with ``correction`` (a
    ``zsfw.compression.correct.Correction``) low-rank layers go to it as dense rank-k weights."""
    for name, linear in tqdm(targets.items(), desc="truncate", unit="layer"):
        if plan.is_dense(name):
            model.set_submodule(name, storage.dense_module(linear))
            continue
        B, A = kept_factors(store, name, plan[name], linear.weight.device)
        if correction is not None:
            correction.install(name, B, A)
        else:
            model.set_submodule(name, storage.lowrank_module(B, A, linear.bias))
