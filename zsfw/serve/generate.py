"""Text generation from a (compressed) model with a static KV cache and a compiled forward.

Prompts are left-padded to the smallest of a few length buckets, so a new prompt length reuses
the graph of its bucket instead of compiling another. The static KV cache's length is part of
the compiled graph, so it is bucketed too: bucket + ``max_new_tokens`` rounded up to a power of
two (and ``transformers`` never shrinks a model's cache between calls), so calls with 10 or 100
new tokens after a 64-token bucket share one graph. ``transformers`` compiles the decoding
forward itself when the cache is static, but on CPU only when told to
(``CompileConfig(_compile_all_devices=True)``): that is what ``compile=True`` sets. Each
(batch, bucket, cache length) compiles once per process; a compile for a shape already seen is a
recompile, and it is warned about.
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any

import torch
from torch import nn

from zsfw.errors import ServingError

log = logging.getLogger(__name__)

BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)

_seen_shapes: set[tuple] = set()


def bucket_of(length: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ServingError(f"a prompt of {length} tokens is longer than the largest bucket "
                     f"({max(buckets)}); pass larger buckets")


@functools.cache
def _compile_config():
    """One CompileConfig for the process: transformers re-wraps the model in a new
    ``torch.compile`` (and so recompiles) whenever the config object it is given changes."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # a class attribute, not an init argument
    return config


def cache_length(bucket: int, max_new_tokens: int) -> int:
    """The static cache's length for a prompt bucket: the next power of two that holds the
    prompt and the new tokens."""
    return 1 << (bucket + max_new_tokens - 1).bit_length()


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def check_settings(max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> None:
    """Refuse decoding settings ``generate`` cannot honour, before the prompts are tokenized
    (transformers would fail deep inside, or loop on a cache sized for them)."""
    if max_new_tokens < 1:
        raise ServingError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:  # also NaN; greedy decoding is do_sample=False
        raise ServingError(f"temperature (--temperature) must be > 0 when sampling, got {temperature}; "
                           f"for greedy decoding leave sampling off (no --sample)")
    if not 0 < top_p <= 1:
        raise ServingError(f"top_p (--top-p) must be in (0, 1], got {top_p}")


def generate(model: nn.Module, tokenizer: Any, prompts: str | list[str], max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             compile: bool = True, buckets: tuple[int, ...] = BUCKETS, seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (greedy unless ``do_sample``), one string per prompt."""
    from transformers import GenerationConfig

    check_settings(max_new_tokens, do_sample, temperature, top_p)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    longest = max(len(ids) for ids in tokenizer(prompts)["input_ids"])
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and longest + max_new_tokens > context:
        raise ServingError(f"a prompt of {longest} tokens plus max_new_tokens {max_new_tokens} "
                           f"(--max-new-tokens) is {longest + max_new_tokens} tokens, more than the "
                           f"model's context of {context} (max_position_embeddings); ask for fewer "
                           f"new tokens or shorten the prompt")
    bucket = bucket_of(longest, buckets)
    batch = tokenizer(prompts, return_tensors="pt", padding="max_length", max_length=bucket)
    device = next(model.parameters()).device
    cache_len = cache_length(bucket, max_new_tokens)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, max_cache_len=cache_len, do_sample=do_sample,
        temperature=temperature, top_p=top_p, cache_implementation="static",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, disable_compile=not compile,
        compile_config=_compile_config() if compile else None)
    shape = (id(model), len(prompts), bucket, cache_len, do_sample)
    before = _graphs_compiled()
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=batch.input_ids.to(device),
                             attention_mask=batch.attention_mask.to(device), generation_config=config)
    compiled = _graphs_compiled() - before
    if compile and compiled and shape in _seen_shapes:
        warnings.warn(f"generate recompiled the model ({compiled} new graph(s)) for batch "
                      f"{len(prompts)}, bucket {bucket}, cache length {cache_len}, a shape it "
                      f"had compiled before; see TORCH_LOGS=recompiles for why", stacklevel=2)
    elif compiled:
        log.info("compiled the decoding forward for batch %d, bucket %d, cache length %d",
                 len(prompts), bucket, cache_len)
    if compile:  # an eager run of the same model compiles nothing: it must not arm the warning
        _seen_shapes.add(shape)
    return tokenizer.batch_decode(out[:, bucket:], skip_special_tokens=True)
