"""Cross-entropy through the output head chunk by chunk, so that the (N, V) logits are never held whole.

With the large model's vocabulary (V = 151,936) the head's logits dominate a training step's memory: at 4,096
positions they are 2.5 GB in fp32, and the loss's backward pass holds about as much again for their gradient.
`chunked_cross_entropy` computes the same summed loss from the final hidden states (N, D) and the head, `chunk_size`
rows at a time, each chunk under torch.utils.checkpoint: the forward pass keeps only the chunk's loss, and the
backward pass recomputes one chunk's logits at a time. The cost is the head's matmul once more (recomputed in the
backward pass); the gain is that the logits' memory is a chunk's, not the sequence's.

Hand-written (Liger-Kernel's fused linear cross-entropy is not installed; this is its idea without a fused kernel):
the head is called as a module, so a tied, biased or sharded head works unchanged. Opt-in: `train.chunked_loss`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                ignore_index: int) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                          *, chunk_size: int = 512, ignore_index: int = -100,
                          reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of head(hidden) against targets, the logits made `chunk_size` rows at a time.

    hidden (N, D) (or (..., D), flattened), targets (N,) with ignore_index where no label is taken, head maps
    (n, D) -> (n, V) (an nn.Linear, say). reduction "sum" (default) or "mean" (over targets != ignore_index).
    Equals F.cross_entropy(head(hidden).float(), targets, reduction=...), with its gradients."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r} must be 'sum' or 'mean'")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in _params(head))):
            total = total + checkpoint(_chunk_loss, head, h, t, ignore_index, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t, ignore_index)
    if reduction == "mean":
        total = total / (targets != ignore_index).sum().clamp(min=1)
    return total


def _params(head) -> list[torch.nn.Parameter]:
    return list(head.parameters()) if isinstance(head, torch.nn.Module) else []
