"""What a calibration pass measures, layer by layer: input second moments and gradients.

For every target layer the pass collects C = E[x xᵀ] of its input (XᵀX of each micro-batch in
the activation dtype, summed in float64, divided by the token count) and G = ∂L/∂W of the mean
next-token loss. Targets that read the same input tensor (q/k/v, gate/up) share one C: the
grouping is found by tensor identity during the pass, never from module names. Only target
weights require gradients; windows beyond ``gradient_samples`` run forward only.

This module holds the per-layer arithmetic (hooks, loss functions) and ``collect``, the pass
over a whole model in memory; who drives windows through the model is ``zsfw.compression.driver``.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from zsfw.compression.transfer import to_device
from zsfw.errors import CalibrationError, NonFiniteError
from zsfw.residency import decoder_layers


@dataclass
class GroupStatistics:
    """The complete statistics of one input group (the targets that read one input tensor)."""

    group: str
    members: list[str]
    covariance: torch.Tensor | None  # C (in×in, float64); None when not whitening
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # member -> G (out×in)

    def take_covariance(self) -> torch.Tensor | None:
        """C, handed over: the group no longer holds it, so whoever takes it can free it."""
        covariance, self.covariance = self.covariance, None
        return covariance


@dataclass
class CalibrationStatistics:
    """Second moments by input group, gradients by layer, and the calibration loss."""

    covariances: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> C (in×in)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> target names
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)  # target -> G (out×in)
    tokens: int = 0
    loss: float = float("nan")

    def group_of(self, name: str) -> str:
        return next(g for g, members in self.groups.items() if name in members)


SCRATCH_ELEMENTS = 1 << 22
"""Elements of the XᵀX row-block buffer (16 MB in fp32)."""


def _block_rows(width: int) -> int:
    """Rows per block of the XᵀX upper triangle: at least 8 blocks, within the scratch buffer."""
    return max(1, min(SCRATCH_ELEMENTS // width, -(-width // 8)))


class InputMoments:
    """Forward pre-hooks that accumulate XᵀX once per distinct input tensor."""

    def __init__(self, targets: dict[str, nn.Linear], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.finite: dict[str, torch.Tensor] = {}  # group -> whether its inputs were all finite (on the device)
        self.group_of: dict[str, str] = {}
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) -> (input, group)
        self.scratch: dict[tuple, torch.Tensor] = {}
        self.tokens = 0
        self.active = True  # off while backward recomputes checkpointed layers
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in targets.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.active:
                return
            x = args[0]
            if id(x) in self.seen and self.seen[id(x)][0] is x:
                group = self.seen[id(x)][1]
            else:
                group = name
                self._accumulate(name, x)
            if self.group_of.setdefault(name, group) != group:
                raise CalibrationError(
                    f"{name!r} shared its input with {self.group_of[name]!r} in one batch and "
                    f"with {group!r} in another; the model's data flow changes between batches")
            self.seen[id(x)] = (x, group)

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        # whether the inputs are finite stays on the device until the group is handed over
        # (``check_finite``): reading it back at every call would make the host wait each time
        finite = torch.isfinite(x).all()
        self.finite[name] = self.finite[name].logical_and_(finite) if name in self.finite else finite
        # XᵀX is symmetric: only its upper triangle is summed (``covariance`` mirrors it), a block
        # of rows at a time (at least 8 blocks: ≈ 0.56 of the full product's work) through one
        # reused buffer per (width, dtype), then into the float64 sum: no per-batch temporaries
        # (the allocator would keep them as fragmented heap), ~16 MB of buffer at most.
        n = x.shape[-1]
        rows = _block_rows(n)
        key = (n, x.dtype, x.device)
        if key not in self.scratch:
            self.scratch[key] = torch.empty(rows * n, dtype=x.dtype, device=x.device)
        if name not in self.sums:
            self.sums[name] = torch.zeros(n, n, dtype=self.dtype, device=x.device)
        total, scratch = self.sums[name], self.scratch[key]
        for i in range(0, n, rows):
            r = min(rows, n - i)
            block = scratch[: r * (n - i)].view(r, n - i)
            total[i:i + r, i:] += torch.mm(x[:, i:i + r].T, x[:, i:], out=block)

    def check_finite(self, groups: list[str] | None = None) -> None:
        """Refuse non-finite inputs of ``groups`` (all by default), naming the first one's layer;
        one read of the device's flags for them all."""
        groups = list(self.finite) if groups is None else groups
        flags = torch.stack([self.finite[g] for g in groups]).tolist() if groups else []
        bad = next((g for g, ok in zip(groups, flags) if not ok), None)
        if bad is not None:
            raise NonFiniteError(f"non-finite values in the input of {bad!r}")

    def covariance(self, group: str) -> torch.Tensor:
        """C = E[x xᵀ] of ``group``, handed over (its upper-triangle sum mirrored, over the tokens);
        its inputs checked finite first."""
        self.check_finite([group])
        del self.finite[group]
        total = self.sums.pop(group)
        n = total.shape[0]
        rows = _block_rows(n)
        for i in range(0, n, rows):  # block row by block row: small temporaries only
            r = min(rows, n - i)
            total[i:i + r, :i] = total[:i, i:i + r].T
            square = total[i:i + r, i:i + r]
            square.copy_(square.triu() + square.triu(1).T)
        return total.div_(self.tokens)

    def new_batch(self, tokens: int) -> None:
        self.seen.clear()
        self.tokens += tokens

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.seen.clear()
        self.scratch.clear()


