"""Caches used while decoding. Hand-written only for the bridge; the two language models use the
Hugging Face `DynamicCache` (their own key/value caches)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import DynamicCache


class CrossAttentionCache:
    """Keys/values of each cross-attention layer over the large model's states; grows by the new positions."""

    def __init__(self, num_layers: int):
        self.keys: list[Optional[torch.Tensor]] = [None] * num_layers  # each (B, H, S, hd)
        self.values: list[Optional[torch.Tensor]] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def get_seq_length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]

    def reset(self) -> None:
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)


class DecodingCache(DynamicCache):
    """A language model's DynamicCache, and whether its batch has left padding: found once, at the prefill
    (LLMModules.forward), so that decoding steps build the model's attention mask without reading the attention
    mask's values on the host (backbones.attention_mask_for; a synchronization per step on a GPU)."""

    padded: Optional[bool] = None  # None until the prefill


@dataclass
class LLMModulesCache:
    """Everything the combined model reuses between decoding steps. Positions are explicit arguments of the model's
    forward (derived from the attention mask); the cache only stores tensors."""

    large: DecodingCache
    bridge: CrossAttentionCache
    small: DecodingCache = field(default_factory=DecodingCache)
    memory_mask: Optional[torch.Tensor] = None  # coupling "prompt": (B, M) validity of the memory, set at prefill

    @classmethod
    def empty(cls, num_bridge_layers: int) -> "LLMModulesCache":
        return cls(large=DecodingCache(), bridge=CrossAttentionCache(num_bridge_layers), small=DecodingCache())

    def get_seq_length(self) -> int:
        return self.small.get_seq_length()

    def reset(self) -> None:
        self.large, self.small = DecodingCache(), DecodingCache()
        self.bridge.reset()
        self.memory_mask = None
