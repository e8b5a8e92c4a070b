"""One-token linear layers that use every CPU thread: the hot path of cached decoding on CPU. Hand-written (a
project-specific speed-up; the layers stay `nn.Linear`s with the same parameters, values and state-dict keys).

A decode step multiplies one row by every weight matrix (a matrix-vector product). Two things make it slow on CPU,
and benchmarks/gemv.py measures both:

* PyTorch's CPU `linear` runs a one-row product on one thread: on the 2-core development machine it streams the
  weights at the same ~14 GB/s with 1 or 2 threads set. `bmm` over the weight viewed as `p` blocks of outputs (no
  copy) hands the blocks to different threads, and each output is the same dot product as before.
* A "wide" weight (out_features >= WIDE_RATIO * in_features: the 256 x 151,936 head, the 896 -> 4864 MLP gate and
  up projections) is read faster for one row from a column-major layout, where one input's weights for all outputs
  are contiguous (an axpy over the outputs), than row-major (one short dot product per output).

Both are an opt-in inference step, `prepare_for_cpu_decoding(model)`, applied by what only generates or evaluates
(loading.py: generate, chat, serve, eval; the benchmarks), never by model construction: it freezes the model,
replaces each `nn.Linear` with a `RowSplitLinear` sharing its parameters (same values and state-dict keys) and stores
the wide weights column-major. Training, its optimizer state and FSDP see the stock modules.

Inputs with more than one row, and non-CPU tensors, take plain `F.linear` on the parameter itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

WIDE_RATIO = 4  # out_features >= 4 * in_features: column-major for one row (measured on Zen 4, benchmarks/gemv.py)


def row_blocks(out_features: int, threads: int) -> int:
    """How many blocks of outputs to split a weight of `out_features` rows into: the most, up to `threads`, that
    divide it evenly (1: do not split)."""
    p = max(1, threads)
    while out_features % p:
        p -= 1
    return p


def output_blocks(weight: torch.Tensor, p: int) -> Optional[torch.Tensor]:
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

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "RowSplitLinear":
        """A RowSplitLinear holding `linear`'s own parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

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


def is_column_major(weight: torch.Tensor) -> bool:
    return weight.t().is_contiguous() and not weight.is_contiguous()


@torch.no_grad()
def column_major(weight: nn.Parameter) -> None:
    """Store a 2-D parameter column-major in place: same Parameter object, shape and values; new strides."""
    if not weight.t().is_contiguous():
        weight.data = weight.data.t().contiguous().t()


@torch.no_grad()
def row_major(weights) -> None:
    """Store 2-D parameters row-major (contiguous) again, in place: same Parameter objects and values."""
    for w in weights:
        if not w.is_contiguous():
            w.data = w.data.contiguous()


def prepare_for_cpu_decoding(model: nn.Module) -> nn.Module:
    """The opt-in inference step: `model` frozen whole (no gradients, eval mode), every plain nn.Linear replaced by a
    RowSplitLinear sharing its parameters, and the wide weights stored column-major (values untouched). For a model
    that only generates or evaluates from here on; returns it."""
    model.requires_grad_(False).eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, RowSplitLinear.from_linear(child))
    for m in model.modules():
        if isinstance(m, RowSplitLinear) and is_wide(m):
            column_major(m.weight)
    return model
