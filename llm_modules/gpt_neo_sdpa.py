"""GPT-Neo attention through torch's scaled_dot_product_attention: an opt-in speed-up for the paper's small model.

transformers' GPT-Neo has only an eager attention (and flash-attention-2, which needs the flash-attn package): it
materializes the (T x T) scores in fp32, masks them with `torch.where`, and keeps them for the backward pass, twelve
layers deep. `use_sdpa(model)` switches every GPT-Neo attention of `model` to one that computes the same thing with
`F.scaled_dot_product_attention` (fused kernels on CUDA; on a CPU the gain is small). Same weights, same masks (the
layer's own causal / local-window mask, plus the padding mask), same unscaled scores (GPT-Neo does not divide by
sqrt(head_dim), hence scale=1.0); the scores are computed in the input's dtype (bf16 under autocast) rather than fp32.
The model is switched to transformers' SDPA masks too (config._attn_implementation = "sdpa"): without padding they
are None, and global layers (and local ones shorter than their window) then run `is_causal=True` with no mask at all
(flash kernels on CUDA); with padding, the boolean (B, 1, T, S) mask is combined with the layer's window.
Hand-written because transformers has no SDPA path for GPT-Neo; it replaces the one method that differs (`_attn`).

`GPTNeoEagerAttention` is transformers' eager attention unchanged but for one line: its mask value is a Python number,
not a tensor made from it on every call (`torch.tensor(mask_value, device=...)`, a host-to-device copy per layer per
step on a GPU, twelve per decode step for GPT-Neo-125M); same values, bit for bit. `LLMModules` builds its GPT-Neo
models with it (`no_host_copies`).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention


class GPTNeoEagerAttention(GPTNeoSelfAttention):
    def _attn(self, query, key, value, attention_mask=None):
        # transformers' GPTNeoSelfAttention._attn (5.x) but for the mask value, a Python float (see the docstring).
        query = query.to(torch.float32)
        key = key.to(torch.float32)
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length:key_length, :key_length]
        attn_weights = torch.where(causal_mask, attn_weights, torch.finfo(attn_weights.dtype).min)
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.to(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value), attn_weights


class GPTNeoSDPAAttention(GPTNeoSelfAttention):
    def _attn(self, query, key, value, attention_mask=None):
        q_len, k_len = query.size(-2), key.size(-2)
        p = self.attn_dropout.p if self.training else 0.0
        v = value.to(query.dtype)
        # No padding (transformers' SDPA masking gives None then): a global layer, or a local one whose keys all lie
        # in its window, is plain causal attention, so no mask is built: is_causal for a whole sequence, nothing for
        # one new position (it sees every cached key).
        if attention_mask is None and (self.attention_type == "global" or k_len <= self.config.window_size) \
                and q_len in (1, k_len):
            out = F.scaled_dot_product_attention(query, key, v, dropout_p=p, is_causal=q_len > 1, scale=1.0)
            return out.to(value.dtype), None
        allowed = self.bias[:, :, k_len - q_len:k_len, :k_len]  # causal, and the window on local layers
        if attention_mask is None:
            mask = allowed  # boolean: every row keeps at least its own position
        else:  # built by the first layer of each kind (global / local), reused by the others of this forward
            kind = (self.attention_type, self.config.window_size, query.dtype, q_len, k_len)
            mask = _STEP_MASKS.get(attention_mask, kind, lambda: _padded_mask(allowed, attention_mask, query.dtype))
        out = F.scaled_dot_product_attention(query, key, v, attn_mask=mask, dropout_p=p, scale=1.0)
        return out.to(value.dtype), None


def _padded_mask(allowed: torch.Tensor, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lowest = torch.finfo(dtype).min
    if attention_mask.dtype == torch.bool:  # transformers' SDPA mask: True where a query may attend
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype,
                                     device=attention_mask.device).masked_fill(~attention_mask, lowest)
    # An additive mask, not a boolean one: a row with no allowed key (a left-padding position) then gets uniform
    # weights, as in the eager attention, instead of NaN.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, lowest)
    return (mask + attention_mask.to(dtype)).clamp(min=lowest)


class _StepMasks:
    """The masks of one forward pass, shared by its layers: every layer is given the same attention mask object, so
    that object (held weakly) tells a new forward pass from the same one. The (reference, masks) pair is replaced
    as a whole, so a thread never reads another forward pass's masks."""

    def __init__(self):
        self.state = (lambda: None, {})

    def get(self, attention_mask: torch.Tensor, key: tuple, build) -> torch.Tensor:
        ref, masks = self.state
        if ref() is not attention_mask:
            masks = {}
            self.state = (weakref.ref(attention_mask), masks)
        if key not in masks:
            masks[key] = build()
        return masks[key]


_STEP_MASKS = _StepMasks()


def _switch(model: nn.Module, to: type) -> int:
    switched = 0
    for module in model.modules():
        if type(module) in (GPTNeoSelfAttention, GPTNeoEagerAttention) and type(module) is not to:
            module.__class__ = to
            if to is GPTNeoSDPAAttention:  # the model then builds SDPA masks: None where nothing is padded
                module.config._attn_implementation = "sdpa"
            switched += 1
    return switched


def use_sdpa(model: nn.Module) -> int:
    """Switch every eager GPT-Neo attention inside `model` to GPTNeoSDPAAttention in place (weights and buffers
    kept); returns how many were switched. Attention weights are then not returned (output_attentions gives None)."""
    return _switch(model, GPTNeoSDPAAttention)


def no_host_copies(model: nn.Module) -> int:
    """Switch every eager GPT-Neo attention inside `model` to GPTNeoEagerAttention (same outputs, no tensor made on
    the host per call); returns how many were switched."""
    return _switch(model, GPTNeoEagerAttention)
