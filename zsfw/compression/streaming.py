"""The layer-streamed driver: the exact two-sweep calibration pass, one decoder layer at a time.

C and G are sums over every window, so in the usual window-major order every layer's statistics
complete only at the very end. Here the order is layer-major:

1. capture, per window shape and per layer, the arguments the model passes to each decoder layer
   (masks, rotary embeddings: they differ per layer type in some models) and the input of the
   first layer;
2. forward sweep, layer by layer over all windows, without gradients: each boundary's hidden
   states are stored;
3. turn: ∂loss/∂(last boundary) from the model's own tail (final norm, head, loss function: the
   decoder layers pass their stored outputs through), checked against ``model(ids).loss``;
4. backward sweep, last layer first: recompute the layer from its stored input (its inputs'
   second moments C accumulate there), backpropagate the stored output gradient, and the layer's
   C and G are complete: its groups are handed on at once (the factorize step turns them into
   SVDs and scores and drops them) and its boundary freed. Only one layer's C and G are ever held.

Same windows, micro-batches and summation order per weight as ``InMemoryDriver``, so the
statistics equal its own (tested bit for bit). The boundaries wait in host memory, or on disk
with ``offload: disk`` (one safetensors file per boundary and micro-batch in the spill folder,
removed as the backward sweep passes it). With a lazily loaded model (``zsfw.residency``) each
sweep holds one decoder layer's weights at a time.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from zsfw.compression.driver import InMemoryDriver, InMemoryPass, chosen_windows
from zsfw.compression.layers import hidden_of, layer_arguments, owners, passthrough
from zsfw.compression.statistics import (GroupStatistics, Objective, InputMoments, checked_gradient, frozen,
                                         gradient_windows, loss_function, mean_loss, summed_gradient, widen)
from zsfw._fs import spill_root, work_folder
from zsfw.compression.factor_store import spilling
from zsfw.compression.transfer import to_device, to_host
from zsfw.errors import CalibrationError
from zsfw.residency import decoder_layers, residency
from zsfw.recipe import CalibrationConfig


class _StreamedPass(InMemoryPass):
    """The in-memory pass's bookkeeping, with the statistics gathered in the two sweeps."""

    def __iter__(self) -> Iterator[GroupStatistics]:
        d = self.driver
        if not (self.moments or self.gradients):  # nothing to measure: no pass at all
            yield from super().__iter__()
            return
        model, cal = d.model, d.calibration
        layers = decoder_layers(model)
        owner = owners(self.targets, layers)
        batches = [d.windows[i:i + cal.batch_size] for i in range(0, d.windows.shape[0], cal.batch_size)]
        n_grad = gradient_windows(d.windows, cal.gradient_samples, self.gradients)
        boundaries = Boundaries(d.offload, next(model.parameters()).device)
        moments = None
        self.wide: dict[str, torch.Tensor] = {}  # 16-bit layers' G, summed in fp32
        with frozen(model):
            try:
                calls = self._capture(layers, batches, boundaries)
                self._forward(layers, len(batches), boundaries, calls)
                with passthrough(layers, [None]):  # the probe checks the head only
                    loss_of = loss_function(model, d.windows[:1, :32])
                grads_out = self._turn(layers, batches, boundaries, loss_of, n_grad)
                self.tokens = d.windows.numel()  # every token passes every layer
                if self.moments:  # accumulated in the backward sweep's recomputation
                    moments = InputMoments(self.targets, torch.float64)
                    moments.tokens = self.tokens
                with residency(model).outside_released(model):  # embeddings and head: not needed now
                    yield from self._backward(layers, owner, boundaries, calls, grads_out, moments, n_grad)
            finally:
                if moments:
                    moments.remove()
                boundaries.close()

    def _capture(self, layers, batches, boundaries: "Boundaries") -> list[list[tuple]]:
        """Every layer's call arguments per micro-batch, and the first layer's input as boundary 0."""
        calls: list[list[tuple]] = []
        for b, batch in enumerate(batches):
            hidden, batch_calls = layer_arguments(self.driver.model, layers, to_device(batch, boundaries.device))
            boundaries.put(0, b, hidden)
            calls.append(batch_calls)
        return calls

    def _forward(self, layers, n_batches: int, boundaries: "Boundaries", calls) -> None:
        weights = residency(self.driver.model)
        for i, layer in enumerate(tqdm(layers, desc="forward sweep", unit="layer")):
            with weights.holding(i), torch.no_grad():
                for b in range(n_batches):
                    args, kwargs = calls[b][i]
                    boundaries.put(i + 1, b, hidden_of(layer(boundaries.get(i, b), *args, **kwargs)))

    def _turn(self, layers, batches, boundaries: "Boundaries", loss_of, n_grad) -> list[torch.Tensor | None]:
        """∂loss/∂(last boundary) per gradient micro-batch, from the model's own tail; sets the loss."""
        d, device = self.driver, next(self.driver.model.parameters()).device
        grad_tokens = n_grad * (d.windows.shape[1] - 1)
        grads: list[torch.Tensor | None] = []
        losses: list[tuple[int, int, torch.Tensor]] = []
        start = 0
        for b, batch in enumerate(batches):
            hidden = boundaries.get(len(layers), b)
            if start < n_grad and start + batch.shape[0] > n_grad:
                raise CalibrationError("the streamed driver needs calibration.gradient_samples to be "
                                       "a multiple of calibration.batch_size")
            grad = start < n_grad
            leaf = hidden.detach().requires_grad_(grad)
            ids = to_device(batch, device)
            with torch.set_grad_enabled(grad), passthrough(layers, [leaf]):
                loss = loss_of(d.model, ids)
                if grad:
                    scored = batch.numel() - batch.shape[0]
                    (loss * scored / grad_tokens).backward()
            if start == 0:
                self._check_turn(loss, loss_of, ids)
            losses.append((start, batch.numel() - batch.shape[0], loss.detach()))
            grads.append(leaf.grad if grad else None)
            start += batch.shape[0]
        self.loss = mean_loss(losses)
        return grads

    def _check_turn(self, streamed: torch.Tensor, loss_of, batch: torch.Tensor) -> None:
        """Refuse a model whose layer-by-layer loss is not its own loss (once per pass)."""
        with torch.no_grad(), residency(self.driver.model).sequential():
            own = loss_of(self.driver.model, batch)
        if not torch.allclose(streamed.detach(), own, rtol=1e-5, atol=1e-6):
            raise CalibrationError(f"{type(self.driver.model).__name__} cannot be streamed layer by "
                                   f"layer (loss {streamed.item():.6f} vs its own {own.item():.6f}); "
                                   f"use execution.driver 'memory'")

    def _backward(self, layers, owner, boundaries, calls, grads_out, moments, n_grad) -> Iterator[GroupStatistics]:
        """Layer by layer, last first: each window batch's layer recomputed from its stored input
        (C accumulates there, so only this layer's C is ever held), the gradient windows
        backpropagated (G complete), and the layer's groups handed on."""
        weights = residency(self.driver.model)
        for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="backward sweep", unit="layer"):
            mine = [name for name, layer in owner.items() if layer == i]
            with weights.holding(i):
                grads_out = self._backward_layer(layers[i], i, mine, boundaries, calls, grads_out, moments, n_grad)
                groups: dict[str, list[str]] = {}
                for name in mine:
                    groups.setdefault(moments.group_of[name] if moments else name, []).append(name)
                for group, members in groups.items():
                    yield self._group(group, members, moments)

    def _backward_layer(self, layer, i, mine, boundaries, calls, grads_out, moments, n_grad) -> list:
        """∂loss/∂(input of layer i) per batch, after accumulating its targets' C and G."""
        for name in mine:
            self.targets[name].weight.requires_grad_(n_grad > 0)
            self.targets[name].weight.grad = None
        grads_in = []
        for b, grad in enumerate(grads_out):
            if moments:
                moments.new_batch(0)
            args, kwargs = calls[b][i]
            if grad is None:
                if moments:  # a window without gradient: recomputed for its C only
                    with torch.no_grad():
                        layer(boundaries.get(i, b), *args, **kwargs)
                grads_in.append(None)
                continue
            x = boundaries.get(i, b).detach().requires_grad_(True)
            hidden_of(layer(x, *args, **kwargs)).backward(grad)
            grads_in.append(x.grad)
            widen(self.targets, mine, self.wide)
        boundaries.drop(i + 1)  # this boundary is done with
        for name in mine:
            self.targets[name].weight.requires_grad_(False)
        if moments:
            moments.scratch.clear()  # the XᵀX buffers: not needed while the groups are factorized
        return grads_in

    def _group(self, group: str, members: list[str], moments) -> GroupStatistics:
        covariance = moments.covariance(group) if moments else None  # a non-finite input: named first
        gradients = {}
        for name in members:
            if self.gradients:
                gradients[name] = checked_gradient(name, summed_gradient(self.targets, name, self.wide))
            self.targets[name].weight.grad = None
        return GroupStatistics(group, members, covariance, gradients)


