"""The layer-streamed driver gives the statistics of the in-memory pass, layer by layer."""

import copy

import pytest
import torch

import zsfw
from helpers import recipe
from zsfw.compression.driver import InMemoryDriver
from zsfw.compression.streaming import LayerStreamedDriver
from zsfw.compression.targets import find_targets
from zsfw.recipe import CalibrationConfig


def _groups(driver, model, moments=True, gradients=True):
    targets = find_targets(model, ["Linear"], ["lm_head"])
    statistics = driver.statistics(targets, moments, gradients)
    groups = {g.group: g for g in statistics}
    return groups, statistics.tokens, statistics.loss


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_streamed_statistics_equal_the_in_memory_ones(architecture, windows, request):
    model = request.getfixturevalue(architecture)
    cal = CalibrationConfig(samples=8, sequence_length=32, gradient_samples=4, batch_size=2)
    memory, tokens, loss = _groups(InMemoryDriver(model, windows, cal), model)
    streamed, s_tokens, s_loss = _groups(LayerStreamedDriver(model, windows, cal), model)
    assert s_tokens == tokens == windows.numel() and s_loss == loss
    assert set(streamed) == set(memory) and len(memory) == 4 * model.config.num_hidden_layers
    for name, group in memory.items():
        other = streamed[name]
        assert other.members == group.members
        # the same sums in the same order: bit for bit
        assert torch.equal(other.covariance, group.covariance), name
        assert set(other.gradients) == set(group.gradients) == set(group.members)
        for member, grad in group.gradients.items():
            assert torch.equal(other.gradients[member], grad), member
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_streamed_groups_arrive_last_layer_first(llama, windows):
    cal = CalibrationConfig(samples=4, sequence_length=32)
    targets = find_targets(llama, ["Linear"], ["lm_head"])
    order = [g.group for g in LayerStreamedDriver(llama, windows[:4], cal).statistics(targets, True, True)]
    assert order[0].startswith("model.layers.1.") and order[-1].startswith("model.layers.0.")


def test_compress_with_the_streamed_driver_gives_the_same_model(llama, windows):
    memory, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6), windows)
    streamed, s_report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, execution={"driver": "streamed"}),
                                       windows)
    assert [l.rank for l in s_report.layers] == [l.rank for l in report.layers]
    with torch.no_grad():
        assert torch.allclose(streamed(input_ids=windows).logits, memory(input_ids=windows).logits,
                              rtol=1e-4, atol=1e-4)


def test_the_streamed_driver_runs_no_pass_when_nothing_is_measured(llama, windows):
    plain = recipe(ratio=0.8, whiten=False, scorer="sigma", execution={"driver": "streamed"})
    _, report = zsfw.compress(copy.deepcopy(llama), plain, windows)
    assert report.calibration_tokens == windows.numel() and "statistics" in report.timings
    assert all(l.whitening == "" for l in report.layers)


def test_per_layer_arguments_are_kept_per_layer_sliding_window_qwen2(windows):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from helpers import VOCAB, train_briefly

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model = train_briefly(Qwen2ForCausalLM(config).eval(), windows)
    masks = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: masks.append(k["attention_mask"]), with_kwargs=True)
             for layer in model.model.layers]
    with torch.no_grad():
        model(input_ids=windows[:1])
    for hook in hooks:
        hook.remove()
    # the layers really get different masks (full attention may pass none at all)
    assert masks[1] is not None and (masks[0] is None or not torch.equal(masks[0], masks[1]))
    cal = CalibrationConfig(samples=8, sequence_length=32)
    memory, _, _ = _groups(InMemoryDriver(model, windows, cal), model)
    streamed, _, _ = _groups(LayerStreamedDriver(model, windows, cal), model)
    for name, group in memory.items():
        assert torch.equal(streamed[name].covariance, group.covariance), name
        for member, grad in group.gradients.items():
            assert torch.equal(streamed[name].gradients[member], grad), member


def test_a_model_that_does_more_between_layers_is_refused(llama, windows):
    from zsfw.errors import CalibrationError

    base, own_forward = llama.model, llama.model.forward

    def forward(*args, **kwargs):  # scales layer 0's output inside the model's own forward only
        handle = base.layers[0].register_forward_hook(lambda module, inputs, output: output * 1.5)
        try:
            return own_forward(*args, **kwargs)
        finally:
            handle.remove()

    base.forward = forward
    cal = CalibrationConfig(samples=2, sequence_length=32)
    with pytest.raises(CalibrationError, match="LlamaForCausalLM cannot be streamed layer by layer"):
        _groups(LayerStreamedDriver(llama, windows[:2], cal), llama)


def test_boundaries_offloaded_to_disk_give_the_same_statistics_and_leave_nothing(qwen2, windows, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("ZSFW_SPILL", str(tmp_path))
    cal = CalibrationConfig(samples=8, sequence_length=32, batch_size=2)
    memory, _, loss = _groups(InMemoryDriver(qwen2, windows, cal), qwen2)
    targets = find_targets(qwen2, ["Linear"], ["lm_head"])
    statistics = LayerStreamedDriver(qwen2, windows, cal, offload="disk").statistics(targets, True, True)
    groups = iter(statistics)
    first = next(groups)
    (folder,) = tmp_path.iterdir()  # the boundaries wait on disk while the backward sweep runs
    assert folder.name.startswith("boundaries-") and len(list(folder.glob("*.safetensors"))) == 2 * 4
    on_disk = {first.group: first, **{g.group: g for g in groups}}
    assert statistics.loss == loss
    for name, group in memory.items():
        assert torch.equal(on_disk[name].covariance, group.covariance), name
        for member, grad in group.gradients.items():
            assert torch.equal(on_disk[name].gradients[member], grad), member
    assert list(tmp_path.iterdir()) == []
