"""The group-wise quantized base formats (int4, int3, int2): rounding, GPTQ, packing, bytes, modules."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zsfw
from zsfw.checkpoint.save import module_tensors
from zsfw.errors import PluginError, RecipeError
from zsfw_groupwise import (GroupwiseWeight, pack, packed_bytes, quantize_gptq, quantize_rtn,
                            unpack)

BITS = (2, 3, 4)


def _fmt(bits, **options):
    return zsfw.plugins.create("storage", f"int{bits}", options)


def _weight(out, n, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


def _hybrid(bits, out, n, rank, bias, seed=0, group_size=16):
    g = torch.Generator().manual_seed(seed + 1)
    fmt = _fmt(bits, group_size=group_size)
    B, A = torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, n, generator=g) * 0.1
    return fmt, fmt.hybrid_module(fmt.quantize(_weight(out, n, seed)), B, A,
                                  torch.randn(out, generator=g) if bias else None)


def test_rtn_gives_the_hand_computed_codes_and_bf16_scales():
    # int2, one group of 4: scale = 1.5 / 1.5 = 1; 1.5 → 2 clamps to 1, −1.5 → −2 (half to even), −0.6 → −1
    base = quantize_rtn(torch.tensor([[1.5, -1.5, 0.4, -0.6]]), bits=2, group_size=4)
    assert base.qdata.tolist() == [[1, -2, 0, -1]] and base.scale.tolist() == [[1.0]]
    # int4, groups of 2: scale 7.5/7.5 = 1 (7.5 → 8 clamps to 7, −7.5 → −8) and 3/7.5 = 0.4, rounded
    # to bf16 (0.400390625) before rounding the weights: 3/0.4004 = 7.49 → 7, −1/0.4004 = −2.497 → −2
    base = quantize_rtn(torch.tensor([[7.5, -7.5, 3.0, -1.0]]), bits=4, group_size=2)
    assert base.scale.tolist() == [[1.0, 0.400390625]]
    assert base.qdata.tolist() == [[7, -8, 7, -2]]
    assert base.dequantize().tolist() == [[7.0, -8.0, 7 * 0.400390625, -2 * 0.400390625]]
    zero = quantize_rtn(torch.zeros(2, 4), bits=3, group_size=2)  # an all-zero group: scale 0, codes 0
    assert not zero.qdata.any() and not zero.scale.any() and not zero.dequantize().any()


@pytest.mark.parametrize("bits", BITS)
def test_rtn_is_torchao_symmetric_per_group_quantization_with_bf16_scales(bits):
    # torchao's symmetric scale max|w| / ((2^b − 1)/2), rounded to bf16, is ours; on those scales
    # torchao's rounding gives our codes
    from torchao.quantization import IntxUnpackedToInt8Tensor

    W, group, dtype = _weight(16, 128, seed=bits), 32, getattr(torch, f"int{bits}")
    ours = quantize_rtn(W, bits, group)
    assert torch.equal(IntxUnpackedToInt8Tensor.from_hp(W, (1, group), dtype).scale.bfloat16().float(), ours.scale)
    theirs = IntxUnpackedToInt8Tensor.from_hp(W, (1, group), dtype, intx_choose_qparams_algorithm=None,
                                              custom_scale=ours.scale,
                                              custom_zero_point=torch.zeros_like(ours.scale, dtype=torch.int8))
    assert torch.equal(theirs.qdata, ours.qdata)
    assert torch.equal(theirs.dequantize(), ours.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_the_torchao_weight_holds_the_same_codes_and_computes_the_dequantized_weight(bits):
    base = quantize_rtn(_weight(8, 32), bits, 16)
    tensor = base.to_torchao()
    assert torch.equal(tensor.dequantize(), base.dequantize())
    back = GroupwiseWeight.from_torchao(tensor)
    assert torch.equal(back.qdata, base.qdata) and torch.equal(back.scale, base.scale)
    assert (back.bits, back.group_size) == (bits, 16)
    x = torch.randn(3, 32)
    assert torch.allclose(torch.nn.functional.linear(x, tensor), x @ base.dequantize().T, atol=1e-6)


def _correlated_inputs(n, samples, seed=0):
    """Inputs (n × samples) with strongly correlated coordinates, and one input never active."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n // 4, generator=g, dtype=torch.float64)
    X = mixing @ torch.randn(n // 4, samples, generator=g, dtype=torch.float64)
    X += 0.05 * torch.randn(n, samples, generator=g, dtype=torch.float64)
    X[5] = 0
    return X


@pytest.mark.parametrize("bits", BITS)
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits):
    W = _weight(24, 64, seed=bits).double()
    X = _correlated_inputs(64, 512)
    C = X @ X.T / X.shape[1]

    def output_error(base):
        return ((W - base.dequantize().double()) @ X).norm().item()

    rtn, gptq = quantize_rtn(W, bits, 16), quantize_gptq(W, C, bits, 16)
    assert gptq.qdata.dtype == torch.int8 and gptq.scale.shape == (24, 4)
    assert torch.equal(gptq.scale, gptq.scale.bfloat16().float())  # stored scales are the used ones
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert qmin <= gptq.qdata.min() and gptq.qdata.max() <= qmax
    assert output_error(gptq) < 0.7 * output_error(rtn), (output_error(gptq), output_error(rtn))
    fmt = _fmt(bits, group_size=16, rounding="gptq")
    assert fmt.needs_hessian and not _fmt(bits).needs_hessian
    assert torch.equal(fmt.quantize(W, C).qdata, gptq.qdata)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    # a diagonal H spreads no error: every column is rounded to nearest on RTN's scales
    W = _weight(10, 48, seed=3)
    H = torch.diag(torch.rand(48, generator=torch.Generator().manual_seed(4)) + 0.5)
    rtn, gptq = quantize_rtn(W, 3, 16), quantize_gptq(W, H, 3, 16)
    assert torch.equal(gptq.qdata, rtn.qdata) and torch.equal(gptq.scale, rtn.scale)


