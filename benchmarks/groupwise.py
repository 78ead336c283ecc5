"""Group-wise quantized bases (int4/int3/int2): RTN error and forward time of one layer.

Error: ‖W − Q‖/‖W‖ of RTN at group size 64 on Gaussian weights of SmolLM2-135M's layer shapes.
Speed: one forward of ``GroupwiseLinear`` (int4, rank 0 and rank 32; every bit width holds the same
unpacked int8 codes in memory, so int3/int2 compute alike) against ``nn.Linear`` in fp32 and bf16,
eager and ``torch.compile``d, at 1 and 512 tokens. Variants are interleaved round by round; the
table gives the median and the minimum over rounds of the mean time of ``--calls`` calls (on a
shared machine the minimum is the least disturbed).

    python benchmarks/groupwise.py [--rounds 5] [--calls 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

SHAPES = ((576, 576), (1536, 576), (576, 1536))  # out × in: attention, MLP up/gate, MLP down
TOKENS = (1, 512)


def errors() -> None:
    from zsfw_groupwise import quantize_rtn

    torch.manual_seed(0)
    print("RTN relative error ‖W−Q‖/‖W‖, group 64, W ~ N(0, 1)")
    print(f"{'shape':>10} " + " ".join(f"{f'int{b}':>7}" for b in (4, 3, 2)))
    for out, n in SHAPES:
        W = torch.randn(out, n)
        row = [((quantize_rtn(W, b, 64).dequantize() - W).norm() / W.norm()).item() for b in (4, 3, 2)]
        print(f"{out:>5}x{n:<4} " + " ".join(f"{e:7.4f}" for e in row))


def _modules(out: int, n: int) -> dict[str, tuple[nn.Module, torch.dtype]]:
    from zsfw import plugins

    torch.manual_seed(0)
    linear = nn.Linear(n, out, bias=False).requires_grad_(False)
    fmt = plugins.create("storage", "int4")
    base = fmt.quantize(linear.weight)
    r0 = fmt.hybrid_module(base, torch.zeros(out, 0), torch.zeros(0, n), None)
    r32 = fmt.hybrid_module(base, torch.randn(out, 32), torch.randn(32, n), None)
    bf16 = nn.Linear(n, out, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    return {"Linear fp32": (linear, torch.float32), "Linear bf16": (bf16, torch.bfloat16),
            "int4 r0 fp32": (r0, torch.float32), "int4 r0 bf16": (r0, torch.bfloat16),
            "int4 r32 fp32": (r32, torch.float32)}


def speed(rounds: int, calls: int) -> None:
    print(f"\nforward time in µs, median/min of {rounds} rounds × {calls} calls, {torch.get_num_threads()} threads")
    for out, n in SHAPES:
        torch._dynamo.reset()  # one forward code object: each shape's graphs within the recompile limit
        variants = []
        for label, (module, dtype) in _modules(out, n).items():
            for mode in ("eager", "compiled"):
                fn = module if mode == "eager" else torch.compile(module, fullgraph=True)
                for tokens in TOKENS:
                    x = torch.randn(tokens, n).to(dtype)
                    with torch.no_grad():
                        fn(x)  # compile and warm up
                    variants.append((label, mode, tokens, fn, x, []))
        for _ in range(rounds):
            for *_, fn, x, times in variants:
                with torch.no_grad():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn(x)
                    times.append((time.perf_counter() - start) / calls * 1e6)
        columns = [(m, t) for m in ("eager", "compiled") for t in TOKENS]
        print(f"{f'{out}x{n}':<22}" + "".join(f"{f'{m} {t} tok':>20}" for m, t in columns))
        rows: dict[str, dict[tuple[str, int], str]] = {}
        for label, mode, tokens, *_, times in variants:
            rows.setdefault(label, {})[(mode, tokens)] = f"{statistics.median(times):.0f}/{min(times):.0f}"
        for label, cells in rows.items():
            print(f"  {label:<20}" + "".join(f"{cells[c]:>20}" for c in columns))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    errors()
    speed(args.rounds, args.calls)
