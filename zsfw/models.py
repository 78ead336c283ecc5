"""Loading the causal LM to compress: a checkpoint folder, a hub id, a GGUF file or the default."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from zsfw.errors import ModelLoadError
from zsfw.residency import lazy_model

DEFAULT_MODEL = "default"
"""Stands for the embedded default model, SmolLM2-135M-Instruct (see ``zsfw.sources``)."""

log = logging.getLogger(__name__)


def load_model(source: str | Path = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32, lazy: bool = False):
    """(model, tokenizer) from a checkpoint folder, a ``.gguf`` file, a hub id or ``"default"``,
    in ``dtype`` (a torch dtype, its name, or "auto": the checkpoint's own).

    ``lazy``: only what lies outside the decoder layers is loaded; the layers are read from the
    folder's safetensors one at a time as the streamed driver needs them (``zsfw.residency``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(source) == DEFAULT_MODEL:
        from zsfw.sources import default_model_path

        source = default_model_path()
    path = Path(source).expanduser()
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(path)!r} does not exist")
        kwargs["gguf_file"] = path.name
        location = str(path.parent)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{str(path)!r} is not a model folder: it has no config.json")
        location = str(path)
    elif str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise ModelLoadError(f"model {str(source)!r} does not exist")
    else:
        location = str(source)  # a hub id, which works only when the hub is reachable
    if lazy and not path.is_dir():
        raise ModelLoadError(f"only a checkpoint folder can be loaded lazily, not {str(source)!r}; "
                             f"use execution.weights 'resident'")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        model = (lazy_model(path, dtype) if lazy else
                 AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {str(source)!r} as a causal LM: {first}") from exc
    if "gguf_file" in kwargs:  # dequantized on load: a plain float model from here on
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer



def own_tokenizer(model: torch.nn.Module, needed_for: str | None = None):
    """The tokenizer saved with ``model`` (at its ``name_or_path``). Without one: a one-line
    ``ModelLoadError`` when ``needed_for`` says what needs it, else None (logged)."""
    from transformers import AutoTokenizer

    source = getattr(model, "name_or_path", "") or ""
    try:
        if source:
            return AutoTokenizer.from_pretrained(source)
        problem = "the model has no name_or_path"
    except (OSError, ValueError) as e:
        problem = f"none found at {source!r} ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if needed_for:
        raise ModelLoadError(f"{needed_for} needs a tokenizer and {problem}: pass tokenizer= "
                             f"(or token ids)")
    (log.warning if source else log.info)("no tokenizer: %s; pass tokenizer= to save one with the model",
                                          problem)
    return None
