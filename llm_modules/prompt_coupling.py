"""The prompt coupling (`coupling: prompt`): the large model reads the prompt once; the small model decodes alone.

The small model keeps its own embeddings, tokenizer and head. Every `bridge.every`-th block of it is followed by the
paper's Enhanced Cross-Attention layer (attention + adapter + sigmoid gate) attending to a memory: the large model's
states over the prompt, through the bridge's pre-projection. Each such layer is scaled by a Flamingo-style tanh gate
that starts at 0, so at step 0 the model is exactly the small model alone. Decoding prefills the memory's keys and
values once per layer; after that only the small model runs, with its own KV cache.

With several large-model layers (`large.layers`, n of them) the memory is their states side by side, (B, M, n * D_L):
each layer is normalized on its own (a middle layer's residual stream is far larger than the last, normed state),
then the pre-projection maps the n * D_L widths to D_L.

Shapes: B batch, T small-side positions, M memory (prompt) positions, D_L / D_S widths, H heads, n layers read.
Hand-written: the project's own component.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .bridge import EnhancedCrossAttention
from .config import BridgeConfig


def block_list(base: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face base model (`layers` for Llama/Qwen/Gemma, `h` for GPT-2/Neo)."""
    for name in ("layers", "h", "blocks"):
        blocks = getattr(base, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"cannot find the transformer blocks of {type(base).__name__} (no layers/h/blocks list)")


class GatedMemoryAttention(nn.Module):
    """x + tanh(alpha) * (enhanced(x) - x): the paper's layer, opened gradually from exactly closed."""

    def __init__(self, d_source: int, d_model: int, cfg: BridgeConfig):
        super().__init__()
        self.layer = EnhancedCrossAttention(d_source, d_model, cfg)
        self.alpha = nn.Parameter(torch.zeros(()))  # tanh(0) == 0: closed at initialization

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.alpha) * (self.layer(x, k, v, mask) - x)


class LayerWiseNorm(nn.Module):
    """(B, M, n * D_L) -> the same, each layer's D_L states normalized to zero mean and unit variance (no weights:
    the pre-projection after it scales them)."""

    def __init__(self, n: int, d: int):
        super().__init__()
        self.n, self.d = n, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, M, _ = x.shape
        return F.layer_norm(x.view(B, M, self.n, self.d), (self.d,)).view(B, M, self.n * self.d)  # (B, M, n * D_L)


class PromptBridge(nn.Module):
    """pre_proj over the memory (the states of `sources` large-model layers), and one gated cross-attention layer
    after every `every`-th small block."""

    def __init__(self, d_large: int, d_small: int, num_blocks: int, cfg: BridgeConfig, sources: int = 1):
        super().__init__()
        # One layer is read as it is (the design case, its checkpoints unchanged); several are each normalized first.
        self.source_norm = LayerWiseNorm(sources, d_large) if sources > 1 else nn.Identity()
        self.pre_proj = nn.Linear(sources * d_large, d_large)
        self.block_indices = list(range(cfg.every - 1, num_blocks, cfg.every))
        self.layers = nn.ModuleList(GatedMemoryAttention(d_large, d_small, cfg) for _ in self.block_indices)
        self._bound: Optional[tuple[list, torch.Tensor]] = None  # set only inside `bound()`, for one forward

    def keys_values(self, memory_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, M, n * D_L) -> per layer (keys, values), each (B, H, M, hd): computed once per prompt."""
        pre = self.pre_proj(self.source_norm(memory_states))  # (B, M, D_L)
        return [g.layer.cross_attn.keys_values(pre) for g in self.layers]

    @contextlib.contextmanager
    def bound(self, kv: list, memory_mask: torch.Tensor) -> Iterator[None]:
        """Make the memory visible to the wrapped blocks for the duration of one small-model forward."""
        self._bound = (kv, memory_mask.bool()[:, None, None, :])  # (B, 1, 1, M): every query sees the prompt
        try:
            yield
        finally:
            self._bound = None

    def attend(self, slot: int, x: torch.Tensor) -> torch.Tensor:
        assert self._bound is not None, "memory not bound: call the model, not its small part"
        kv, mask = self._bound
        k, v = kv[slot]
        return self.layers[slot](x, k, v, mask)


class WithMemory(nn.Module):
    """A small-model block followed by its gated memory attention (works for tensor- or tuple-returning blocks)."""

    def __init__(self, block: nn.Module, bridge: PromptBridge, slot: int):
        super().__init__()
        self.block = block
        self.slot = slot
        object.__setattr__(self, "_bridge", bridge)  # a reference, not a submodule: the bridge owns the weights

    def __getattr__(self, name: str):
        # Models read per-layer attributes such as `attention_type` off their blocks: answer for the wrapped block.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

    def forward(self, hidden_states, *args, **kwargs):
        out = self.block(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self._bridge.attend(self.slot, out[0]),) + tuple(out[1:])
        return self._bridge.attend(self.slot, out)


def attach(base: nn.Module, bridge: PromptBridge) -> None:
    """Wrap the small model's blocks at the bridge's indices (done once, at construction)."""
    blocks = block_list(base)
    for slot, i in enumerate(bridge.block_indices):
        blocks[i] = WithMemory(blocks[i], bridge, slot)
