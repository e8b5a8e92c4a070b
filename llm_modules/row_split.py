"""One-token linear layers that use every CPU thread: the hot path of cached decoding on CPU. Hand-written (a
project-specific speed-up; the layers stay `nn.Linear`s with the same parameters, values and state-dict keys).

A decode step multiplies one row by every weight matrix (a matrix-vector product). Two things make it slow on CPU,
and benchmarks/gemv.py measures both:

* PyTorch's CPU `linear` runs a one-row product on one thread: on the 2-core development machine it streams the
  weights at the same ~14 GB/s with 1 or 2 threads set. `bmm` over the weight viewed as `p` blocks of outputs (no
  copy) hands the blocks to different threads, and each output is the same dot product as before.
* For a "wide" weight (many more outputs than inputs: the 256 x 151,936 head, the 896 -> 4864 MLP gate and up
  projections) the product reads faster from a column-major weight, where one input's row of weights is contiguous
  (an axpy over the outputs), than from the usual row-major one (one short dot product per output). So `split_rows`
  stores weights with out_features >= WIDE_RATIO * in_features column-major: the parameter keeps its shape
  (out, in), its values and its name; only its strides change (`weight.t()` is contiguous). Products over many
  rows (prefill, training, full recompute) run as fast either way (measured: benchmarks/gemv.py, `--rows`).

Inputs with more than one row and non-CPU tensors take plain `F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WIDE_RATIO = 4  # out_features >= 4 * in_features: column-major (measured on Zen 4, benchmarks/gemv.py)


def row_blocks(out_features: int, threads: int) -> int:
    """How many blocks of outputs to split a weight of `out_features` rows into: the most, up to `threads`, that
    divide it evenly (1: do not split)."""
    p = max(1, threads)
    while out_features % p:
        p -= 1
    return p


def output_blocks(weight: torch.Tensor, p: int):
    """The weight (out, in) as p blocks of outputs, (p, in, out / p), without a copy; None for other layouts.
    Block i holds outputs [i * out / p, (i + 1) * out / p)."""
    out_features, in_features = weight.shape
    if weight.is_contiguous():  # row-major: block i is rows of W, read as (in, out / p) through a transpose
        return weight.view(p, out_features // p, in_features).transpose(1, 2)
    if weight.t().is_contiguous():  # column-major: block i is a column slab of W^T (in, out), leading dim out
        return weight.t().view(in_features, p, out_features // p).permute(1, 0, 2)
    return None


class RowSplitLinear(nn.Linear):
    """nn.Linear whose single-row CPU forward runs as a `bmm` over blocks of outputs, one per thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() != 1 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        p = row_blocks(self.out_features, torch.get_num_threads())
        blocks = output_blocks(self.weight, p) if p > 1 else None
        if blocks is None:
            return F.linear(x, self.weight, self.bias)
        # (p, 1, in) @ (p, in, out / p) -> (p, 1, out / p) -> the outputs in order
        y = torch.bmm(x.reshape(1, 1, self.in_features).expand(p, 1, self.in_features), blocks)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def is_wide(linear: nn.Linear) -> bool:
    return linear.out_features >= WIDE_RATIO * linear.in_features


@torch.no_grad()
def column_major(weight: nn.Parameter) -> None:
    """Store a 2-D parameter column-major in place: same Parameter object, shape and values; new strides."""
    if not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


@torch.no_grad()
def row_major(params) -> None:
    """Make parameters contiguous again, in place (same Parameter objects and values): FSDP2 shards contiguous
    parameters only."""
    for w in params:
        if not w.is_contiguous():
            w.data = w.data.contiguous()


def split_rows(module: nn.Module) -> nn.Module:
    """Make every plain nn.Linear inside `module` a RowSplitLinear, in place, and store the wide ones' weights
    column-major (values untouched). Call it before an optimizer is built over the parameters."""
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = RowSplitLinear
        if type(m) is RowSplitLinear and is_wide(m):
            column_major(m.weight)
    return module
