"""One-row products (the cached decode step's kernels) on CPU: plain `F.linear` vs row_split's `RowSplitLinear`, on 1
and on N threads, next to how fast a plain reduction reads memory. Random weights, no model download.

    python benchmarks/gemv.py [--threads 1,2] [--repeats 7]

The weight stack has the shapes of Qwen2.5-0.5B's 24 decoder layers (q, k, v, o, gate, up, down: 168 matrices, 1.43
GB of float32, far more than any cache), multiplied in order as a decode step does; the head shape (256 x 151,936)
is timed alone. Prints the best of --repeats passes as ms and GB/s of weights read.
"""
from __future__ import annotations

import argparse

from common import set_threads, table, time_call

import torch
import torch.nn.functional as F

LAYER = [(896, 896), (128, 896), (128, 896), (896, 896), (4864, 896), (4864, 896), (896, 4864)]  # (out, in)
HEAD = (151936, 256)


def best_of(fn, repeats: int) -> float:
    return min(time_call(fn, repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    from llm_modules.row_split import split_rows

    torch.manual_seed(0)
    stacks = {"0.5B layer stack": [torch.nn.Linear(i, o, bias=False) for o, i in LAYER * 24],
              "head 256 x 151936": [torch.nn.Linear(HEAD[1], HEAD[0], bias=False)]}
    xs = {n: torch.randn(1, n) for n in (256, 896, 4864)}
    big = torch.randn(1_400_000_000 // 4)
    rows = []
    for n in (int(t) for t in a.threads.split(",")):
        set_threads(n)
        for name, layers in stacks.items():
            gb = sum(m.weight.numel() for m in layers) * 4 / 1e9
            with torch.no_grad():
                plain = best_of(lambda: [F.linear(xs[m.in_features], m.weight) for m in layers], a.repeats)
                for m in layers:
                    split_rows(m)
                split = best_of(lambda: [m(xs[m.in_features]) for m in layers], a.repeats)
                for m in layers:
                    m.__class__ = torch.nn.Linear
            rows.append([n, name, f"{gb:.2f}", f"{plain * 1e3:.1f}", f"{gb / plain:.1f}", f"{split * 1e3:.1f}",
                         f"{gb / split:.1f}", f"{plain / split:.2f}x"])
        t = best_of(big.sum, a.repeats)
        rows.append([n, "`sum` of 1.40 GB (memory read)", "1.40", f"{t * 1e3:.1f}", f"{1.4 / t:.1f}", "-", "-", "-"])
    print(table(rows, ["threads", "weights", "GB", "F.linear ms", "F.linear GB/s", "RowSplitLinear ms",
                       "RowSplitLinear GB/s", "speedup"]))


if __name__ == "__main__":
    main()
