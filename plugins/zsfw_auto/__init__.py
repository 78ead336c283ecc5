"""``storage: auto``: each layer in the storage format, of a list, that predicts the least loss.

Formats differ per layer: an 8-bit format keeps about twice the rank of a 16-bit one for the
same bytes but adds quantization error, and its cost curve depends on the layer's shape (packed
costs k·max(m, n) words, int8 k·(m+n) bytes, pivga k(m+n) − k² numbers). ``AutoStorage`` predicts,
for every layer l, member format f and rank k (or dense), a loss

    P(l, f, k) = Σ_{i≥k} |ΔL_i|  +  κ_l · e_{l,f}(k)

where ΔL_i are the scorer's scores (the predicted loss change of dropping component i), e the
whitened norm ‖(Ŵ_f − W_k) S‖_F of what format f stores at rank k (Ŵ read back from the format's
own module, so it is measured, not assumed) and κ_l = median_i |ΔL_i| / σ_i the layer's loss per
unit of whitened norm: a dropped component is an error of whitened norm σ_i, so its score
calibrates the layer's quantization error in the same units. e is measured at the rank each
format would give the layer under a uniform allocation and scaled as √(k / k_ref) (the error of
independent roundings grows with the square root of how many numbers are stored); a dense layer's
error is measured on the dense module. A member with a quantized base (``has_base``: int4, int3, …)
stores rank k as the base plus k components of the whitened residual W − Q(W), whose remaining
error has whitened norm √(Σ_{i≥k} σ_i²) (σ the residual's singular values, rank 0 the base alone):
its predicted loss is κ_l times that, the same model as a quantized layer's. The format of each layer is the one the Lagrangian
relaxation min Σ_l min_{f,k} P(l, f, k) + λ·bytes(l, f, k) picks at the smallest λ that meets the
budget; the recipe's allocator then chooses every rank with each layer priced by its format.

zsfw's own method (no paper ships one); the model of the quantization loss is an estimate, so
compare what it gives with the single formats (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import zsfw
from zsfw import ByteBudget, LayerFactors, LayerScores, StorageFormat, fits, has_base, useful_rank

DEFAULT_FORMATS = ("bf16", "pivga", "int8", "packed")
BISECTIONS = 60


class Options:
    """What one layer can be in one format: the bytes and predicted loss of every rank it may
    keep below the format's dense cost, and of the dense layer (the last entry)."""

    def __init__(self, costs: torch.Tensor, losses: torch.Tensor) -> None:
        self.costs, self.losses = costs, losses  # float64, rank 1, 2, …, u, then dense


def effective_weight(module: nn.Module, in_features: int) -> torch.Tensor:
    """The weight a layer module applies (float64, out×in), read back by running it on the
    identity in float32 and removing its bias."""
    with torch.no_grad():
        eye = torch.eye(in_features, dtype=torch.float32)
        out = module(eye).to(torch.float64)
        bias = module(torch.zeros(1, in_features, dtype=torch.float32)).to(torch.float64)
    return (out - bias).T


def whitened_norm(error: torch.Tensor, S: torch.Tensor | None) -> float:
    """‖E S‖_F (‖E‖_F without whitening)."""
    return float(torch.linalg.matrix_norm(error if S is None else error @ S))


def sensitivity(layer: LayerScores) -> float:
    """κ: the median over components of |ΔL_i| / σ_i (0 when every σ is 0)."""
    positive = layer.sigma > torch.finfo(torch.float64).tiny
    if not positive.any():
        return 0.0
    return float((layer.scores[positive].abs() / layer.sigma[positive].to(torch.float64)).median())


