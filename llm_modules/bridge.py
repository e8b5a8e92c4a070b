"""The bridge: projections of the large model's states and the Enhanced Cross-Attention stack (the paper's method).

Shapes: B batch, T target (query) positions, S source (key) positions, H heads, D_L large width, D_S small width,
hd = D_S / H. Hand-written because it is the project's own component.

Causality (what the reference gets wrong): query t attends only to source positions <= t that are not padding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import BridgeConfig
from .kv_cache import CrossAttentionCache


class CrossAttention(nn.Module):
    """Multi-head attention: queries from small-side states x, keys/values from large-side states."""

    def __init__(self, d_source: int, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"small hidden size {d_model} is not divisible by bridge.num_heads={num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.norm_source = nn.LayerNorm(d_source)
        self.norm_x = nn.LayerNorm(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_source, d_model)
        self.v_proj = nn.Linear(d_source, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, D_L) -> keys, values (B, H, S, hd); they depend on the source only, so they can be cached."""
        s = self.norm_source(source)
        return self._heads(self.k_proj(s)), self._heads(self.v_proj(s))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self._heads(self.q_proj(self.norm_x(x)))  # (B, H, T, hd)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, T, hd)
        return self.out_proj(o.transpose(1, 2).reshape(B, T, D))


class Adapter(nn.Module):
    """Bottleneck FFN with LayerNorm and a residual (the paper's CrossAttentionAdapter)."""

    def __init__(self, d_model: int, adapter_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, adapter_dim)
        self.fc2 = nn.Linear(adapter_dim, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(a)))) + a


class EnhancedCrossAttention(nn.Module):
    """Cross-attention -> adapter -> gate: returns g * a + (1 - g) * x (or a alone when the gate is "none")."""

    def __init__(self, d_source: int, d_model: int, cfg: BridgeConfig):
        super().__init__()
        self.cross_attn = CrossAttention(d_source, d_model, cfg.num_heads, cfg.dropout)
        self.adapter = Adapter(d_model, cfg.adapter_dim)
        self.gate_mode, self.gate_value = cfg.gate, cfg.gate_value
        # A per-channel gate from [x; a], as in the reference; absent unless learned (so it is never "trainable").
        self.gate = nn.Linear(2 * d_model, d_model) if cfg.gate == "learned" else None

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.adapter(self.cross_attn(x, k, v, mask))
        if self.gate_mode == "none":
            return a
        g = torch.sigmoid(self.gate(torch.cat([x, a], dim=-1))) if self.gate is not None else self.gate_value
        return g * a + (1 - g) * x


def cross_attention_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """(B, S) 0/1 validity of source positions -> (B, 1, T, S) bool, True where query may attend.

    Queries are the last T of the S positions. A query sees sources at or before its own position that are not
    padding; a padding query sees itself too, so no row is empty (its output is never used).
    """
    B, S = key_valid.shape
    k_pos = torch.arange(S, device=key_valid.device)
    q_pos = k_pos[S - num_queries :]
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    own = k_pos[None, :] == q_pos[:, None]
    return (causal[None] & key_valid.bool()[:, None, :]) | own[None]  # (B, T, S)


class Bridge(nn.Module):
    """Large-side states (B, T, D_L) -> small-side input embeddings (B, T, D_S)."""

    def __init__(self, d_large: int, d_small: int, cfg: BridgeConfig):
        super().__init__()
        d_mid = (d_large + d_small) // 2
        self.residual = cfg.residual
        self.pre_proj = nn.Linear(d_large, d_large)
        self.proj = nn.Linear(d_large, d_small)
        self.ffn = nn.Sequential(
            nn.Linear(d_large, d_mid), nn.LayerNorm(d_mid), nn.GELU(), nn.Linear(d_mid, d_small), nn.LayerNorm(d_small)
        )
        self.layers = nn.ModuleList(EnhancedCrossAttention(d_large, d_small, cfg) for _ in range(cfg.num_layers))

    def forward(
        self, source: torch.Tensor, key_valid: torch.Tensor, cache: Optional[CrossAttentionCache] = None
    ) -> torch.Tensor:
        """source: (B, T, D_L) states of the T new positions; key_valid: (B, S) mask over all positions so far."""
        pre = self.pre_proj(source)  # (B, T, D_L)
        x = self.ffn(pre)  # (B, T, D_S)
        mask = cross_attention_mask(key_valid, source.shape[1])[:, None]  # (B, 1, T, S)
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_attn.keys_values(pre)  # (B, H, T, hd)
            if cache is not None:
                k, v = cache.update(i, k, v)  # (B, H, S, hd)
            y = layer(x, k, v, mask)
            x = x + y if self.residual == "paper" else y
        return x + self.proj(pre)
