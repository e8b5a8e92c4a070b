"""One-token linear layers that use every CPU thread: the hot path of cached decoding on CPU. Hand-written (a
project-specific speed-up; the layers stay `nn.Linear`s with the same parameters and state-dict keys).

A decode step multiplies one row by every weight matrix (a matrix-vector product). PyTorch's CPU `linear` runs such
a product on one thread: on the 2-core development machine it streams the weights at the same ~14 GB/s with 1 or 2
threads set. `bmm` over the weight viewed as `p` blocks of rows (no copy) hands the blocks to different threads, and
each output is the same dot product as before. benchmarks/generation.py measures the effect (docs/benchmarks.md).
Inputs with more than one row (prefill, training, full recompute) and non-CPU tensors take plain `F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def row_blocks(out_features: int, threads: int) -> int:
    """How many row blocks to split a weight of `out_features` rows into: the most, up to `threads`, that divide it
    evenly (1: do not split)."""
    p = max(1, threads)
    while out_features % p:
        p -= 1
    return p


class RowSplitLinear(nn.Linear):
    """nn.Linear whose single-row CPU forward runs as a `bmm` over row blocks of the weight, one per thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1 or x.device.type != "cpu" or not self.weight.is_contiguous():
            return F.linear(x, self.weight, self.bias)
        p = row_blocks(self.out_features, torch.get_num_threads())
        if p == 1:
            return F.linear(x, self.weight, self.bias)
        # (p, 1, in) @ (p, in, out / p) -> (p, 1, out / p): block i holds outputs [i * out / p, (i + 1) * out / p)
        blocks = self.weight.view(p, self.out_features // p, self.in_features).transpose(1, 2)
        y = torch.bmm(x.reshape(1, 1, self.in_features).expand(p, 1, self.in_features), blocks)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def split_rows(module: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside `module` a RowSplitLinear, in place (parameters untouched)."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = RowSplitLinear
    return module
