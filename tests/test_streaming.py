"""The layer-streamed driver gives the statistics of the in-memory pass, layer by layer."""

import copy
import weakref

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


def test_capturing_the_layers_arguments_runs_no_head(llama, windows, monkeypatch):
    """The capture run stops after the last decoder layer: no (tokens × vocabulary) logits."""
    from zsfw.compression import streaming

    head_calls, at_forward = [], []
    handle = llama.get_output_embeddings().register_forward_hook(lambda *args: head_calls.append(1))

    def forward(self, *args):
        at_forward.append(len(head_calls))
        raise KeyboardInterrupt  # enough: the capture is done

    monkeypatch.setattr(streaming._StreamedPass, "_forward", forward)
    cal = CalibrationConfig(samples=4, sequence_length=32, batch_size=2)
    targets = find_targets(llama, ["Linear"], ["lm_head"])
    with pytest.raises(KeyboardInterrupt):
        list(LayerStreamedDriver(llama, windows[:4], cal).statistics(targets, True, True))
    handle.remove()
    assert at_forward == [0]


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


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


@pytest.fixture
def llama_folder(llama, tmp_path):
    folder = tmp_path / "llama"
    llama.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("storage", ["bf16", ["bf16", {"name": "int4", "group_size": 16, "rounding": "gptq"}]],
                         ids=["bf16", "auto-int4"])  # the second with quantized bases and residuals
def test_lazy_weights_give_the_same_checkpoint_one_layer_at_a_time(llama, llama_folder, windows, tmp_path,
                                                                   monkeypatch, storage):
    from zsfw.residency import LazyWeights, lazy_model, residency

    held, most = set(), [0]
    acquire, release = LazyWeights._acquire, LazyWeights._release

    def counting_acquire(self, index):
        acquire(self, index)
        held.add(index)
        most[0] = max(most[0], len(held))

    def counting_release(self, index):
        release(self, index)
        if self.holders[index] == 0:
            held.discard(index)

    monkeypatch.setattr(LazyWeights, "_acquire", counting_acquire)
    monkeypatch.setattr(LazyWeights, "_release", counting_release)
    from zsfw.compression import factorize

    outside_while_factorizing = []  # embedding, head: not in memory in the backward sweep
    svd = factorize.whitened_svd
    monkeypatch.setattr(factorize, "whitened_svd", lambda *a: outside_while_factorizing.append(
        [lazy.model.embed_tokens.weight.is_meta, lazy.lm_head.weight.is_meta, embedding() is None]) or svd(*a))
    streamed = {"driver": "streamed", "weights": "lazy"}
    lazy = lazy_model(llama_folder)
    assert all(p.is_meta for layer in lazy.model.layers for p in layer.parameters())
    replaced = find_targets(lazy, ["Linear"], ["lm_head"])
    embedding = weakref.ref(lazy.model.embed_tokens.weight)  # freed, not only out of the model
    _, report = zsfw.compress(lazy, recipe(ratio=0.6, execution=streamed, batch_size=2, storage=storage), windows,
                              output_dir=tmp_path / "lazy")
    assert most[0] == 1 and residency(lazy).holders == [0, 0]  # one layer in memory at a time, all let go
    assert all(t.is_meta for m in replaced.values() for t in m.parameters())  # nothing kept alive by them
    assert outside_while_factorizing and all(all(meta) for meta in outside_while_factorizing)
    assert not lazy.model.embed_tokens.weight.is_meta and lazy.lm_head.weight is lazy.model.embed_tokens.weight
    _, resident = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, execution={"driver": "streamed"},
                                                              batch_size=2, storage=storage),
                                windows, output_dir=tmp_path / "resident")
    assert [l.rank for l in report.layers] == [l.rank for l in resident.layers]
    assert [l.written_bytes for l in report.layers] == [l.written_bytes for l in resident.layers]
    assert _files(tmp_path / "lazy") == _files(tmp_path / "resident")  # byte for byte
    reloaded = zsfw.load(tmp_path / "lazy")
    compressed = zsfw.load(tmp_path / "resident")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=windows).logits, compressed(input_ids=windows).logits)


def test_lazy_weights_split_into_shards_as_layers_are_written(llama_folder, windows, tmp_path, monkeypatch):
    from zsfw.checkpoint import save
    from zsfw.residency import lazy_model

    monkeypatch.setattr(save, "LAZY_MAX_SHARD_BYTES", 4096)
    lazy = recipe(ratio=0.6, execution={"driver": "streamed", "weights": "lazy"})
    zsfw.compress(lazy_model(llama_folder), lazy, windows, output_dir=tmp_path / "out")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    reloaded = zsfw.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=windows).logits).all()


