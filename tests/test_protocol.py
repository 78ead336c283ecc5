"""The benchmarks' window drawing (``benchmarks/protocol.py``) on synthetic token streams: the
authors' calibration and evaluation windows, held-out windows apart from them and from each
other, the md5 guard, and the held-out figures every benchmark row records."""

import hashlib
import importlib.util
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import protocol  # noqa: E402

ANCHOR = protocol.DEFAULT_REFERENCE_TEXT.parent
STREAM = 669_013  # the reference text's length in SmolLM2's tokens


def _positions(windows: torch.Tensor) -> set[int]:
    """The stream positions a set of windows covers (the synthetic stream's ids are positions)."""
    return set(windows.reshape(-1).tolist())


def _anchor_windows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' calibration and evaluation windows of ``ids``, drawn by the anchor's own
    ``windows.py`` (a stand-in tokenizer hands it ``ids`` for its text)."""
    spec = importlib.util.spec_from_file_location("anchor_windows", ANCHOR / "windows.py")
    anchor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(anchor)
    state = random.getstate()  # windows.py seeds the global generator
    try:
        return anchor.windows(lambda text, add_special_tokens: {"input_ids": ids.tolist()})
    finally:
        random.setstate(state)


def test_the_reference_calibration_and_evaluation_windows_are_the_anchor_ones():
    if not (ANCHOR / "windows.py").is_file() or not (ANCHOR / "wiki.txt").is_file():
        pytest.skip(f"the anchor's windows.py and wiki.txt are not in {ANCHOR} (the shared workspace)")
    ids = torch.arange(STREAM)
    calibration, evaluation = _anchor_windows(ids)
    drawn = protocol.reference_draw(ids, check_md5=False)
    assert torch.equal(drawn.calibration, calibration) and torch.equal(drawn.evaluation, evaluation)
    assert drawn.md5 == hashlib.md5(calibration.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("training_length", [protocol.CAL_LEN, protocol.EVAL_LEN])
@pytest.mark.parametrize("seed", [protocol.VAL_SEED, 5])
def test_reference_calibration_validation_training_and_evaluation_windows_are_disjoint(seed, training_length):
    drawn = protocol.reference_draw(torch.arange(STREAM), check_md5=False, validation_seed=seed,
                                    training_length=training_length)
    assert drawn.calibration.shape == (protocol.CAL_N, protocol.CAL_LEN)
    assert drawn.validation.shape == (protocol.VAL_N, protocol.CAL_LEN)
    assert drawn.training.shape == (protocol.TRAIN_N, training_length)
    assert drawn.evaluation.shape == (protocol.EVAL_N, protocol.EVAL_LEN)
    sets = {name: _positions(getattr(drawn, name)) for name in ("calibration", "validation", "training", "evaluation")}
    assert len(sets["validation"]) == protocol.VAL_N * protocol.CAL_LEN  # no two validation windows overlap
    assert len(sets["training"]) == protocol.TRAIN_N * training_length
    for a in sets:
        for b in sets:
            assert a == b or not sets[a] & sets[b], (a, b)
    assert max(sets["calibration"] | sets["validation"] | sets["training"]) < protocol.CUT
    assert min(sets["evaluation"]) >= protocol.CUT


def test_another_validation_seed_keeps_the_authors_calibration_windows():
    ids = torch.arange(STREAM)
    one, other = (protocol.reference_draw(ids, check_md5=False, validation_seed=s) for s in (4, 5))
    assert torch.equal(one.calibration, other.calibration) and not torch.equal(one.validation, other.validation)


def test_other_tokens_than_the_reference_are_refused_by_their_md5():
    ids = torch.arange(STREAM)
    with pytest.raises(SystemExit, match=r"calibration ids md5 [0-9a-f]{32} != the reference "
                                         rf"{protocol.REFERENCE_MD5}: not the reference tokens"):
        protocol.reference_draw(ids)
    assert protocol.reference_draw(ids, calibration_seed=7).md5  # another draw is zsfw's own: no check
    with pytest.raises(SystemExit, match="would overlap the first 400000"):
        protocol.reference_draw(torch.arange(protocol.CUT + protocol.EVAL_N * protocol.EVAL_LEN - 1), check_md5=False)


def test_the_reference_md5_is_the_anchor_one():
    """protocol.py checks the calibration ids against the md5 ANCHOR.md gives for them; with
    SmolLM2's tokenizer at hand (zsfw's cache), the reference text gives those very ids."""
    if not (ANCHOR / "ANCHOR.md").is_file():
        pytest.skip(f"no {ANCHOR / 'ANCHOR.md'} (the shared workspace) to read the authors' md5 from")
    stated = re.search(r"md5 of the \(32×512\) int64 ids, row-major, is `([0-9a-f]{32})`",
                       " ".join((ANCHOR / "ANCHOR.md").read_text().split()))
    assert stated and stated.group(1) == protocol.REFERENCE_MD5
    from zsfw.sources import MODEL_NAME, cache_dir

    model = cache_dir() / "models" / MODEL_NAME
    if not protocol.DEFAULT_REFERENCE_TEXT.is_file():
        pytest.skip(f"no reference text {protocol.DEFAULT_REFERENCE_TEXT}: the reference ids cannot be made here")
    if not (model / "config.json").is_file():
        pytest.skip(f"{MODEL_NAME}'s tokenizer is not in {model} (a benchmark's first run fetches it): "
                    f"the reference ids cannot be made here")
    from transformers import AutoTokenizer

    drawn = protocol.reference_windows(AutoTokenizer.from_pretrained(model), check_md5=False)
    assert drawn.md5 == protocol.REFERENCE_MD5


def test_zsfw_calibration_validation_and_evaluation_windows_are_disjoint():
    drawn = protocol.zsfw_draw(torch.arange(protocol.CUT + protocol.EVAL_N * protocol.EVAL_LEN), samples=8)
    sets = {name: _positions(getattr(drawn, name)) for name in ("calibration", "validation", "evaluation")}
    assert [len(s) for s in sets.values()] == [8 * protocol.CAL_LEN, protocol.VAL_N * protocol.CAL_LEN,
                                               protocol.EVAL_N * protocol.EVAL_LEN]
    assert not sets["calibration"] & sets["validation"]
    assert max(sets["calibration"] | sets["validation"]) < protocol.CUT <= min(sets["evaluation"])


class _Uniform(nn.Module):
    """A model whose next-token distribution is uniform over ``vocabulary`` tokens, except that a
    window starting with token 0 gets NaN logits."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.vocabulary = vocabulary
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        logits = torch.zeros(*input_ids.shape, self.vocabulary) + self.weight
        logits[input_ids[:, 0] == 0] = float("nan")
        return type("Output", (), {"logits": logits})()


def test_every_row_records_the_validation_loss_and_the_dropped_windows():
    model = _Uniform(16)
    validation = torch.randint(1, 16, (3, 8))
    wiki, news = torch.randint(1, 16, (4, 8)), torch.randint(1, 16, (2, 8))
    news[1, 0] = 0  # one window's logits are not finite: left out, and counted
    row = protocol.held_out(model, validation, {"wiki": wiki, "news": news})
    assert row["val_loss"] == pytest.approx(torch.log(torch.tensor(16.0)).item())
    assert row["wiki_ppl"] == pytest.approx(16) and row["news_ppl"] == pytest.approx(16)
    assert row["dropped_windows"] == {"validation": 0, "wiki": 0, "news": 1}
    assert protocol.held_out(model, None, {"wiki": wiki})["val_loss"] is None
