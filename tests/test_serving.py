"""Compressed models compiled, generating with a static cache, and exported as .pt2 packages."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import zsfw
from zsfw._fs import current_umask
from helpers import recipe

FORMATS = ["fp32", "bf16", "fp16", "int8", {"name": "int8", "activation": "dynamic"}, "fp8", "packed", "pivga",
           {"name": "pivga", "dtype": "int8"}, {"name": "int4", "group_size": 16},
           {"name": "auto", "formats": ["bf16", {"name": "int3", "group_size": 16}]}]
COMPILED_TOLERANCE = 1e-4  # relative logit error, compiled vs eager (inductor fuses and reorders)
# int8 dynamic activations: a reordered max can move an activation's rounding by one int8 step
DYNAMIC_ACTIVATION_TOLERANCE = 1e-2


def _compress(model, windows, storage, ratio=0.6):
    return zsfw.compress(copy.deepcopy(model), recipe(ratio=ratio, storage=storage), windows)[0]


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("storage", FORMATS, ids=lambda s: s if isinstance(s, str) else "-".join(map(str, s.values())))
def test_every_format_compiles_without_graph_breaks_and_matches_eager(qwen2, windows, storage):
    model = _compress(qwen2, windows, storage)
    ids = windows[:2]
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids, use_cache=False)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        fast = compiled(input_ids=ids, use_cache=False).logits
    dynamic = isinstance(storage, dict) and storage.get("activation") == "dynamic"
    assert _relative_error(fast, eager) < (DYNAMIC_ACTIVATION_TOLERANCE if dynamic else COMPILED_TOLERANCE)


def test_static_cache_generation_equals_eager_greedy_token_for_token(llama, windows, tokenizer):
    from zsfw.serve.generate import _graphs_compiled, generate

    model = _compress(llama, windows, "int8", ratio=0.7)
    prompts = ["w1 w2 w3 w4", "w10 w12 w14"]
    before = _graphs_compiled()
    fast = generate(model, tokenizer, prompts, max_new_tokens=10, compile=True, buckets=(8, 16))
    assert _graphs_compiled() > before  # the decoding forward really was compiled
    eager = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=1)
        eager.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert fast == eager
    generate(model, tokenizer, ["w3 w5 w7"], max_new_tokens=4, compile=True, buckets=(8, 16))
    compiled = _graphs_compiled()
    # the same batch size and bucket again, with other prompt lengths, and a shape seen before
    fast_again = generate(model, tokenizer, prompts[::-1], max_new_tokens=10, compile=True, buckets=(8, 16))
    generate(model, tokenizer, ["w3 w5"], max_new_tokens=4, compile=True, buckets=(8, 16))
    assert fast_again == eager[::-1]
    assert _graphs_compiled() == compiled  # nothing recompiled


def test_a_first_compile_after_eager_runs_of_the_same_shape_is_not_called_a_recompile(llama, tokenizer):
    import warnings

    from zsfw.serve.generate import generate

    model = copy.deepcopy(llama)
    generate(model, tokenizer, "w1 w2", max_new_tokens=3, compile=False, buckets=(8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recompile warning would fail the test
        generate(model, tokenizer, "w1 w2", max_new_tokens=3, compile=True, buckets=(8,))
    with pytest.warns(UserWarning, match="recompiled"):  # the warning itself still works
        torch._dynamo.reset()  # forget the graphs: the same shape compiles again
        generate(model, tokenizer, "w1 w2", max_new_tokens=3, compile=True, buckets=(8,))


def test_other_new_token_counts_in_one_cache_bucket_reuse_the_compiled_graph(llama, tokenizer):
    from zsfw.serve.generate import _graphs_compiled, cache_length, generate

    assert [cache_length(8, n) for n in (1, 3, 8, 9, 24, 25)] == [16, 16, 16, 32, 32, 64]
    model = copy.deepcopy(llama)
    generate(model, tokenizer, "w1 w2", max_new_tokens=6, compile=True, buckets=(8,))
    compiled = _graphs_compiled()
    for n in (3, 8, 1):  # cache 8 + n ≤ 16: the same static cache, the same graph
        generate(model, tokenizer, "w1 w2", max_new_tokens=n, compile=True, buckets=(8,))
    assert _graphs_compiled() == compiled
    generate(model, tokenizer, "w1 w2", max_new_tokens=12, compile=True, buckets=(8,))
    assert _graphs_compiled() > compiled  # a longer cache is another graph: the test can fail


def test_a_prompt_longer_than_every_bucket_is_a_clear_error(llama, tokenizer):
    from zsfw.serve.generate import generate

    with pytest.raises(ValueError, match="longer than the largest bucket"):
        generate(llama, tokenizer, " ".join(["w1"] * 20), max_new_tokens=2, buckets=(8, 16))


@pytest.mark.parametrize("storage", ["bf16", "int8", "pivga", ["bf16", "pivga", "int8", "packed"]],
                         ids=["bf16", "int8", "pivga", "auto"])
def test_pt2_package_runs_without_zsfw_and_gives_the_same_logits(qwen2, windows, tokenizer, storage, tmp_path):
    from zsfw.serve.export import export

    model = _compress(qwen2, windows, storage)
    package = export(model, tmp_path / "model.pt2", tokenizer, max_sequence=64)
    ids = windows[:3, :40]
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent("""
        import json, sys, torch
        runner = torch._inductor.aoti_load_package(sys.argv[1])
        logits = runner(torch.load(sys.argv[2]))
        torch.save(logits, sys.argv[3])
        import model_runner  # D7: the standalone checking loader shipped next to the package
        run = model_runner.load(sys.argv[1])
        ids = torch.load(sys.argv[2])
        torch.save(run(ids[:1]), sys.argv[3] + ".one")  # batch 1 under the package's own guards
        for bad, message in ((ids.float(), "int64"), (ids + 1000, "token ids must be in 0..63"),
                             (ids[0], "2-D"), (torch.zeros(1, 65, dtype=torch.long), "outside")):
            try:
                run(bad)
            except ValueError as exc:
                assert message in str(exc), (message, exc)
            else:
                raise AssertionError(f"accepted {message}")
        loaded = [m for m in sys.modules if m.split(".")[0] in ("zsfw", "transformers", "torchao")]
        assert not loaded, loaded
        """)
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(package), str(tmp_path / "ids.pt"),
                             str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _relative_error(torch.load(tmp_path / "out.pt"), expected) < COMPILED_TOLERANCE
    assert _relative_error(torch.load(str(tmp_path / "out.pt") + ".one"), expected[:1]) < COMPILED_TOLERANCE
    assert package.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    manifest = (tmp_path / "model.json").read_text()
    name = "auto" if isinstance(storage, list) else storage  # a list of formats is storage: auto
    assert '"seq": [\n        2,\n        64\n      ]' in manifest and f'"name": "{name}"' in manifest
    assert (tmp_path / "model.tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("settings,expected", [
    ({"max_new_tokens": 0}, r"max_new_tokens \(--max-new-tokens\) must be at least 1, got 0"),
    ({"max_new_tokens": -1}, r"must be at least 1, got -1"),
    ({"do_sample": True, "temperature": 0.0}, r"temperature \(--temperature\) must be > 0 when sampling, got 0\.0"),
    ({"do_sample": True, "temperature": float("nan")}, r"must be > 0 when sampling, got nan"),
    ({"top_p": 0.0}, r"top_p \(--top-p\) must be in \(0, 1\], got 0\.0"),
    ({"top_p": 1.5}, r"must be in \(0, 1\], got 1\.5"),
    ({"max_new_tokens": 126}, r"a prompt of 3 tokens plus max_new_tokens 126 .* is 129 tokens, more than the "
                              r"model's context of 128 \(max_position_embeddings\)"),
    ({"max_new_tokens": 100_000}, r"is 100003 tokens, more than the model's context of 128"),
], ids=["zero", "negative", "temperature 0", "temperature nan", "top_p 0", "top_p 1.5", "one past", "huge"])
def test_r8_generation_settings_are_checked(tokenizer, settings, expected):
    from helpers import tiny_llama
    from zsfw.errors import ServingError
    from zsfw.serve.generate import generate

    with pytest.raises(ServingError, match=expected):
        generate(tiny_llama(), tokenizer, "w1 w2 w3", compile=False, buckets=(8,), **settings)


def test_r8_a_continuation_that_fills_the_context_exactly_is_generated(tokenizer):
    from helpers import tiny_llama
    from zsfw.serve.generate import generate

    text, = generate(tiny_llama(), tokenizer, "w1 w2 w3", max_new_tokens=125, compile=False, buckets=(8,))
    assert len(tokenizer(text)["input_ids"]) == 125  # the word tokenizer: one token per word, no EOS made