@contextmanager
def _checkpointed(layers: list[nn.Module]) -> Iterator[None]:
    """Activation checkpointing of ``layers`` for the duration of the block."""
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward shows through again


def next_token_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` (the loss every score refers to)."""
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_next_token_loss(model: nn.Module, input_ids: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """``next_token_loss`` with the vocabulary projection run ``chunk`` positions at a time.

    Each chunk's logits are recomputed in the backward pass instead of being kept, so the
    (tokens × vocabulary) logits, their log-softmax and their gradient never exist whole: on a
    49K-token vocabulary and 512 tokens that is ~300 MB less at the peak.
    """
    base = getattr(model, model.base_model_prefix)
    hidden = base(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    head = model.get_output_embeddings()
    total = sum(checkpoint(_chunk_nll, head, hidden[i:i + chunk], labels[i:i + chunk],
                           use_reentrant=False)
                for i in range(0, labels.numel(), chunk))
    return total / labels.numel()


Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""A training loss of (model, input ids): a per-token mean, like ``next_token_loss``."""


def distillation_loss(teacher: nn.Module) -> Objective:
    """A loss like ``next_token_loss`` that is instead the mean over next-token positions of
    KL(teacher ‖ model): the whole distribution of the teacher's prediction at every position,
    not only the token that came next (far more signal per token when few windows are at hand)."""
    def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:  # at least fp32
        z = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        return z.to(torch.promote_types(z.dtype, torch.float32))

    def loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # KL = Σ p log p − Σ p·z + Σ logsumexp(z): few passes over the logits
            log_p = F.log_softmax(logits(teacher, input_ids), -1)
            p = log_p.exp()
            negentropy = (p * log_p).sum()
        z = logits(model, input_ids)
        positions = input_ids.numel() - input_ids.shape[0]
        return (negentropy - (p * z).sum() + torch.logsumexp(z, -1).sum()) / positions
    return loss


def autocast(objective: Objective, dtype: torch.dtype) -> Objective:
    """``objective`` with its forward passes (a teacher's included) autocast to ``dtype`` on the
    ids' device: the matmuls run in ``dtype`` where the hardware has it (bf16 on AVX-512-BF16/AMX
    CPUs and on GPUs: about half the time of fp32), while parameters, their gradients and the
    softmax stay in fp32. The backward pass follows the forward's dtypes on its own."""
    def loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, dtype=dtype):
            return objective(model, input_ids)
    return loss


def loss_function(model: nn.Module, probe: torch.Tensor):
    """The chunked loss when it agrees with the model's own on ``probe`` ids, else the plain one.

    Models whose head does more than a linear projection (logit soft-capping, scaling) fail the
    check and keep their own loss, so the chunked path can never change what is measured.
    """
    try:
        with torch.no_grad():
            chunked = chunked_next_token_loss(model, probe)
            plain = next_token_loss(model, probe)
    except (AttributeError, TypeError):
        return next_token_loss
    return chunked_next_token_loss if torch.allclose(chunked, plain, rtol=1e-4, atol=1e-5) else next_token_loss


def mean_loss(losses: list[tuple[int, int, torch.Tensor]]) -> float:
    """The mean next-token loss of a pass from its micro-batches' (first window, scored tokens,
    loss), the losses still on the device: read back together once the pass is over, not twice a
    micro-batch; a non-finite one is an error naming its first window."""
    values = torch.stack([loss for _, _, loss in losses]).tolist() if losses else []
    total, tokens = 0.0, 0
    for (start, scored, _), value in zip(losses, values):
        if not math.isfinite(value):
            raise NonFiniteError(f"calibration loss is {value} at window {start}")
        total += value * scored
        tokens += scored
    return total / max(tokens, 1)


def gradient_windows(windows: torch.Tensor, gradient_samples: int | None, gradients: bool) -> int:
    """How many of the first windows also get a backward pass (all by default, none without
    gradients)."""
    if not gradients:
        return 0
    return windows.shape[0] if gradient_samples is None else min(gradient_samples, windows.shape[0])


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with no parameter requiring gradients for the block; every
    parameter's ``requires_grad`` and ``grad`` and the training mode are restored after it, by
    name: no reference to a parameter is kept, so a lazily loaded model can let go of its tensors
    inside the block (and those it re-reads get their flags back)."""
    saved = {name: (p.requires_grad, p.grad) for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            if name in saved:
                flag, grad = saved[name]
                p.requires_grad_(flag)
                p.grad = grad
        model.train(was_training)


def widen(targets: dict[str, nn.Linear], names: Iterable[str], wide: dict[str, torch.Tensor]) -> None:
    """Each 16-bit weight's gradient of the micro-batch just run added into its fp32 sum in
    ``wide`` (and cleared), so that G is summed in fp32 whatever the layer's dtype."""
    for name in names:
        weight = targets[name].weight
        if weight.grad is not None and weight.dtype in (torch.float16, torch.bfloat16):
            if name in wide:
                wide[name].add_(weight.grad)
            else:
                wide[name] = weight.grad.float()
            weight.grad = None


def summed_gradient(targets: dict[str, nn.Linear], name: str, wide: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A target's G: its fp32 sum from ``widen`` (handed over), or its weight's own gradient."""
    return wide.pop(name) if name in wide else targets[name].weight.grad


def checked_gradient(name: str, grad: torch.Tensor | None) -> torch.Tensor:
    """A target's accumulated gradient, or an error saying why it is unusable."""
    if grad is None:
        raise CalibrationError(f"target {name!r} received no gradient: it does not affect the "
                               f"loss; leave it out with the recipe's ignore")
    if not torch.isfinite(grad).all():
        raise NonFiniteError(f"non-finite gradient for the weight of {name!r}")
    return grad


def collect(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    windows: torch.Tensor,
    gradient_samples: int | None = None,
    batch_size: int = 1,
    moments: bool = True,
    gradients: bool = True,
    accumulate_dtype: torch.dtype = torch.float64,
    checkpoint_layers: bool = False,
    desc: str = "calibration",
    objective: Objective | None = None,
) -> CalibrationStatistics:
    """Run ``windows`` through ``model`` once, gathering what the requested statistics need.

    The gradient is that of the mean token loss over the first ``gradient_samples`` windows
    (all by default), accumulated over micro-batches of ``batch_size`` windows; ``objective``, a
    per-token mean like ``next_token_loss``, replaces the model's own next-token loss. With
    ``checkpoint_layers`` the decoder layers keep only their inputs for the backward pass and
    recompute the rest: about one more forward pass of time for far less activation memory.
    """
    n_grad = gradient_windows(windows, gradient_samples, gradients)
    device = next(model.parameters()).device
    layers = decoder_layers(model) if checkpoint_layers else []
    stats = CalibrationStatistics()
    losses: list[tuple[int, int, torch.Tensor]] = []  # read back once, after the pass
    hooks = None
    wide: dict[str, torch.Tensor] = {}  # 16-bit layers' G, summed in fp32
    with frozen(model):
        try:
            loss_of = objective or (loss_function(model, windows[:1, :32].to(device)) if n_grad else next_token_loss)
            hooks = InputMoments(targets, accumulate_dtype) if moments else None
            for module in targets.values():
                module.weight.requires_grad_(n_grad > 0)
                module.weight.grad = None
            grad_tokens = n_grad * (windows.shape[1] - 1)
            for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch",
                              total=-(-windows.shape[0] // batch_size)):
                batch = to_device(windows[start:start + batch_size], device)
                with_grad = batch[: max(0, n_grad - start)]
                without = batch[with_grad.shape[0]:]
                for part, grad in ((with_grad, True), (without, False)):
                    if part.shape[0] == 0:
                        continue
                    if hooks:
                        hooks.new_batch(part.numel())
                    with torch.set_grad_enabled(grad), _checkpointed(layers if grad else []):
                        loss = loss_of(model, part)
                        if grad:
                            if hooks:
                                hooks.active = False
                            (loss * (part.numel() - part.shape[0]) / grad_tokens).backward()
                            widen(targets, targets, wide)
                            if hooks:
                                hooks.active = True
                    losses.append((start, part.numel() - part.shape[0], loss.detach()))
            grads = {name: summed_gradient(targets, name, wide) for name in targets} if n_grad else {}
        finally:
            if hooks:
                hooks.remove()
    if hooks:
        hooks.check_finite()  # a non-finite input is named before the loss it makes non-finite
    stats.loss = mean_loss(losses)
    if hooks:
        stats.tokens = hooks.tokens
        for name, group in hooks.group_of.items():
            stats.groups.setdefault(group, []).append(name)
        for group in list(hooks.sums):
            stats.covariances[group] = hooks.covariance(group)
    stats.gradients = {name: checked_gradient(name, grad) for name, grad in grads.items()}
    return stats
