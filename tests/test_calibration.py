import copy
import json

import pytest
import torch

import zsfw
from helpers import recipe, word_docs as _docs
from zsfw.compression.calibration import calibration_windows, load_texts, sample_windows, tokenize
from zsfw.errors import CalibrationError


def test_sources_of_every_kind_give_the_same_texts(tmp_path):
    import datasets

    docs = _docs()
    (tmp_path / "a.txt").write_text("\n".join(docs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "c.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "1.txt").write_text("\n".join(docs[:20]))
    (folder / "2.txt").write_text("\n".join(docs[20:]))
    for source in (tmp_path / "a.txt", str(tmp_path / "b.jsonl"), tmp_path / "c.parquet", folder,
                   datasets.Dataset.from_dict({"text": docs}), iter(docs)):
        assert load_texts(source) == docs


def test_missing_or_mixed_sources_are_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "a.txt").write_text("w1 w2")
    (tmp_path / "b.jsonl").write_text('{"text": "w1"}')
    with pytest.raises(CalibrationError, match="mixes file kinds"):
        load_texts(tmp_path)
    with pytest.raises(CalibrationError, match="must yield strings"):
        load_texts([1, 2])


GOOD_LINE = '{"text": "w1 w2"}'


@pytest.mark.parametrize("lines,expected", [
    ([GOOD_LINE, '{"text": 5}'], r"line 2: \"text\" is a JSON number, not a string"),
    (['{"text": 5}', '{"text": 6}'], r"line 1: \"text\" is a JSON number, not a string"),
    ([GOOD_LINE] * 3 + ['{"text": ["w1"]}'], r"line 4: \"text\" is a JSON array, not a string"),
    ([GOOD_LINE, '{"text": {"a": 1}}'], r"line 2: \"text\" is a JSON object, not a string"),
    ([GOOD_LINE, "[1, 2]"], r"line 2 is a JSON array, not an object"),
    ([GOOD_LINE, "7"], r"line 2 is a JSON number, not an object"),
    ([GOOD_LINE, '{"text": "w3'], r"line 2 is not valid JSON \(Unterminated string starting at: column 10\)"),
    ([GOOD_LINE, '{"text": "w1 caf\u00e9"}'], r"line 2 is not UTF-8 \(at byte offset 16 of the line\)"),
], ids=["number", "all numbers", "array late", "object", "array line", "number line", "invalid", "latin-1"])
def test_r11_a_bad_json_line_is_named(tmp_path, lines, expected):
    path = tmp_path / "cal.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(CalibrationError, match=f"calibration data '{path}' {expected}; each line must be "
                                               f"a JSON object with a string \"text\"") as info:
        load_texts(path)
    assert "\n" not in str(info.value)


def test_r11_a_non_string_text_column_is_named(tmp_path):
    import datasets

    with pytest.raises(CalibrationError, match=r"column 'text' holds Value\('int64'\), not strings"):
        load_texts(datasets.Dataset.from_dict({"text": [1, 2]}))
    (tmp_path / "cal.json").write_text(json.dumps([{"text": 1}, {"text": 2}]))  # one JSON document
    with pytest.raises(CalibrationError, match=r"cal\.json': dataset column 'text' holds Value\('int64'\)"):
        load_texts(tmp_path / "cal.json")


def test_windows_are_deterministic_distinct_and_within_max_tokens(tokenizer):
    tokens = tokenize(tokenizer, _docs())
    assert tokens.numel() == 40 * 31  # 30 words + EOS per document
    a = sample_windows(tokens, 10, 32, seed=3)
    assert torch.equal(a, sample_windows(tokens, 10, 32, seed=3))
    assert not torch.equal(a, sample_windows(tokens, 10, 32, seed=4))
    assert len({tuple(w.tolist()) for w in a}) == 10
    limited = sample_windows(tokens, 4, 32, seed=0, max_tokens=128)
    chunks = {tuple(tokens[i:i + 32].tolist()) for i in range(0, 128, 32)}
    assert {tuple(w.tolist()) for w in limited} == chunks


