"""How the small model is coupled to the large one: one class per coupling, chosen once (COUPLINGS, looked up in
LLMModules.from_config). Adding a coupling means adding a class here.

  stream  the paper: the small model reads only the bridge's output, position by position (bridge.Bridge);
  prompt  the large model reads the prompt once; the small model decodes with its own tokens, embeddings and head,
          attending to that memory through gated cross-attention every `bridge.every` blocks (prompt_coupling.py);
  none    the small model alone with its own token table over the large model's vocabulary (the baseline arm).

Each coupling is the module the combined model holds as `bridge` (the name its checkpoints' tensors carry) and owns:
  build         how the small model and the output head are set up around it (at construction);
  small_inputs  what the small model reads in one forward, and the context the forward runs in;
  cache_layers  how many cross-attention layers the decoding cache keeps;
and says as class attributes whether the large model runs at all (`reads_large`), whether the model speaks the small
model's own vocabulary (`own_vocabulary`) and whether the large model reads a separate prompt memory (`memory`).
Hand-written: the project's own components.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from .backbones import drop_token_embeddings, hidden_size, positions_from_mask
from .bridge import Bridge
from .prompt_coupling import PromptBridge, attach, block_list


class CrossAttending:
    """What the two couplings with cross-attention layers over the large model's states (read through `pre_proj`)
    tell the model: the layers the decoding cache keeps and the large width they read."""

    @property
    def cache_layers(self) -> int:
        return len(self.layers)

    @property
    def large_hidden(self) -> Optional[int]:
        return self.pre_proj.in_features


class StreamCoupling(CrossAttending, Bridge):
    """The paper's coupling: large-side states of every position -> the bridge -> the small model's inputs."""

    reads_large, own_vocabulary, memory = True, False, False

    @classmethod
    def build(cls, cfg, d_large: int, small: nn.Module, vocab_size: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(coupling, small base model, new head over the large vocabulary); the small model's token table goes."""
        d_small = hidden_size(small.config)
        coupling = cls(d_large, d_small, cfg.bridge)
        drop_token_embeddings(small)
        return coupling, small, nn.Linear(d_small, vocab_size, bias=False)

    def small_inputs(self, model, input_ids, attention_mask, position_ids, source_states, cache, memory_ids,
                     memory_mask) -> tuple[dict, contextlib.AbstractContextManager]:
        if source_states is None:
            source_states = model.source_states(input_ids, attention_mask, position_ids,
                                                cache.large if cache is not None else None)
        x = self(source_states.to(model.lm_head.weight.dtype), attention_mask, cache.bridge if cache else None)
        return {"inputs_embeds": x}, contextlib.nullcontext()  # (B, T, D_S)


class SmallAlone(nn.Module):
    """The baseline: the small model alone, reading tokens through its own table over the same vocabulary. Holds no
    weights (the table is the small model's)."""

    reads_large, own_vocabulary, memory = False, False, False
    cache_layers, large_hidden = 0, None

    @classmethod
    def build(cls, cfg, d_large: int, small: nn.Module, vocab_size: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        d_small = hidden_size(small.config)
        small.set_input_embeddings(nn.Embedding(vocab_size, d_small))
        return cls(), small, nn.Linear(d_small, vocab_size, bias=False)

    def small_inputs(self, model, input_ids, attention_mask, position_ids, source_states, cache, memory_ids,
                     memory_mask) -> tuple[dict, contextlib.AbstractContextManager]:
        return {"inputs_embeds": model.small.get_input_embeddings()(input_ids)}, contextlib.nullcontext()


class PromptCoupling(CrossAttending, PromptBridge):
    """The prompt coupling: the small causal LM kept whole (its head included) with gated memory attention."""

    reads_large, own_vocabulary, memory = True, True, True

    @classmethod
    def build(cls, cfg, d_large: int, small: nn.Module, vocab_size: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """`small` is the small causal LM with its head; its blocks are wrapped at the bridge's indices."""
        head, small = small.get_output_embeddings(), small.base_model
        coupling = cls(d_large, hidden_size(small.config), len(block_list(small)), cfg.bridge,
                       sources=len(cfg.large.read_layers))
        attach(small, coupling)
        return coupling, small, head

    def small_inputs(self, model, input_ids, attention_mask, position_ids, source_states, cache, memory_ids,
                     memory_mask) -> tuple[dict, contextlib.AbstractContextManager]:
        kv, mask = self.memory_keys_values(model, memory_ids, memory_mask, source_states, cache)
        return {"input_ids": input_ids}, self.bound(kv, mask)

    def memory_keys_values(self, model, memory_ids, memory_mask, memory_states, cache) -> tuple[list, torch.Tensor]:
        """Per-layer keys/values over the prompt memory: from the cache after prefill (the large model is not
        called again), else computed from the large model's states (or given states) and stored in the cache."""
        if cache is not None and cache.memory_mask is not None:
            return list(zip(cache.bridge.keys, cache.bridge.values)), cache.memory_mask
        if memory_mask is None:
            ref = memory_ids if memory_ids is not None else memory_states
            if ref is None:
                raise ValueError("coupling 'prompt' needs memory_ids (the prompt in the large tokenizer) or states")
            memory_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if memory_states is None:
            memory_states = model.source_states(memory_ids, memory_mask, positions_from_mask(memory_mask))
        kv = self.keys_values(memory_states.to(model.lm_head.weight.dtype))
        if cache is not None:
            for i, (k, v) in enumerate(kv):
                cache.bridge.update(i, k, v)
            cache.memory_mask = memory_mask
        return kv, memory_mask


COUPLINGS: dict[str, type] = {"stream": StreamCoupling, "prompt": PromptCoupling, "none": SmallAlone}