def test_gptq_without_a_hessian_is_refused():
    with pytest.raises(RuntimeError, match="int4 with rounding gptq needs the layer's input second moment"):
        _fmt(4, rounding="gptq").quantize(_weight(4, 64))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (5, 3), (64, 48)])
def test_pack_round_trips_in_exactly_ceil_bits_over_8_bytes(bits, shape):
    g = torch.Generator().manual_seed(sum(shape) + bits)
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g, dtype=torch.int8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_bytes(codes.numel(), bits),)
    assert packed.numel() == -(-shape[0] * shape[1] * bits // 8)
    assert torch.equal(unpack(packed, bits, shape), codes)


def test_pack_writes_codes_least_significant_bit_first():
    assert pack(torch.tensor([-8, 7], dtype=torch.int8), 4).tolist() == [0xF0]  # 0, then 15 above it
    assert pack(torch.tensor([-2, -1, 0, 1], dtype=torch.int8), 2).tolist() == [0b11100100]
    # int3: 0 (bits 0–2), 7 (bits 3–5), 4 = 0b100 (bits 6–8: its top bit in the next byte)
    assert pack(torch.tensor([-4, 3, 0], dtype=torch.int8), 3).tolist() == [0b00111000, 0b1]
    with pytest.raises(ValueError, match="take 2 packed bytes"):
        unpack(torch.zeros(3, dtype=torch.uint8), 3, (1, 3))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rank", [0, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_predicted_bytes_are_the_state_dict_bytes(bits, rank, bias):
    out, n = 40, 48
    fmt, module = _hybrid(bits, out, n, rank, bias)
    tensors, _ = module_tensors("layer", module)
    assert sum(t.nbytes for t in tensors.values()) == fmt.lowrank_bytes(out, n, rank, bias)
    assert fmt.lowrank_bytes(out, n, rank, bias) == (-(-out * n * bits // 8) + 2 * out * n // 16
                                                    + 2 * rank * (out + n) + (2 * out if bias else 0))
    assert fmt.base_bytes(out, n) == fmt.lowrank_bytes(out, n, 0, False)
    assert fmt.dense_bytes(out, n, bias) == 2 * (out * n + (out if bias else 0))
    expected = {"qdata": torch.uint8, "scale": torch.bfloat16, **({"B": torch.bfloat16, "A": torch.bfloat16}
                                                                 if rank else {}),
                **({"bias": torch.bfloat16} if bias else {})}
    assert {key.split(".", 1)[1]: t.dtype for key, t in tensors.items()} == expected
    skeleton = fmt.skeleton(out, n, rank, bias)
    assert {name: t.shape for name, t in skeleton.state_dict().items()} == \
           {key.split(".", 1)[1]: t.shape for key, t in tensors.items()}


def test_smollm2_shapes_cost_what_the_formula_says():
    int4, int3, int2 = (_fmt(bits) for bits in (4, 3, 2))
    assert int4.base_bytes(576, 576) == 576 * 576 // 2 + 576 * 9 * 2
    assert int3.base_bytes(1536, 576) == 1536 * 576 * 3 // 8 + 1536 * 9 * 2
    assert int2.base_bytes(576, 1536) == 576 * 1536 // 4 + 576 * 24 * 2
    assert int4.lowrank_bytes(576, 1536, 32, True) == int4.base_bytes(576, 1536) + 32 * 2112 * 2 + 576 * 2


def test_a_full_residual_reconstructs_the_weight():
    # W = Q + R with R on the bf16 grid: B = R, A = I hold it exactly; fp32 inputs compute W x
    out, n = 48, 32
    W0 = _weight(out, n)
    base = quantize_rtn(W0, 4, 16)
    R = (W0 - base.dequantize()).bfloat16().float()
    W = base.dequantize() + R
    module = _fmt(4, group_size=16).hybrid_module(base, R, torch.eye(n), None)
    x = torch.randn(5, n)
    assert torch.allclose(module(x), x @ W.T, rtol=0, atol=1e-5)
    assert ((module(x) - x @ W0.T).norm() / (x @ W0.T).norm()).item() < 1e-3  # bf16 rounding of R only
    assert ((x @ base.dequantize().T - x @ W0.T).norm() / (x @ W0.T).norm()).item() > 0.05


@pytest.mark.parametrize("rank", [0, 6])
def test_a_saved_module_reloads_into_its_skeleton_and_computes_the_same(rank, tmp_path):
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    from zsfw.checkpoint.save import write_safetensors

    fmt, module = _hybrid(3, 24, 64, rank, bias=True)
    tensors, metadata = module_tensors("layer", module)
    write_safetensors(tensors, tmp_path / "m.safetensors", {"format": "pt", **metadata})
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        read = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {"tensor_names": "[]", **f.metadata()}
    restored, _ = unflatten_tensor_state_dict(read, metadata)
    clone = fmt.skeleton(24, 64, rank, True)
    result = clone.load_state_dict({k.removeprefix("layer."): v for k, v in restored.items()},
                                   strict=False, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    clone = clone.to("cpu")
    assert torch.equal(clone.weight.qdata, module.weight.qdata) and torch.equal(clone.weight.scale, module.weight.scale)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 64).to(dtype)
        assert clone(x).dtype == dtype and torch.equal(clone(x), module(x))


def test_missing_or_mis_shaped_packed_tensors_are_reported():
    fmt, module = _hybrid(4, 8, 32, 2, bias=False)
    state = module.state_dict()
    result = fmt.skeleton(8, 32, 2, False).load_state_dict({k: v for k, v in state.items() if k != "qdata"},
                                                         strict=False, assign=True)
    assert result.missing_keys == ["qdata"] and not result.unexpected_keys
    with pytest.raises(RuntimeError, match=r"qdata: expected uint8 of 128 packed 4-bit codes, got torch.uint8 \(96,\)"):
        fmt.skeleton(8, 32, 2, False).load_state_dict({**state, "qdata": state["qdata"][:96]}, assign=True)


@pytest.mark.parametrize("rank", [0, 4])
def test_compiled_without_graph_breaks_equals_eager(rank):
    _, module = _hybrid(4, 32, 64, rank, bias=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(2, 5, 64).to(dtype)
        eager, fast = module(x), compiled(x)
        assert fast.dtype == dtype
        assert ((fast.float() - eager.float()).norm() / eager.float().norm()).item() < tolerance


def test_an_aoti_package_of_a_model_with_the_module_runs_without_torchao(tmp_path):
    _, module = _hybrid(2, 32, 64, 3, bias=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), module).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        expected = model(x)
        assert torch.allclose(program.module()(x), expected, rtol=0, atol=1e-5)
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    torch.save((x, expected), tmp_path / "io.pt")
    script = textwrap.dedent("""
        import sys, torch
        x, expected = torch.load(sys.argv[2])
        y = torch._inductor.aoti_load_package(sys.argv[1])(x)
        assert torch.allclose(y, expected, rtol=0, atol=1e-5), (y - expected).abs().max()
        assert not [m for m in sys.modules if m.split(".")[0] in ("zsfw", "zsfw_groupwise", "torchao")]
        """)
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt2"), str(tmp_path / "io.pt")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_group_size_that_does_not_divide_the_inputs_is_one_line_naming_a_divisor():
    fmt = _fmt(4)
    message = (r"storage int4: group_size 64 does not divide the 100 inputs of a 30x100 layer; use a "
               r"group_size that divides 100, e.g. 50")
    with pytest.raises(RecipeError, match=message):
        fmt.quantize(_weight(30, 100))
    with pytest.raises(RecipeError, match=message):
        fmt.lowrank_bytes(30, 100, 4, False)


def test_bad_options_and_a_residual_without_its_base_are_refused():
    with pytest.raises(PluginError, match=r"rounding must be one of \['rtn', 'gptq'\], got 'nearest'"):
        _fmt(3, rounding="nearest")
    with pytest.raises(PluginError, match="group_size must be a positive integer, got 0"):
        _fmt(3, group_size=0)
    fmt = _fmt(2)
    with pytest.raises(RuntimeError, match="build its layers with hybrid_module"):
        fmt.lowrank_module(torch.zeros(8, 1), torch.zeros(1, 64), None)
    with pytest.raises(ValueError, match="got a base of 4 bits"):
        fmt.hybrid_module(quantize_rtn(_weight(8, 64), 4, 64), torch.zeros(8, 0), torch.zeros(0, 64), None)


def test_dense_layers_are_bf16_and_their_skeleton_loads():
    fmt = _fmt(4)
    linear = torch.nn.Linear(64, 8)
    dense = fmt.dense_module(linear)
    assert dense.weight.dtype == torch.bfloat16 and fmt.has_base
    skeleton = fmt.skeleton(8, 64, None, True)
    skeleton.load_state_dict(dense.state_dict(), assign=True)
    x = torch.randn(3, 64)
    assert torch.equal(skeleton(x), dense(x))


def test_the_base_travels_through_the_factor_store_tensors_unchanged():
    fmt = _fmt(3, rounding="rtn")
    base = fmt.quantize(_weight(8, 128))
    again = fmt.base_from_tensors(fmt.base_tensors(base))
    assert torch.equal(again.qdata, base.qdata) and torch.equal(again.scale, base.scale)
    torch.testing.assert_close(fmt.dequantize(again), base.dequantize(), rtol=0, atol=0)
    assert fmt.base_key == "int3-g64-rtn" and _fmt(3, rounding="gptq").base_key != fmt.base_key
