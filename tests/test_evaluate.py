"""Perplexity: exact against a hand computation, offsets, BOS policy, non-finite windows."""

import math

import pytest
import torch

from zsfw.eval.perplexity import evaluate, perplexity


def _hand_nll(model, chunks):
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logp = torch.log_softmax(model(input_ids=chunk[None]).logits[0, :-1].double(), -1)
            total -= logp[torch.arange(chunk.numel() - 1), chunk[1:]].sum().item()
            count += chunk.numel() - 1
    return total / count, count


@pytest.fixture
def stream(windows):
    return windows.reshape(-1)  # 256 tokens


def test_perplexity_is_exp_of_the_hand_computed_mean_nll(llama, stream):
    result = perplexity(llama, stream, window=16, windows=3, offset=5)
    nll, count = _hand_nll(llama, [stream[5 + 16 * i: 5 + 16 * (i + 1)] for i in range(3)])
    assert result.tokens == count == 45 and result.windows == 3
    assert result.mean_nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)


def test_offset_is_respected(llama, stream):
    shifted = perplexity(llama, stream, window=16, windows=4, offset=37)
    assert shifted.mean_nll == perplexity(llama, stream[37:], window=16, windows=4).mean_nll
    assert shifted.mean_nll != perplexity(llama, stream, window=16, windows=4).mean_nll
    all_windows = perplexity(llama, stream, window=16, offset=37)
    assert all_windows.windows == (256 - 37) // 16


def test_bos_each_prefixes_every_window_and_scores_every_text_token(llama, stream):
    bos = 1
    result = perplexity(llama, stream, window=16, windows=3, bos_token_id=bos)
    chunks = [torch.cat([torch.tensor([bos]), stream[15 * i: 15 * (i + 1)]]) for i in range(3)]
    nll, count = _hand_nll(llama, chunks)
    assert result.bos == "each" and result.tokens == count == 45
    assert result.mean_nll == pytest.approx(nll, rel=1e-5)


def test_non_finite_windows_are_reported_not_dropped_silently(llama, stream):
    forward, calls = llama.forward, []

    def second_window_explodes(**kwargs):
        out = forward(**kwargs)
        calls.append(1)
        if len(calls) == 2:
            out.logits[0, 3, 0] = float("nan")
        return out

    llama.forward = second_window_explodes
    result = perplexity(llama, stream, window=16, windows=3)
    assert result.non_finite_windows == [1] and result.windows == 3 and result.tokens == 30
    del llama.forward
    nll, _ = _hand_nll(llama, [stream[0:16], stream[32:48]])
    assert result.mean_nll == pytest.approx(nll, rel=1e-5)


def test_too_few_tokens_is_a_clear_error(llama, stream):
    with pytest.raises(ValueError, match="256 tokens after offset 0 hold 16 windows of 16"):
        perplexity(llama, stream, window=16, windows=17)


def test_evaluate_reads_text_and_checks_the_bos_policy(llama, tokenizer):
    from helpers import word_docs

    result = evaluate(llama, word_docs(), tokenizer, window=16, windows=4)
    assert result.windows == 4 and math.isfinite(result.perplexity)
    with pytest.raises(ValueError, match="bos must be one of"):
        evaluate(llama, word_docs(), tokenizer, window=16, bos="sometimes")
    with pytest.raises(ValueError, match="BOS token"):
        evaluate(llama, word_docs(), tokenizer, window=16, bos="each")


def test_lm_eval_task_from_a_local_file_matches_a_hand_count(llama, tokenizer, tmp_path):
    pytest.importorskip("lm_eval")
    import json

    from zsfw.eval.lm_eval import run_task

    # counting sequences like those the tiny model was trained on: w{i} is token id i + 2
    items = []
    for start, step in ((8, 1), (20, 2), (3, 3), (30, 1), (11, 2), (40, 1)):
        ids = [start + step * i for i in range(5)]
        items.append({"question": " ".join(f"w{i - 2}" for i in ids[:-1]),
                      "choices": [f"w{ids[-1] - 2}", f"w{(ids[-1] + 17) % 60}"], "label": 0})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    (tmp_path / "task.yaml").write_text(
        "task: zsfw_counting\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    correct = 0
    with torch.no_grad():
        for item in items:
            context = tokenizer(item["question"], return_tensors="pt").input_ids
            logp = torch.log_softmax(llama(input_ids=context).logits[0, -1], -1)
            scores = [logp[tokenizer.convert_tokens_to_ids(c)].item() for c in item["choices"]]
            correct += scores.index(max(scores)) == item["label"]
    results = run_task(llama, tokenizer, tmp_path / "task.yaml")
    assert results["zsfw_counting"]["acc,none"] == pytest.approx(correct / len(items))
    assert correct >= 4  # the model learned to count: the check can tell models apart


def test_the_public_api_names_are_functions_even_after_their_modules_load():
    import zsfw
    import zsfw.checkpoint.load
    import zsfw.checkpoint.save
    import zsfw.compression.pipeline
    import zsfw.eval.perplexity
    import zsfw.serve.export
    import zsfw.serve.generate

    assert zsfw.evaluate is zsfw.eval.perplexity.evaluate and zsfw.generate is zsfw.serve.generate.generate
    assert zsfw.export is zsfw.serve.export.export
    assert zsfw.save is zsfw.checkpoint.save.save and zsfw.load is zsfw.checkpoint.load.load
    assert zsfw.compress is zsfw.compression.pipeline.compress and callable(zsfw.compress)