def options(layer: LayerScores, storage: StorageFormat, reference_rank: int, factors: LayerFactors) -> Options:
    """The ``Options`` of ``layer`` in ``storage``, its quantization error measured at
    ``reference_rank`` (clamped to the ranks the format keeps below its dense cost)."""
    m, n, bias = layer.out_features, layer.in_features, layer.has_bias
    B, A = factors.factors(layer.name)
    S, b = factors.whitener(layer.name), factors.bias(layer.name)
    kappa = sensitivity(layer)
    tail = layer.scores.abs().flip(0).cumsum(0).flip(0)  # Σ_{i≥k} |ΔL_i| for k = 0..r−1
    dense_cost = storage.dense_bytes(m, n, bias)
    weight = B @ A
    linear = nn.Linear(n, m, bias=b is not None, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if b is not None:
            linear.bias.copy_(b)
    dense_error = kappa * whitened_norm(effective_weight(storage.dense_module(linear), n) - weight, S)
    if has_base(storage):
        return _based_options(layer, storage, factors, kappa, dense_cost, dense_error)
    ranks = range(1, min(useful_rank(storage, m, n, bias), B.shape[1] - 1) + 1)  # cheaper than dense
    costs, losses = [], []
    if ranks:
        k_ref = min(max(reference_rank, 1), ranks[-1])
        stored = storage.lowrank_module(B[:, :k_ref], A[:k_ref], b)
        error = kappa * whitened_norm(effective_weight(stored, n) - B[:, :k_ref] @ A[:k_ref], S)
        for k in ranks:
            costs.append(storage.lowrank_bytes(m, n, k, bias))
            losses.append(float(tail[k]) + error * math.sqrt(k / k_ref))
    costs.append(dense_cost)
    losses.append(dense_error)
    return Options(torch.tensor(costs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64))


def _based_options(layer: LayerScores, storage: StorageFormat, factors: LayerFactors, kappa: float,
                   dense_cost: int, dense_error: float) -> Options:
    """The ``Options`` of ``layer`` in a format with a quantized base: rank k (0: the base alone)
    leaves the residual's components from k on, of whitened norm √(Σ_{i≥k} σ_i²)."""
    m, n, bias = layer.out_features, layer.in_features, layer.has_bias
    sigma = factors.spectrum(layer.name, storage.base_key).sigma.to(torch.float64)
    left = (sigma ** 2).flip(0).cumsum(0).flip(0).clamp_min(0).sqrt()  # for k = 0..r−1
    ranks = range(0, min(useful_rank(storage, m, n, bias), sigma.numel() - 1) + 1)
    costs = [storage.lowrank_bytes(m, n, k, bias) for k in ranks] + [dense_cost]
    losses = [kappa * float(left[k]) for k in ranks] + [dense_error]
    return Options(torch.tensor(costs, dtype=torch.float64), torch.tensor(losses, dtype=torch.float64))


def lagrangian_choice(choices: Sequence[Sequence[Options | None]], limit: float) -> list[tuple[int, int]]:
    """For each layer, (member, option) minimising loss + λ·bytes at the smallest λ whose picks
    cost at most ``limit`` in all (the cheapest picks when none does); a member whose options are
    None cannot hold the layer."""

    def picks(lam: float) -> tuple[float, list[tuple[int, int]]]:
        total, chosen = 0.0, []
        for layer in choices:
            best = []  # (value, member, option) of each member's best option; ties: the first member
            for i, o in enumerate(layer):
                if o is None:
                    continue
                value = o.losses + lam * o.costs
                j = int(value.argmin())
                best.append((float(value[j]), i, j))
            _, member, option = min(best)
            total += float(layer[member].costs[option])
            chosen.append((member, option))
        return total, chosen

    total, chosen = picks(0.0)
    if total <= limit:
        return chosen
    low, high = 0.0, 1.0
    while picks(high)[0] > limit and high < 1e30:
        low, high = high, high * 4
    for _ in range(BISECTIONS):
        mid = (low + high) / 2
        if picks(mid)[0] > limit:
            low = mid
        else:
            high = mid
    return picks(high)[1]


class AutoStorage:
    """A storage format per layer, from a list, by predicted loss at the byte budget (zsfw's own)."""

    name: ClassVar[str] = "auto"
    members_option: ClassVar[str] = "formats"  # it has a base where a member has (``zsfw.capabilities``)

    def __init__(self, formats: Sequence[Any] = DEFAULT_FORMATS) -> None:
        if isinstance(formats, (str, dict)) or not formats:
            raise ValueError(f"formats must be a non-empty list of storage formats, got {formats!r}")
        self.members: dict[str, StorageFormat] = {}
        for spec in formats:
            member = zsfw.storage_format(spec)
            if callable(getattr(member, "choose", None)):
                raise ValueError(f"formats lists {member.name!r}, which chooses formats itself")
            if member.name in self.members:
                raise ValueError(f"formats lists {member.name!r} twice; list each format once")
            self.members[member.name] = member

    def choose(self, layers: Sequence[LayerScores], ratio: float, factors: LayerFactors
               ) -> dict[str, StorageFormat]:
        members = list(self.members.values())
        budgets = [ByteBudget(layers, ratio, member) for member in members]
        choices = [[options(layer, member, budget.uniform_rank(layer), factors)
                    if fits(member, layer.out_features, layer.in_features) else None  # never picked
                    for member, budget in zip(members, budgets)]
                   for layer in tqdm(layers, desc="choose formats", unit="layer")]
        picked = lagrangian_choice(choices, budgets[0].limit)
        return {layer.name: members[i] for layer, (i, _) in zip(layers, picked)}


@zsfw.hookimpl
def zsfw_register_storage_formats(register) -> None:
    register(AutoStorage)
