"""Where compression computes (``execution.device``) and in what dtype: 16-bit layers, checks
that name the bad value, and the CUDA path (those tests skip on a machine without a GPU)."""

import copy

import pytest
import torch

import zsfw
from helpers import allocation_gaps, recipe
from zsfw.compression.driver import InMemoryDriver
from zsfw.compression.streaming import LayerStreamedDriver
from zsfw.compression.targets import find_targets
from zsfw.errors import ModelLoadError, RecipeError
from zsfw.recipe import CalibrationConfig, load_recipe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _stats(driver, model):
    targets = find_targets(model, ["Linear"], ["lm_head"])
    statistics = driver.statistics(targets, True, True)
    return {g.group: g for g in statistics}, statistics.loss


@pytest.fixture
def llama_folder(llama, tmp_path):
    folder = tmp_path / "llama"
    llama.save_pretrained(folder)
    return folder


def test_device_names_are_checked_in_the_recipe_and_at_run_time(llama, windows, monkeypatch):
    with pytest.raises(RecipeError, match="device 'tpu' is not 'cpu', 'cuda' or 'cuda:N'"):
        load_recipe(recipe(execution={"device": "tpu"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match=r"execution.device is 'cuda:1' but torch .* sees 0 CUDA device"):
        zsfw.compress(llama, recipe(execution={"device": "cuda:1"}), windows)


def test_a_bare_cuda_is_each_torchrun_process_own_gpu():
    from zsfw.residency import cuda_device

    assert cuda_device("cuda", None, 1) == torch.device("cuda", 0)
    assert cuda_device("cuda", "1", 2) == torch.device("cuda", 1)
    assert cuda_device("cuda:0", "1", 2) == torch.device("cuda", 0)  # an index given is kept
    with pytest.raises(RecipeError, match=r"sees 2 CUDA device\(s\) here \(needed: cuda:2 for LOCAL_RANK 2\); "
                                          r"start at most 2 process\(es\) per node or use 'cpu'$"):
        cuda_device("cuda", "2", 2)
    with pytest.raises(RecipeError, match=r"'cuda:1' but .* sees 1 CUDA device\(s\) here \(needed: cuda:1\); use 'cpu'$"):
        cuda_device("cuda:1", "0", 1)


def test_the_process_gpu_is_made_current(monkeypatch):
    """What compute_device does on a 2-GPU machine as torchrun's second process (the GPU calls
    stand in for CUDA's own)."""
    from zsfw.residency import compute_device

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert compute_device("cuda") == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    assert compute_device("cpu") == torch.device("cpu") and len(made_current) == 1


def test_under_torchrun_a_model_on_a_gpu_computes_on_its_process_gpu():
    from zsfw.residency import wanted_device

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert wanted_device(None, gpu, launched=True) == "cuda"  # bound to LOCAL_RANK by compute_device
    assert wanted_device(None, gpu, launched=False) is None
    assert wanted_device(None, cpu, launched=True) is None
    assert wanted_device("cpu", gpu, launched=True) == "cpu"


def test_a_process_group_that_cannot_start_is_one_line(monkeypatch):
    import torch.distributed as dist

    from zsfw.compression import distributed
    from zsfw.errors import DeviceError

    calls = []

    def refuse(backend, device_id=None):
        calls.append((backend, device_id))
        raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error\n"
                                    "Duplicate GPU detected")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    monkeypatch.setattr(dist, "init_process_group", refuse)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"^process 1 of 2 could not start torch.distributed's 'nccl' backend on "
                                          r"cuda:1: NCCL error in: .*unhandled cuda error; give each process its "
                                          r"own GPU \(execution.device 'cuda'\) or run on 'cpu' \(gloo\)$"):
        distributed.join(torch.device("cuda", 1))
    assert calls == [("nccl", torch.device("cuda", 1))]  # bound to the GPU: NCCL starts at once
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(DeviceError, match="'nccl' backend on cuda:0: torch .* was built without NCCL;"):
        distributed.join(torch.device("cuda", 0))
    with pytest.raises(DeviceError, match="'gloo' backend on cpu: NCCL error"):
        distributed.join(torch.device("cpu"))
    assert calls[-1] == ("gloo", None)


