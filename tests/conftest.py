"""Fixtures: tiny models trained briefly on patterned windows, and a word-level tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from helpers import WORDS, patterned_windows, tiny_llama, tiny_qwen2, train_briefly

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def windows() -> torch.Tensor:
    return patterned_windows()


@pytest.fixture
def llama(windows):
    return train_briefly(tiny_llama(), windows)


@pytest.fixture
def qwen2(windows):
    return train_briefly(tiny_qwen2(), windows)


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
