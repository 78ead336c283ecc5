"""Tiny models built from configs (no downloads) and token windows they can learn from."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, **overrides)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


def patterned_windows(samples: int = 8, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Token windows with structure (a noisy counting sequence), so gradients carry signal."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (samples, 1), generator=g)
    step = torch.randint(1, 4, (samples, 1), generator=g)
    ids = (start + step * torch.arange(length)) % VOCAB
    noise = torch.rand(samples, length, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (samples, length), generator=g), ids)


def train_briefly(model, windows: torch.Tensor, steps: int = 60, lr: float = 3e-3):
    """A few optimizer steps so the tiny model is not at random init (scores then mean something)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(steps):
        batch = windows[i % windows.shape[0]:][:4]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def windows() -> torch.Tensor:
    return patterned_windows()


@pytest.fixture
def llama(windows):
    return train_briefly(tiny_llama(), windows)


@pytest.fixture
def qwen2(windows):
    return train_briefly(tiny_qwen2(), windows)


def word_docs(n: int = 40, words: int = 30) -> list[str]:
    """Documents of random words the tiny tokenizer knows (one token per word)."""
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