def test_device_cpu_leaves_a_cpu_model_as_it_is(llama, windows):
    before, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows)
    after, _ = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, execution={"device": "cpu"}), windows)
    with torch.no_grad():
        assert torch.equal(after(input_ids=windows).logits, before(input_ids=windows).logits)


def test_a_bf16_model_streams_with_its_gradients_summed_in_fp32(llama, windows):
    cal = CalibrationConfig(samples=8, sequence_length=32, gradient_samples=4, batch_size=2)
    exact, _ = _stats(InMemoryDriver(llama, windows, cal), llama)
    half = copy.deepcopy(llama).to(torch.bfloat16)
    streamed, loss = _stats(LayerStreamedDriver(half, windows, cal), half)
    assert set(streamed) == set(exact)
    for name, group in exact.items():
        other = streamed[name]
        assert other.covariance.dtype == torch.float64
        rel = (other.covariance - group.covariance).norm() / group.covariance.norm()
        assert rel < 2e-2, (name, rel)  # the inputs differ by bf16 rounding, the sums do not add to it
        for member, grad in group.gradients.items():
            assert other.gradients[member].dtype == torch.float32, member
            rel = (other.gradients[member] - grad).norm() / grad.norm()
            assert rel < 0.1, (member, rel)


def test_the_bf16_gradient_sum_is_the_fp32_sum_of_the_micro_batches(llama, windows, monkeypatch):
    """Each micro-batch's bf16 gradient goes into the fp32 sum as it is (no bf16 running sum),
    and both drivers give the same C and G bit for bit."""
    from zsfw.compression import streaming

    half = copy.deepcopy(llama).to(torch.bfloat16)
    seen: dict[str, list[torch.Tensor]] = {}
    widen = streaming.widen

    def spy(targets, names, wide):
        for name in names:
            seen.setdefault(name, []).append(targets[name].weight.grad.clone())
        widen(targets, names, wide)
    monkeypatch.setattr(streaming, "widen", spy)
    cal = CalibrationConfig(samples=8, sequence_length=32, gradient_samples=8, batch_size=2)
    streamed, loss = _stats(LayerStreamedDriver(half, windows, cal), half)
    grads = {m: g for group in streamed.values() for m, g in group.gradients.items()}
    assert set(seen) == set(grads)
    for name, parts in seen.items():
        assert len(parts) == 4 and all(p.dtype == torch.bfloat16 for p in parts)
        expected = parts[0].float()
        for p in parts[1:]:
            expected += p
        assert torch.equal(grads[name], expected), name
    memory, m_loss = _stats(InMemoryDriver(half, windows, cal), half)
    assert m_loss == loss
    for name, group in memory.items():
        assert torch.equal(streamed[name].covariance, group.covariance), name
        for member, grad in group.gradients.items():
            assert grad.dtype == torch.float32 and torch.equal(streamed[name].gradients[member], grad), member


def test_lazy_loading_in_the_checkpoint_dtype_writes_what_the_resident_model_writes(llama, tokenizer, tmp_path,
                                                                                     windows):
    from zsfw.models import load_model
    from zsfw.residency import lazy_model, residency

    llama.to(torch.bfloat16).save_pretrained(tmp_path / "half")
    tokenizer.save_pretrained(tmp_path / "half")
    model = lazy_model(tmp_path / "half", "auto")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and residency(model).dtype == torch.bfloat16
    streamed = {"driver": "streamed", "device": "cpu"}
    _, report = zsfw.compress(model, recipe(ratio=0.6, execution={**streamed, "weights": "lazy"}), windows,
                              output_dir=tmp_path / "lazy")
    resident, _ = load_model(tmp_path / "half", dtype="auto")
    assert resident.model.embed_tokens.weight.dtype == torch.bfloat16
    _, expected = zsfw.compress(resident, recipe(ratio=0.6, execution=streamed), windows,
                                output_dir=tmp_path / "resident")
    assert [l.rank for l in report.layers] == [l.rank for l in expected.layers]
    files = sorted(p.name for p in (tmp_path / "lazy").glob("*.safetensors"))
    assert files and all((tmp_path / "lazy" / f).read_bytes() == (tmp_path / "resident" / f).read_bytes()
                         for f in files)