class Boundaries:
    """Each boundary's hidden states per micro-batch, in host memory or on disk (``offload``),
    handed back on the model's ``device``."""

    def __init__(self, offload: str, device: torch.device) -> None:
        self.device = device
        with spilling("hidden states"):
            self.folder = work_folder(spill_root(), "boundaries-") if offload == "disk" else None
        self._held: dict[tuple[int, int], torch.Tensor] = {}

    def _path(self, i: int, b: int) -> Path:
        return self.folder / f"{i:05d}-{b:05d}.safetensors"

    def put(self, i: int, b: int, hidden: torch.Tensor) -> None:
        if self.folder is None:
            self._held[(i, b)] = hidden.detach().cpu()  # the same tensor on a CPU model
        else:
            with spilling("hidden states"):
                save_file(to_host({"hidden": hidden}), self._path(i, b))

    def get(self, i: int, b: int) -> torch.Tensor:
        if self.folder is None:
            return self._held[(i, b)].to(self.device)
        return to_device(load_file(self._path(i, b))["hidden"], self.device)

    def drop(self, i: int) -> None:
        """Forget boundary ``i`` of every micro-batch."""
        for key in [k for k in self._held if k[0] == i]:
            del self._held[key]
        if self.folder is not None:
            for path in self.folder.glob(f"{i:05d}-*.safetensors"):
                path.unlink()

    def close(self) -> None:
        self._held.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class LayerStreamedDriver(InMemoryDriver):
    """The two-sweep, layer-by-layer pass (see the module docstring), for the statistics and for
    the gradients the corrector and model-aware allocators ask for."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, calibration: CalibrationConfig,
                 offload: str = "memory") -> None:
        super().__init__(model, windows, calibration)
        self.offload = offload

    def statistics(self, targets: dict[str, nn.Linear], moments: bool, gradients: bool) -> _StreamedPass:
        return _StreamedPass(self, targets, moments, gradients)

    def gradients(self, targets: dict[str, nn.Linear], share: tuple[int, int] = (0, 1),
                  objective: Objective | None = None, windows: torch.Tensor | None = None
                  ) -> tuple[float, dict[str, torch.Tensor]]:
        """The loss and ∂L/∂W over the gradient windows, or other ``windows``, or a share of
        them: one forward and one backward sweep. The loss is the model's own: the sweep turns at
        its tail."""
        if objective is not None:
            raise CalibrationError("a training objective other than the model's next-token loss (e.g. "
                                   "refine's loss: distill) needs execution.driver: memory, not streamed")
        windows = chosen_windows(self.windows, self.calibration, share, windows)
        calibration = self.calibration.model_copy(update={"samples": windows.shape[0], "gradient_samples": None})
        sweep = LayerStreamedDriver(self.model, windows, calibration, self.offload)
        found: dict[str, torch.Tensor] = {}
        passed = sweep.statistics(targets, False, True)
        for group in passed:
            found.update(group.gradients)
        return passed.loss, found