def test_lazy_statistics_cache_hits_and_factorizes_layer_by_layer(llama, llama_folder, windows, tmp_path):
    from zsfw.residency import lazy_model

    lazy = {"driver": "streamed", "weights": "lazy"}
    cache = tmp_path / "cache"
    zsfw.compress(lazy_model(llama_folder), recipe(ratio=0.6, execution=lazy), windows,
                  output_dir=tmp_path / "first", statistics_cache=cache)
    _, report = zsfw.compress(lazy_model(llama_folder), recipe(ratio=0.6, damping=1e-2, execution=lazy),
                              windows, output_dir=tmp_path / "second", statistics_cache=cache)
    assert report.statistics_cached and not report.factors_cached
    _, resident = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.6, damping=1e-2), windows,
                                output_dir=tmp_path / "resident")
    assert [l.rank for l in report.layers] == [l.rank for l in resident.layers]


def test_lazy_loading_refuses_what_it_cannot_do(llama_folder, windows, tmp_path):
    from safetensors.torch import load_file, save_file

    from zsfw.errors import ModelLoadError, NonFiniteError, RecipeError
    from zsfw.residency import lazy_model

    lazy = {"driver": "streamed", "weights": "lazy"}
    with pytest.raises(RecipeError, match="needs an output folder"):
        zsfw.compress(lazy_model(llama_folder), recipe(execution=lazy), windows)
    with pytest.raises(RecipeError, match="needs no corrector"):
        zsfw.compress(lazy_model(llama_folder), recipe(execution=lazy, corrector="projected_gradient"),
                      windows, output_dir=tmp_path / "out")
    with pytest.raises(RecipeError, match="weights 'lazy' needs driver 'streamed'"):
        recipe_obj = recipe(execution={"weights": "lazy"})
        zsfw.compress(lazy_model(llama_folder), recipe_obj, windows, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tensors = load_file(llama_folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, llama_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.weight"):
        zsfw.compress(lazy_model(llama_folder), recipe(execution=lazy), windows, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    del tensors["model.layers.0.input_layernorm.weight"]
    save_file(tensors, llama_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="no tensor 'model.layers.0.input_layernorm.weight'"):
        zsfw.compress(lazy_model(llama_folder), recipe(execution=lazy), windows, output_dir=tmp_path / "out")


def test_gemma3_mixed_sliding_and_full_attention_streams_exactly(windows):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from helpers import VOCAB, train_briefly

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128,
                              final_logit_softcapping=30.0)
    model = train_briefly(Gemma3ForCausalLM(config).eval(), windows)
    cal = CalibrationConfig(samples=8, sequence_length=32, batch_size=2)
    memory, _, loss = _groups(InMemoryDriver(model, windows, cal), model)
    streamed, _, s_loss = _groups(LayerStreamedDriver(model, windows, cal), model)
    assert s_loss == loss and set(streamed) == set(memory)
    for name, group in memory.items():
        assert torch.equal(streamed[name].covariance, group.covariance), name
        for member, grad in group.gradients.items():
            assert torch.equal(streamed[name].gradients[member], grad), member


def test_correction_cycles_stream_too_and_match_the_in_memory_ones(llama, windows, monkeypatch):
    from zsfw.compression import statistics

    whole_model_passes = []
    collect = statistics.collect

    def counted(*args, **kwargs):  # whole-model passes with a backward (validation is forward only)
        if kwargs.get("gradients", True):
            whole_model_passes.append(1)
        return collect(*args, **kwargs)

    monkeypatch.setattr("zsfw.compression.driver.collect", counted)
    corrected = {"name": "projected_gradient", "cycles": 2}
    memory, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32", corrector=corrected,
                                                                gradient_samples=4), windows)
    assert whole_model_passes
    whole_model_passes.clear()
    streamed, s_report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.5, storage="fp32", corrector=corrected,
                                                                    gradient_samples=4,
                                                                    execution={"driver": "streamed"}), windows)
    assert not whole_model_passes  # every gradient came from the layer sweeps
    assert s_report.correction_losses == report.correction_losses
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=windows).logits, memory(input_ids=windows).logits)