def test_a_damaged_checkpoint_header_is_one_line(llama_folder):
    from zsfw.residency import lazy_model

    path = llama_folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ModelLoadError, match="model.safetensors' has no readable safetensors header"):
        lazy_model(llama_folder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_streamed_statistics_on_a_device_match_the_cpu(llama, windows, device):
    cal = CalibrationConfig(samples=8, sequence_length=32, gradient_samples=4, batch_size=2)
    on_cpu, loss = _stats(LayerStreamedDriver(llama, windows, cal), llama)
    gpu = copy.deepcopy(llama).to(device)
    on_gpu, g_loss = _stats(LayerStreamedDriver(gpu, windows, cal), gpu)
    assert abs(g_loss - loss) < 1e-5 * abs(loss)
    for name, group in on_cpu.items():
        other = on_gpu[name]
        assert other.covariance.device.type == device
        assert torch.allclose(other.covariance.cpu(), group.covariance, rtol=1e-5, atol=1e-7), name
        for member, grad in group.gradients.items():
            assert torch.allclose(other.gradients[member].cpu(), grad, rtol=1e-4, atol=1e-6), member


def test_allocation_gaps_allow_rounding_flips_only():
    from types import SimpleNamespace

    def layers(*ranks):
        return [SimpleNamespace(name=f"l{i}", shape=(8, 8), rank=r, bytes=32 * r) for i, r in enumerate(ranks)]
    cpu = layers(4, 5, 6, 7, 8)
    assert allocation_gaps(cpu, layers(4, 5, 6, 7, 8)) == []
    assert allocation_gaps(cpu, layers(5, 4, 6, 7, 8)) == []  # a near tie traded between two layers
    assert allocation_gaps(cpu, layers(7, 5, 6, 7, 8)) == ["l0: rank 4 vs 7"]
    assert allocation_gaps(cpu, layers(5, 4, 7, 6, 8)) == ["4 layers' ranks differ (at most 3): "
                                                           "[('l0', 4, 5), ('l1', 5, 4), ('l2', 6, 7), ('l3', 7, 6)]"]
    assert allocation_gaps(cpu, layers(6, 7, 8, 7, 8)) == ["total bytes differ by 192 (at most 160)"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_lazy_compression_on_a_device_gives_the_cpu_allocation(llama_folder, windows, tmp_path, device):
    """Up to rounding flips (``allocation_gaps``); the same ranks give the same model, others a
    loss within 1 %."""
    from zsfw.compression.statistics import next_token_loss
    from zsfw.residency import lazy_model

    lazy = {"driver": "streamed", "weights": "lazy"}
    _, on_cpu = zsfw.compress(lazy_model(llama_folder), recipe(ratio=0.6, execution=lazy), windows,
                              output_dir=tmp_path / "cpu")
    _, on_device = zsfw.compress(lazy_model(llama_folder), recipe(ratio=0.6, execution={**lazy, "device": device}),
                                 windows, output_dir=tmp_path / "device")
    assert allocation_gaps(on_cpu.layers, on_device.layers) == []
    a, b = zsfw.load(tmp_path / "cpu"), zsfw.load(tmp_path / "device")
    with torch.no_grad():
        if [l.rank for l in on_device.layers] == [l.rank for l in on_cpu.layers]:
            assert torch.allclose(a(input_ids=windows).logits, b(input_ids=windows).logits, rtol=1e-3, atol=1e-3)
        assert next_token_loss(b, windows).item() == pytest.approx(next_token_loss(a, windows).item(), rel=1e-2)
