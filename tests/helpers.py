"""Helpers shared by the tests: tiny models built from configs (no downloads), token windows
they can learn from, documents the tiny tokenizer knows, and small recipes."""

from __future__ import annotations

import torch

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama of width 32 (``overrides`` replace any of its config's settings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True), **overrides})
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


def word_docs(n: int = 40, words: int = 30) -> list[str]:
    """Documents of random words the tiny tokenizer knows (one token per word)."""
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n)]


def recipe(samples: int = 8, sequence_length: int = 32, **modifier) -> dict:
    """A recipe dict of one ZeroSumSVDModifier with ``modifier``'s keys and small calibration
    (``calibration=`` replaces it whole; ``gradient_samples`` etc. can be given as keys)."""
    cal = modifier.pop("calibration", None) or {"samples": samples, "sequence_length": sequence_length}
    for key in ("gradient_samples", "batch_size", "seed", "checkpoint_layers", "max_tokens"):
        if key in modifier:
            cal[key] = modifier.pop(key)
    return {"test_stage": {"modifiers": {"ZeroSumSVDModifier": {"calibration": cal, **modifier}}}}


def stored_bytes(model, report) -> int:
    """Bytes the model's compressed modules hold in parameters and buffers (what a byte model
    must agree with), summed over the report's layers."""
    modules = dict(model.named_modules())
    return sum(t.numel() * t.element_size() for layer in report.layers
               for t in [*modules[layer.name].parameters(), *modules[layer.name].buffers()])


def source_model(folder: str, execution: dict):
    """The model saved in ``folder``, loaded as ``execution`` says (lazily or whole)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from zsfw.residency import lazy_model

    if execution.get("weights") == "lazy":
        return lazy_model(Path(folder))
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def billion_laughs(levels: int = 10, width: int = 10) -> str:
    """A 15-line recipe whose ``ignore`` expands to ``width ** levels`` strings through nested
    YAML aliases ("billion laughs")."""
    lines = ["s:", "  m:", "    ZeroSumSVDModifier:", "      targets: [Linear]", "      ignore:"]
    lines.append("        - &l0 [" + ", ".join(["lol"] * width) + "]")
    for level in range(1, levels):
        lines.append(f"        - &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def allocation_gaps(expected, other, layers_off: int = 3, components_off: int = 2) -> list[str]:
    """How two runs' allocations (report layers) differ beyond what rounding can flip: a GPU's
    sums differ from the CPU's in their last bits, so near-tied components may trade places
    between layers. Allowed: at most ``layers_off`` layers whose ranks differ, by at most
    ``components_off`` components each, and total bytes within one component's bytes per layer."""
    gaps = []
    moved = [(a.name, a.rank, b.rank) for a, b in zip(expected, other) if a.rank != b.rank]
    if len(moved) > layers_off:
        gaps.append(f"{len(moved)} layers' ranks differ (at most {layers_off}): {moved}")
    gaps += [f"{name}: rank {a} vs {b}" for name, a, b in moved if abs(a - b) > components_off]
    component = sum(2 * sum(layer.shape) for layer in expected)  # bf16 factors: one column of B and row of A
    off = abs(sum(layer.bytes for layer in other) - sum(layer.bytes for layer in expected))
    if off > component:
        gaps.append(f"total bytes differ by {off} (at most {component})")
    return gaps
