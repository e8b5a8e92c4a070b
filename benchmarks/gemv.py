"""One-row products (the cached decode step's kernels) on CPU: plain `F.linear` vs row_split's `RowSplitLinear`, on 1
and on N threads, next to how fast a plain reduction reads memory; then, per weight shape, the two layouts
`RowSplitLinear` can read (row-major, and column-major as decoding reads wide weights), for one row and for
--rows rows. Random weights, no model download.

    python benchmarks/gemv.py [--threads 1,2] [--repeats 7] [--rows 256]

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


def set_layout(layers, column_major: bool) -> None:
    from llm_modules.row_split import column_major as to_column_major, row_major

    for m in layers:
        to_column_major(m.weight) if column_major else row_major([m.weight])


def stack_table(stacks: dict, xs: dict, threads: list[int], repeats: int) -> str:
    """F.linear vs RowSplitLinear with the layouts prepare_for_cpu_decoding chooses, whole stacks."""
    from llm_modules.row_split import prepare_for_cpu_decoding

    big = torch.randn(1_400_000_000 // 4)
    rows = []
    for n in threads:
        set_threads(n)
        for name, layers in stacks.items():
            gb = sum(m.weight.numel() for m in layers) * 4 / 1e9
            set_layout(layers, False)
            plain = best_of(lambda: [F.linear(xs[m.in_features], m.weight) for m in layers], repeats)
            prepared = list(prepare_for_cpu_decoding(torch.nn.ModuleList(layers)))  # the same weights
            split = best_of(lambda: [m(xs[m.in_features]) for m in prepared], repeats)
            rows.append([n, name, f"{gb:.2f}", f"{plain * 1e3:.1f}", f"{gb / plain:.1f}", f"{split * 1e3:.1f}",
                         f"{gb / split:.1f}", f"{plain / split:.2f}x"])
        t = best_of(big.sum, repeats)
        rows.append([n, "`sum` of 1.40 GB (memory read)", "1.40", f"{t * 1e3:.1f}", f"{1.4 / t:.1f}", "-", "-", "-"])
    return table(rows, ["threads", "weights", "GB", "F.linear ms", "F.linear GB/s", "RowSplitLinear ms",
                        "RowSplitLinear GB/s", "speedup"])


def layout_table(stacks: dict, threads: list[int], repeats: int, n_rows: int) -> str:
    """Per shape (all 24 matrices of it, or the head): RowSplitLinear over a row-major vs a column-major weight."""
    from llm_modules.row_split import is_wide, prepare_for_cpu_decoding

    groups = {f"{o} x {i}": stacks["0.5B layer stack"][k::len(LAYER)] for k, (o, i) in enumerate(LAYER)
              if k in (0, 1, 4, 6)}  # q (o alike), k (v alike), gate (up alike), down
    groups[f"head {HEAD[0]} x {HEAD[1]}"] = stacks["head 256 x 151936"]
    rows = []
    for n in threads:
        set_threads(n)
        for name, layers in groups.items():
            layers = list(prepare_for_cpu_decoding(torch.nn.ModuleList(layers)))  # RowSplitLinears, same weights
            one, many = torch.randn(1, layers[0].in_features), torch.randn(n_rows, layers[0].in_features)
            t = {col: [float("inf"), float("inf")] for col in (False, True)}  # (1 row, many rows) per layout
            for col in (False, True, False, True):  # interleaved: each layout's best of two rounds
                set_layout(layers, col)
                t[col][0] = min(t[col][0], best_of(lambda: [m(one) for m in layers], repeats))
                t[col][1] = min(t[col][1], best_of(lambda: [m(many) for m in layers[:4]], max(2, repeats // 3)))
            set_layout(layers, is_wide(layers[0]))  # back to the layout decoding reads
            rows.append([n, name, len(layers), "column" if is_wide(layers[0]) else "row",
                         f"{t[False][0] * 1e3:.2f}", f"{t[True][0] * 1e3:.2f}", f"{t[False][0] / t[True][0]:.2f}x",
                         f"{t[False][1] * 1e3:.1f}", f"{t[True][1] * 1e3:.1f}"])
    return table(rows, ["threads", "weight (out x in)", "matrices", "decoded as", "1 row, row-major ms",
                        "1 row, column-major ms", "row / column", f"{n_rows} rows x 4 matrices, row-major ms",
                        "column-major ms"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=256, help="rows of the many-row product (prefill, recompute)")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    torch.manual_seed(0)
    stacks = {"0.5B layer stack": [torch.nn.Linear(i, o, bias=False) for o, i in LAYER * 24],
              "head 256 x 151936": [torch.nn.Linear(HEAD[1], HEAD[0], bias=False)]}
    for layers in stacks.values():
        for m in layers:
            m.requires_grad_(False)
    xs = {n: torch.randn(1, n) for n in (256, 896, 4864)}
    with torch.no_grad():
        print(stack_table(stacks, xs, threads, a.repeats))
        print()
        print(layout_table(stacks, threads, a.repeats, a.rows))


if __name__ == "__main__":
    main()
