"""``GroupwiseLinear``: a group-wise quantized base weight plus a bf16 low-rank residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zsfw import weight_as

from .quantize import SCALE_DTYPE, GroupwiseWeight, pack, packed_bytes, unpack

FACTOR_DTYPE = torch.bfloat16  # residual factors and bias


class GroupwiseLinear(nn.Module):
    """y = Q x + B (A x) + b: Q group-wise int{2,3,4} (torchao ``IntxUnpackedToInt8Tensor``, one
    int8 byte per weight in memory), B (out×rank) and A (rank×in) the residual in bf16 (rank 0:
    none, no extra matmul), b an optional bf16 bias. ``state_dict`` keys:

        <name>.qdata  uint8 (ceil(out·in·bits/8),)   the codes packed back to back (``pack``)
        <name>.scale  bf16  (out, in/group_size)
        <name>.B      bf16  (out, rank)              only when rank > 0
        <name>.A      bf16  (rank, in)               only when rank > 0
        <name>.bias   bf16  (out,)                   only with a bias

    The torchao weight (``weight``, a non-persistent buffer) is what the forward computes with;
    ``qdata`` and ``scale`` are made from it when saving and turned back into it when loading, so
    the file holds exactly the packed form. The forward computes in the input's dtype: the torchao
    weight is re-wrapped to dequantize to it, and the factors are cast to it (``cast_weights`` as
    in ``LowRankLinear``; under autocast both are left to it).
    """

    cast_weights = True

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, group_size: int,
                 bias: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 0..{min(in_features, out_features)} for a "
                             f"{out_features}x{in_features} layer, got {rank}")
        if in_features % group_size:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.group_size = bits, group_size
        empty = GroupwiseWeight(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            torch.zeros(out_features, in_features // group_size, dtype=torch.float32, device=device),
            bits, group_size)
        self.register_buffer("weight", empty.to_torchao(), persistent=False)
        for name, shape in (("B", (out_features, rank)), ("A", (rank, in_features))):
            self.register_buffer(name, torch.zeros(shape, dtype=FACTOR_DTYPE, device=device) if rank else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=FACTOR_DTYPE, device=device)
                             if bias else None)

    @classmethod
    def from_parts(cls, base: GroupwiseWeight, B: torch.Tensor, A: torch.Tensor,
                   bias: torch.Tensor | None) -> "GroupwiseLinear":
        """The layer of ``base`` with residual B (out×k) A (k×in), k ≥ 0, and ``bias``, on
        ``base``'s device (B, A and bias rounded to bf16)."""
        (out, n), k = base.shape, A.shape[0]
        if B.shape != (out, k) or A.shape != (k, n):
            raise ValueError(f"residual factors must be {out}x{k} and {k}x{n} for a {out}x{n} base, "
                             f"got {tuple(B.shape)} and {tuple(A.shape)}")
        device = base.qdata.device
        module = cls(n, out, k, base.bits, base.group_size, bias=bias is not None, device="meta")
        module.weight = base.to_torchao()
        if k:
            module.B = B.detach().to(device=device, dtype=FACTOR_DTYPE).contiguous()
            module.A = A.detach().to(device=device, dtype=FACTOR_DTYPE).contiguous()
        if bias is not None:
            module.bias = bias.detach().to(device=device, dtype=FACTOR_DTYPE).contiguous()
        return module

    @property
    def base(self) -> GroupwiseWeight:
        """The quantized base weight (codes and fp32 scales, as held in memory)."""
        return GroupwiseWeight.from_torchao(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = self.cast_weights and not torch.is_autocast_enabled(x.device.type)
        weight = self.weight
        if cast and weight.dtype != x.dtype:
            weight = type(weight)(weight.qdata, weight.scale, weight.zero_point, weight.target_dtype,
                                  weight.block_size, x.dtype, None)
        bias = None if self.bias is None else weight_as(self.bias, x, cast)
        y = F.linear(x, weight, bias)
        if self.rank:
            y = y + F.linear(F.linear(x, weight_as(self.A, x, cast)), weight_as(self.B, x, cast))
        return y

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "qdata"] = pack(self.weight.qdata, self.bits)
        destination[prefix + "scale"] = self.weight.scale.to(SCALE_DTYPE)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        keys = {name: prefix + name for name in ("qdata", "scale")}
        rest = {k: v for k, v in state_dict.items() if k not in keys.values()}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing = [key for key in keys.values() if key not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        qdata, scale = state_dict[keys["qdata"]], state_dict[keys["scale"]]
        shape = (self.out_features, self.in_features)
        groups = (self.out_features, self.in_features // self.group_size)
        if qdata.dtype != torch.uint8 or qdata.shape != (packed_bytes(shape[0] * shape[1], self.bits),):
            error_msgs.append(f"{keys['qdata']}: expected uint8 of {packed_bytes(shape[0] * shape[1], self.bits)} "
                              f"packed {self.bits}-bit codes, got {qdata.dtype} {tuple(qdata.shape)}")
            return
        if scale.shape != groups:
            error_msgs.append(f"{keys['scale']}: expected shape {groups}, got {tuple(scale.shape)}")
            return
        assign = local_metadata.get("assign_to_params_buffers", False) or self.weight.is_meta
        device = qdata.device if assign else self.weight.device
        self.weight = GroupwiseWeight(unpack(qdata.to(device), self.bits, shape),
                                      scale.to(device=device, dtype=torch.float32),
                                      self.bits, self.group_size).to_torchao()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