def test_too_little_text_says_how_much_was_found(tokenizer):
    with pytest.raises(CalibrationError, match=r"has 1240 tokens, enough for 38 windows of 32; 50 were requested"):
        calibration_windows(tokenizer, _docs(), samples=50, sequence_length=32)


def test_compress_from_a_text_file(tmp_path, tokenizer, llama):
    path = tmp_path / "cal.txt"
    path.write_text("\n".join(_docs()))
    recipe = {"s": {"m": {"ZeroSumSVDModifier": {"ratio": 0.7, "calibration": {"samples": 6, "sequence_length": 32}}}}}
    _, report = zsfw.compress(llama, recipe, path, tokenizer=tokenizer)
    assert report.calibration_tokens == 6 * 32


def test_d4_too_few_calibration_tokens_warn_and_far_too_few_are_refused(llama, windows, caplog):
    with caplog.at_level("WARNING", logger="zsfw"):
        _, report = zsfw.compress(copy.deepcopy(llama), recipe(ratio=0.9, samples=2, sequence_length=16),
                                  windows[:2, :16])
    (warning,) = report.warnings
    assert "only 32 calibration tokens" in warning and "mlp.down_proj" in warning and "64 wide" in warning
    assert any(warning in r.message for r in caplog.records)
    with pytest.raises(CalibrationError, match=r"4 calibration tokens for '.*down_proj', whose input is 64 wide: at least 8"):
        zsfw.compress(llama, recipe(ratio=0.9, samples=1, sequence_length=4), windows[:1, :4])


_TEXT = ("First line. \n \n = Title = \nA sentence, with 12 digits 345.\nAnother\tone ends here.\n\n"
         "After a blank line: words; more words!\n  indented line\nlast 'quoted' it's fine.\r\nWindows end\n") * 6


def _bpe(pre_tokenizer):
    """A small BPE tokenizer trained offline on ``_TEXT`` with ``pre_tokenizer`` (and on texts
    ending in a blank line, so that "\n\n" is one token there, as in SmolLM2's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    core.train_from_iterator([_TEXT, *["end.\n\n"] * 50], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                                                          initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_one_call():
    from tokenizers import pre_tokenizers
    from zsfw.compression.calibration import _cuts, encode

    tokenizer = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))
    whole = tokenizer(_TEXT, add_special_tokens=False)["input_ids"]
    assert len(_cuts(_TEXT, 40)) > 10  # many pieces
    assert encode(tokenizer, _TEXT, piece_chars=40).tolist() == whole
    # why no cut follows a run of whitespace: the run would be one piece at a text's end
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids("end.\n\n") + ids("After") != ids("end.\n\nAfter")


def test_a_tokenizer_that_marks_every_texts_start_gets_the_text_whole():
    from tokenizers import pre_tokenizers
    from zsfw.compression.calibration import _cuts, encode

    tokenizer = _bpe(pre_tokenizers.Metaspace(prepend_scheme="always"))
    whole = tokenizer(_TEXT, add_special_tokens=False)["input_ids"]
    cut = _cuts(_TEXT, 40)[0]
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids(_TEXT[:cut]) + ids(_TEXT[cut:]) != whole  # pieces would differ here
    assert encode(tokenizer, _TEXT, piece_chars=40).tolist() == whole


@pytest.mark.parametrize("bad", [64, -1])
def test_token_ids_outside_the_vocabulary_are_one_line_errors(llama, windows, bad):
    ids = windows[:4].clone()
    ids[2, 5] = bad  # the embedding would raise a bare IndexError
    message = rf"holds token id {bad}, outside the model's vocabulary of 64: ids must be in 0\.\.63$"
    with pytest.raises(CalibrationError, match=rf"^a tensor dataset {message}"):
        zsfw.compress(llama, recipe(ratio=0.7, samples=4), ids)
    with pytest.raises(CalibrationError, match=rf"^validation {message}"):  # held-out windows too
        zsfw.compress(llama, recipe(ratio=0.7, samples=4, corrector="projected_gradient"), windows[:4],
                      validation=ids)
