"""Truncate: every target becomes what the plan says, in the modules of its storage format.

A layer the plan keeps dense gets its format's dense module; a low-rank layer gets
B = U_k Σ_k^½ and A = Σ_k^½ V_kᵀ S⁻¹ of its kept components (read from the factor store), built
into the format's low-rank module, or handed to the correction step (which builds the modules
once it is done).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from zsfw.budget import Allocation, AllocationPlan, variant_of
from zsfw.compression.factor_store import FactorStore
from zsfw.errors import AllocationError
from zsfw.residency import residency


def kept_factors(store: FactorStore, name: str, kept: Allocation,
                 device: torch.device, variant: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """B (out×k) and A (k×in), float64, of the components ``kept`` of layer ``name`` (of its
    residual on base ``variant`` when one is named)."""
    B, A = store.factors(name, device, variant)
    needed = kept if isinstance(kept, int) else int(kept.max()) + 1 if kept.numel() else 0
    if needed > B.shape[1]:
        raise AllocationError(f"the plan keeps component {needed - 1} of {name!r}, but only its top "
                              f"{B.shape[1]} were kept for truncation; an allocator that keeps other "
                              f"than the top components declares keeps_any_component = True")
    index = slice(None, kept) if isinstance(kept, int) else kept
    return B[:, index].to(torch.float64), A[index].to(torch.float64)


def truncate(model: nn.Module, targets: dict[str, nn.Linear], plan: AllocationPlan,
             store: FactorStore, correction=None, writer=None, check=None) -> None:
    """Replace every target of ``model`` as ``plan`` says, each in the plan's format for it; with ``correction`` (a
    ``zsfw.compression.correct.Correction``) low-rank layers go to it as dense rank-k weights.

    A lazily loaded model is truncated one decoder layer at a time, each written to ``writer``
    (a ``zsfw.checkpoint.save.CheckpointWriter``) before its memory goes back. ``check`` (a
    ``zsfw.compression.finite.FiniteCheck``) looks at the truncated model's output, a lazily
    loaded model's one layer at a time before it is written.
    """
    weights = residency(model)
    with tqdm(total=len(targets), desc="truncate", unit="layer") as bar:  # closed before an error is printed
        for prefix, names in weights.parts(targets):
            for name in names:
                linear = targets[name]
                new = linear
                storage = plan.format(name)
                variant = variant_of(storage)
                if plan.is_dense(name):
                    new = storage.dense_module(linear)
                elif variant:  # the quantized base plus the kept residual components
                    B, A = kept_factors(store, name, plan[name], linear.weight.device, variant)
                    base = storage.base_from_tensors(store.base(variant, name, linear.weight.device))
                    new = storage.hybrid_module(base, B, A, linear.bias)
                else:
                    B, A = kept_factors(store, name, plan[name], linear.weight.device)
                    if correction is not None:
                        correction.install(name, B, A)
                    else:
                        new = storage.lowrank_module(B, A, linear.bias)
                if new is not linear:
                    model.set_submodule(name, new)
                    weights.retire(linear)  # its weights are not kept alive by ``targets``
                bar.update()
            if check is not None:
                check.after("truncation", prefix)
            if writer is not None and prefix is not None:
                writer.add_layer(model, prefix)
