"""PivGa's rounding error next to plain bf16 factors and to the truncation error, per layer.

For every target of SmolLM2-135M-Instruct, from the reference protocol's cached factorization
(``sweep.py`` or ``reference.py`` with ``--cache`` fills it): the layer's top k
components at k = ratio × its bf16 break-even rank mn/(m+n), stored as plain bf16 factors and as
pivga (bf16); the relative error of each in the whitened norm ‖(Ŵ − W_k) S‖ / ‖W_k S‖, next to
the truncation error ‖(W − W_k) S‖ / ‖W S‖ at the same k; and the time ``PivGaLinear.from_factors``
takes. Writes its section of the log (``log/pivga.md``).

    python benchmarks/pivga_error.py --cache /tmp/zsfw-reference-cache
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import protocol
from results_md import write_section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/zsfw-reference-cache"))
    parser.add_argument("--ratio", type=float, default=0.8)
    args = parser.parse_args()
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from zsfw_pivga import PivGaLinear

    folders = sorted(args.cache.glob("factors-*"))
    if not folders:
        sys.exit(f"no factorization under {args.cache}: run benchmarks/sweep.py --cache {args.cache} first")
    folder = folders[0]
    with safe_open(folder / "index.safetensors", framework="pt") as f:
        whitener_of = json.loads(f.metadata()["whitener_of"])
    rows = []
    for path in sorted(folder.glob("factors.*.safetensors")):
        name = path.name[len("factors."):-len(".safetensors")]
        factors = load_file(path)
        S = load_file(folder / f"S.{whitener_of[name]}.safetensors")["S"].double()
        B, A = factors["B"].double(), factors["A"].double()
        m, n = B.shape[0], A.shape[1]
        k = int(args.ratio * m * n / (m + n))
        W, W_k = B @ A, B[:, :k] @ A[:k]
        start = time.perf_counter()
        module = PivGaLinear.from_factors(B[:, :k], A[:k], None, torch.bfloat16)
        seconds = time.perf_counter() - start
        pivga = module(torch.eye(n, dtype=torch.float64)).T
        plain = B[:, :k].bfloat16().double() @ A[:k].bfloat16().double()
        whitened = lambda X: float((X @ S).norm())
        rows.append({"name": name, "k": k, "pivga": whitened(pivga - W_k) / whitened(W_k),
                     "plain": whitened(plain - W_k) / whitened(W_k),
                     "truncation": whitened(W - W_k) / whitened(W), "seconds": seconds})
    kinds = sorted({r["name"].rsplit(".", 1)[1] for r in rows})
    lines = [f"## PivGa rounding error on SmolLM2-135M's layers ({datetime.date.today().isoformat()})", "",
             f"Command: `python benchmarks/{Path(__file__).name} --ratio {args.ratio}`. Machine: "
             f"{protocol.machine_line()}. Factorization: the reference protocol's (`{folder.name}`). "
             f"Each layer at k = {args.ratio} × mn/(m+n) (its rank as bf16 factors at that ratio); "
             "relative errors in the whitened norm, median (max) over the layers of a kind.", "",
             "| layers | n | pivga (bf16) rounding | plain bf16 rounding | pivga / plain | truncation at k | "
             "gauge-fix s (total) |", "|---|---|---|---|---|---|---|"]

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.2e} ({max(values):.2e})"

    for kind in kinds + ["all"]:
        group = [r for r in rows if kind == "all" or r["name"].endswith(kind)]
        ratios = [r["pivga"] / r["plain"] for r in group]
        lines.append(f"| {kind} | {len(group)} | {cell([r['pivga'] for r in group])} | "
                     f"{cell([r['plain'] for r in group])} | {statistics.median(ratios):.2f} ({max(ratios):.2f}) | "
                     f"{cell([r['truncation'] for r in group])} | {sum(r['seconds'] for r in group):.1f} |")
    write_section("pivga-error", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
