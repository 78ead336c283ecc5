"""The ``zsfw`` command: ``compress``, ``eval``, ``inspect``, ``run``, ``export``, ``plugins``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _compress(args: argparse.Namespace) -> int:
    from zsfw.capabilities import check_lazy_output
    from zsfw.compression import distributed
    from zsfw.compression.calibration import drawn_windows, text_tokens
    from zsfw.checkpoint.destination import is_zsfw_output
    from zsfw.compression.pipeline import already_compressed, compress
    from zsfw.compression.factor_store import check_spill
    from zsfw.eval.gains import snapshot, summary
    from zsfw.models import DEFAULT_MODEL, load_model
    from zsfw.errors import ModelLoadError
    from zsfw.recipe import load_recipe
    from zsfw.residency import compute_device, place

    recipe = load_recipe(args.recipe)  # a bad recipe, output or spill folder fails before the model loads
    check_spill()
    if args.output is not None:
        from zsfw.checkpoint.destination import check_destination

        args.output = check_destination(args.output, args.overwrite, [args.model])
    else:
        print("zsfw: no --output: the compressed model is measured, then discarded (pass --output "
              "DIR to keep it)", file=sys.stderr)
    if args.model != DEFAULT_MODEL and is_zsfw_output(Path(args.model).expanduser()):
        raise ModelLoadError(already_compressed(args.model))
    check_lazy_output(recipe.modifier.execution, args.output)
    lazy = recipe.modifier.execution.weights == "lazy"
    if lazy and args.held_out:
        print("zsfw: execution.weights 'lazy': no held-out measurement here (the model is never "
              "whole in memory); run `zsfw eval` on the output", file=sys.stderr)
        args.held_out = 0
    execution = recipe.modifier.execution
    model, tokenizer = load_model(args.model, dtype=execution.dtype, lazy=lazy)
    if execution.device is not None:  # before the held-out measurement, which runs there too
        place(model, compute_device(execution.device))
    m = recipe.modifier
    drawn = drawn_windows(text_tokens(tokenizer, args.dataset or _news_text()), m.calibration,
                          m.validation_windows, m.training_windows, args.held_out)
    held = drawn.measurement
    helper = distributed.launched() and distributed.rank() != 0  # under torchrun: process 0 reports
    before = None if held is None or helper else snapshot(model, tokenizer, held)
    _, report = compress(model, recipe, drawn.calibration, output_dir=args.output, tokenizer=tokenizer,
                         overwrite=args.overwrite, statistics_cache=args.statistics_cache,
                         validation=drawn.validation, training=drawn.training,
                         allow_non_finite=args.allow_non_finite)
    if helper:
        return 0
    after = None if held is None else snapshot(model, tokenizer, held)
    if args.table:
        print(report.table())
    print(summary(report, args.output, before, after, held))
    return 0


def _news_text() -> Path:
    from zsfw.sources import news_text_path

    return news_text_path()


def _eval(args: argparse.Namespace) -> int:
    from zsfw.models import load_model

    model, tokenizer = load_model(args.model)
    if args.lm_eval is not None:
        from zsfw.eval.lm_eval import run_task

        for task, metrics in run_task(model, tokenizer, args.lm_eval, limit=args.limit).items():
            print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                          if isinstance(v, float)))
        return 0
    from zsfw.errors import EvaluationError
    from zsfw.eval.perplexity import evaluate

    dataset = args.dataset
    if dataset is None:
        from zsfw.sources import wikipedia_text_path

        dataset = wikipedia_text_path()
    result = evaluate(model, dataset, tokenizer, window=args.window, windows=args.windows,
                      offset=args.offset, bos=args.bos)
    if result.non_finite_windows:
        print(f"non-finite logits in windows {result.non_finite_windows} (left out of the mean)")
    if not result.tokens:
        raise EvaluationError(f"no window of {result.window} tokens had finite logits: the model "
                              f"outputs NaN or Inf; perplexity is undefined")
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.mean_nll:.5f}) over {result.tokens} "
          f"tokens in {result.windows} windows of {result.window} from token {result.offset}, "
          f"BOS policy {result.bos!r}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from zsfw.serve.generate import check_settings, generate
    from zsfw.models import load_model

    check_settings(args.max_new_tokens, args.sample, args.temperature, args.top_p)  # before the load
    model, tokenizer = load_model(args.model)
    if not args.no_compile:
        print("compiling the model for decoding (about 25 s on a 2-core CPU the first time; "
              "--no-compile skips it)", file=sys.stderr, flush=True)
    for prompt, text in zip(args.prompt, generate(
            model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
            compile=not args.no_compile, seed=args.seed)):
        print(f"{prompt}{text}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from zsfw.serve.export import export
    from zsfw.models import load_model

    model, tokenizer = load_model(args.model)
    print(f"exporting and compiling {args.out} with AOTInductor (about a minute on a 2-core CPU)",
          file=sys.stderr, flush=True)
    out = export(model, args.out, tokenizer, max_sequence=args.max_sequence)
    print(f"exported {out} (manifest {out.with_suffix('.json')}, tokenizer {out.with_suffix('.tokenizer')})")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from zsfw.checkpoint.contents import plot, saved_modules, table

    modules = saved_modules(args.directory)
    print(table(modules))
    png = args.plot or Path(f"{args.directory.resolve().name}-ranks.png")
    print(f"plot of kept bytes per block written to {plot(modules, png, str(args.directory))}")
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from zsfw.plugins import registry

    for kind, components in registry().items():
        print(f"{kind}s:")
        for name, c in sorted(components.items()):
            print(f"  {name:<20} {c.plugin:<20} {c.distribution} {c.version}".rstrip())
            if c.cls.__doc__:
                print(f"      {c.cls.__doc__.strip().splitlines()[0]}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, schedulers, ``docker stop``), raised in the main thread like Ctrl-C's
    ``KeyboardInterrupt`` so the same cleanup runs (temporary and work folders removed)."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the cleanup short
    raise Terminated


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` during the block; the previous handler is back after it
    (``main`` also runs inside other programs and tests). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def build_parser() -> argparse.ArgumentParser:
    """The ``zsfw`` argument parser, built without running anything (the docs' commands are
    checked against it)."""
    from zsfw import __version__

    parser = argparse.ArgumentParser(prog="zsfw", description=__doc__)
    parser.add_argument("--version", action="version", version=f"zsfw {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("compress", help="compress a causal LM with a recipe", formatter_class=formatter)
    p.add_argument("--model", default="default",
                   help="checkpoint folder, .gguf file, hub id, or 'default' (SmolLM2-135M)")
    p.add_argument("--recipe", default=None, help="recipe YAML (default: recipes/zero_sum.yaml's "
                                                  "settings, built in)")
    p.add_argument("--dataset", default=None,
                   help="calibration text: file or folder (txt/jsonl/parquet) or hub dataset id "
                        "(default: the embedded news text)")
    p.add_argument("--output", type=Path, default=None,
                   help="folder to save the compressed model in (a save_pretrained folder; "
                        "without it the model is measured, then discarded)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output folder (only an empty one or a zsfw output)")
    p.add_argument("--statistics-cache", type=Path, default=None,
                   help="folder caching stages' results, calibration statistics and factorizations across "
                        "runs (same model, data and settings: another ratio or allocator skips them)")
    p.add_argument("--held-out", type=int, default=4, metavar="N",
                   help="windows of the calibration text, never used for calibration, on which "
                        "perplexity is measured before and after (0: no before/after comparison)")
    p.add_argument("--table", action="store_true",
                   help="also print the per-layer table (it is always saved as report.txt)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="keep and save a compressed model whose output is NaN or Inf (with a warning) "
                        "instead of refusing it")
    p.set_defaults(run=_compress)
    p = sub.add_parser("eval", help="perplexity (or an lm-eval task) of a model, compressed or not",
                       formatter_class=formatter)
    p.add_argument("model", nargs="?", default="default",
                   help="model folder (a zsfw output or any checkpoint), .gguf, hub id or 'default'")
    p.add_argument("--dataset", default=None,
                   help="text file or folder (default: the embedded Wikipedia text)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window")
    p.add_argument("--windows", type=int, default=None, help="number of windows (default: all)")
    p.add_argument("--offset", type=int, default=0,
                   help="first token evaluated: keep it past the calibration text")
    p.add_argument("--bos", choices=("none", "each"), default="none",
                   help="'none': windows as they are (the papers'); 'each': BOS before every window")
    p.add_argument("--lm-eval", type=Path, default=None, metavar="TASK_YAML",
                   help="run a local lm-eval task file through lm-eval's HFLM instead")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    p.set_defaults(run=_eval)
    p = sub.add_parser("run", help="generate text with a static KV cache and a compiled forward",
                       formatter_class=formatter)
    p.add_argument("model", nargs="?", default="default", help="model folder, .gguf, hub id or 'default'")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (--sample)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (--sample)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--no-compile", action="store_true", help="eager decoding (no compile wait)")
    p.set_defaults(run=_run)
    p = sub.add_parser("export", help="export a model as an AOTInductor .pt2 package",
                       formatter_class=formatter)
    p.add_argument("model", help="model folder (a zsfw output or any checkpoint), .gguf or 'default'")
    p.add_argument("--out", type=Path, required=True, help="the package to write (ends in .pt2)")
    p.add_argument("--max-sequence", type=int, default=2048, help="longest input the package takes")
    p.set_defaults(run=_export)
    p = sub.add_parser("inspect", help="per-layer ranks, formats and bytes of a saved model",
                       formatter_class=formatter)
    p.add_argument("directory", type=Path, help="a folder saved by zsfw")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG to write (default: <folder name>-ranks.png in the current folder)")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("plugins", help="list registered stages, scorers, allocators, correctors, formats")
    p.set_defaults(run=_plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    from zsfw.errors import ZsfwError

    args = build_parser().parse_args(argv)
    from zsfw.memory import return_large_frees_to_the_os

    return_large_frees_to_the_os()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torchao", "torch.utils._pytree"):  # CUDA-only extensions, deprecation notes
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with _sigterm_as_interrupt():
            return args.run(args)
    except ZsfwError as exc:  # predictable: one line; anything else is a bug and keeps its traceback
        print(f"zsfw: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("zsfw: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("zsfw: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
