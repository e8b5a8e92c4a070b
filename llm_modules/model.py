"""The combined model, read top to bottom: frozen large model -> bridge -> small model -> new LM head.

Shapes: B batch, T new positions, P positions already cached, S = P + T source positions, D_L / D_S widths of the
large / small model, V the large tokenizer's vocabulary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import (
    attention_mask_for,
    freeze,
    hidden_size,
    hidden_states_at,
    learned_position_limit,
    load_backbone,
    load_frozen_large,
    load_hf_config,
    load_model_tokenizer,
    load_small_tokenizer,
    positions_from_mask,
    seeded,
)
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_tensors, save_tensors
from .config import LLMModulesConfig
from .couplings import COUPLINGS
from .errors import UserError, collect
from .gpt_neo_sdpa import no_host_copies
from .kv_cache import LLMModulesCache
from .losses import chunked_cross_entropy

# The trainable part, by top-level submodule; the optimizer, the checkpoint and the tests use this one definition.
TRAINABLE = ("bridge", "small", "lm_head")


@dataclass
class LLMModulesOutput:
    logits: Optional[torch.Tensor]  # (B, T, V); None when only the loss was asked for
    loss: Optional[torch.Tensor] = None  # mean over target tokens
    cache: Optional[LLMModulesCache] = None
    loss_sum: Optional[torch.Tensor] = None  # summed over target tokens (token-weighted averaging across batches)
    num_targets: int = 0
    target_logits: Optional[torch.Tensor] = None  # (N, V) at the N labelled positions (return_logits=False)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labels != -100 (labels are shifted here)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


class LLMModules(nn.Module):
    """A frozen large causal LM whose states drive a small causal LM over the large model's vocabulary."""

    def __init__(
        self,
        config: LLMModulesConfig,
        large: Optional[nn.Module],
        small: nn.Module,
        vocab_size: int,
        tokenizer=None,
        large_config=None,
        large_tokenizer=None,
    ):
        """`large` may be None with `large_config` given: a model that runs only from cached source states.
        For coupling "prompt", `small` is the small causal LM (with its head), kept whole."""
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer  # the tokenizer of the model's output vocabulary
        # What the large model reads: the same tokenizer, except for coupling "prompt" (the small one has its own).
        self.large_tokenizer = large_tokenizer or tokenizer
        coupling = COUPLINGS[config.coupling]
        self.large = freeze(large) if large is not None and coupling.reads_large else None
        # The coupling is held as `bridge`, the name its tensors carry in checkpoints (couplings.py).
        self.bridge, self.small, self.lm_head = coupling.build(config, hidden_size(large_config or large.config),
                                                               small, vocab_size)
        self.position_limits = {"small": learned_position_limit(self.small)}
        if self.large is not None:
            self.position_limits["large"] = learned_position_limit(large)
        no_host_copies(self)  # GPT-Neo's eager attention without its per-call host-to-device copy (same outputs)

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: LLMModulesConfig, tokenizer=None, load_large: bool = True) -> "LLMModules":
        """Build the model a config describes; random parts are seeded from `config.bridge.seed`.
        load_large=False skips the large model (training from the feature cache needs only its config)."""
        seed = config.bridge.seed
        coupling = COUPLINGS[config.coupling]  # the one place a coupling is chosen
        if not coupling.reads_large or not load_large:  # never runs the large model: read its config only
            large, large_config = None, load_hf_config(config.large, "large")
        else:
            large = load_frozen_large(config.large)
            large_config = large.config
        own = coupling.own_vocabulary  # the small model keeps its head, tokenizer and vocabulary
        small = load_backbone(config.small, pretrained=config.small.pretrained, seed=seed + 2, where="small",
                              with_head=own)
        if tokenizer is None:
            tokenizer = load_model_tokenizer(config)
        out_tokenizer = load_small_tokenizer(config) if own else tokenizer
        vocab_size = (small.get_output_embeddings().out_features if own
                      else resolve_vocab_size(config, tokenizer, large_config.vocab_size))
        check_source_layers(config.large, large_config)
        with seeded(seed):
            model = cls(config.replace(vocab_size=vocab_size), large, small, vocab_size, out_tokenizer, large_config,
                        large_tokenizer=tokenizer)
        if config.small.gradient_checkpointing:
            model.small.activation_checkpointing_enable()
        return model

    def train(self, mode: bool = True) -> "LLMModules":
        super().train(mode)
        if self.large is not None:
            self.large.eval()  # frozen means eval forever: no dropout in the large model
        return self

    # ---- what trains ---------------------------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.split(".", 1)[0] in TRAINABLE]

    def trained_named_parameters(self, lr_head: Optional[float] = None,
                                 lr_small: Optional[float] = None) -> list[tuple[str, nn.Parameter]]:
        """What training changes: the trainable set less what a learning rate of 0 freezes: the head
        (train.lr_head: 0, or lr_small: 0 with lr_head unset) and the small model (train.lr_small: 0)."""
        frozen = {"lm_head"} if lr_head == 0 or (lr_head is None and lr_small == 0) else set()
        frozen |= {"small"} if lr_small == 0 else set()
        return [(n, p) for n, p in self.trainable_named_parameters() if n.split(".", 1)[0] not in frozen]

    def trained_count(self, train) -> int:
        """Parameters the training config `train` (TrainConfig) changes: trained_named_parameters at its rates."""
        return sum(p.numel() for _, p in self.trained_named_parameters(train.lr_head, train.lr_small))

    def param_groups(self, lr_bridge: float, lr_small: float, weight_decay: float,
                     lr_head: Optional[float] = None, lr_gate: Optional[float] = None) -> list[dict]:
        """AdamW groups as in the paper: the bridge at lr_bridge, the small model and its new head at lr_small; with
        lr_head, the head in a group of its own at that rate, and at 0 in none: frozen (no gradient is computed;
        lr_small: 0 freezes the small model, and the head with it unless lr_head is set); with lr_gate, the prompt
        coupling's tanh gates (GatedMemoryAttention.alpha) in a group of their own."""
        head = dict(self.lm_head.named_parameters())
        if lr_head is not None and any(p is q for p in head.values() for q in self.small.parameters()):
            raise UserError("train.lr_head: this model's LM head is the small model's own input embedding (tied), "
                            "so a learning rate of its own would also change the embedding; leave train.lr_head unset")
        gates = {id(p) for n, p in self.bridge.named_parameters() if n.endswith(".alpha")}
        trained = self.trained_named_parameters(lr_head, lr_small)
        kept = {id(p) for _, p in trained}
        for _, p in self.trainable_named_parameters():
            p.requires_grad_(id(p) in kept)
        groups = {"bridge": [], "gate": [], "small": [], "lm_head": []}
        for n, p in trained:
            part = n.split(".", 1)[0]
            if part == "lm_head" and lr_head is None:
                part = "small"
            elif id(p) in gates and lr_gate is not None:
                part = "gate"
            groups[part].append(p)
        lrs = {"bridge": lr_bridge, "gate": lr_gate, "small": lr_small, "lm_head": lr_head}
        return [{"params": groups[g], "lr": lrs[g], "weight_decay": weight_decay, "name": g}
                for g in ("bridge", "gate", "small", "lm_head") if groups[g] or g in ("bridge", "small")]

    # ---- forward -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def source_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache=None,
    ) -> torch.Tensor:
        """The large model's hidden states (B, T, D_L) at the configured layer (B, T, n * D_L for n large.layers);
        its LM head is never run."""
        if self.large is None:
            raise RuntimeError("this model was built without its large model (load_large=False): pass source_states")
        return hidden_states_at(self.large, self.config.large.read_layers, input_ids, attention_mask, position_ids,
                                cache)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        source_states: Optional[torch.Tensor] = None,
        cache: Optional[LLMModulesCache] = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        memory_ids: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
        chunked_loss: bool = False,
    ) -> LLMModulesOutput:
        """input_ids (B, T): the new tokens (all of them without a cache); attention_mask (B, P + T) covers the
        cached and the new positions (Hugging Face convention); source_states replaces the large model (feature
        cache): (B, T, D_L) for the stream coupling, (B, M, D_L) memory states for the prompt coupling; labels (B, T)
        are shifted inside; cache is updated in place; logits_to_keep > 0 computes the head for the last positions
        only (decoding); return_logits=False with labels runs the head only where a label is taken (prompt and
        padding positions skip the V-way projection; same loss), and with chunked_loss=True (train.chunked_loss) holds
        no more than a chunk of those logits at a time (losses.py; target_logits is then None). memory_ids /
        memory_mask (B, M): the prompt in the large model's tokenizer (coupling "prompt"; not needed once the cache
        holds the memory)."""
        ref = input_ids if input_ids is not None else source_states
        if ref is None:
            raise ValueError("give input_ids or source_states")
        B, T = ref.shape[:2]
        P = cache.get_seq_length() if cache is not None else 0
        if cache is not None and cache.small.padded is None:  # the prefill: is any row padded? (read once)
            cache.large.padded = cache.small.padded = attention_mask is not None and not bool(attention_mask.all())
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=ref.device)
        if attention_mask.shape != (B, P + T):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (B, cached + new) = {(B, P + T)}")
        position_ids = positions_from_mask(attention_mask)[:, P:]  # (B, T)
        limits = [n for n in self.position_limits.values() if n is not None]
        if limits and P + T > min(limits):
            # Only near a limit: the exact check reads the positions on the host (a synchronization on a GPU).
            self.check_length(int(position_ids.max()) + 1 if position_ids.numel() else 0)
        small_cache = cache.small if cache is not None else None
        small_kwargs = dict(attention_mask=attention_mask_for(self.small, attention_mask, T, small_cache),
                            position_ids=position_ids, cache=small_cache, use_cache=cache is not None)

        inputs, context = self.bridge.small_inputs(self, input_ids, attention_mask, position_ids, source_states, cache,
                                                   memory_ids, memory_mask)
        with context:
            h = self.small(**inputs, **small_kwargs).last_hidden_state  # (B, T, D_S)
        if labels is not None and not return_logits:
            targets = labels[:, 1:]
            keep = targets != -100  # (B, T-1)
            if chunked_loss:  # the (N, V) logits are never whole
                logits_t = None
                loss_sum = chunked_cross_entropy(h[:, :-1][keep], targets[keep], self.lm_head)
            else:
                logits_t = self.lm_head(h[:, :-1][keep])  # (N, V): only where a label is taken
                loss_sum = F.cross_entropy(logits_t.float(), targets[keep], reduction="sum")
            n = int(keep.sum())
            return LLMModulesOutput(logits=None, loss=loss_sum / max(n, 1), cache=cache, loss_sum=loss_sum,
                                    num_targets=n, target_logits=logits_t)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return LLMModulesOutput(logits=logits, loss=loss, cache=cache)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """New token ids (B, N) after a left-padded prompt batch; see generate.generate for the arguments
        (max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, stop, seed, use_cache)."""
        from .generate import generate

        if self.tokenizer is not None:
            kwargs.setdefault("tokenizer", self.tokenizer)
            kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return generate(self, input_ids, attention_mask, **kwargs)

    def new_cache(self) -> LLMModulesCache:
        return LLMModulesCache.empty(self.bridge.cache_layers)

    def check_length(self, length: int) -> None:
        for role, limit in self.position_limits.items():
            if limit is not None and length > limit:
                raise UserError(
                    f"sequence of {length} tokens exceeds the {role} model's {limit} learned positions; shorten it "
                    f"(in training: data.max_length) or choose a {role} model with rotary positions"
                )

    # ---- save / load ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path], tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Trainable weights (safetensors) + the config that rebuilds everything else. `tensors`: the whole trainable
        weights when the parameters themselves are shards (FSDP; see sharded_state.gather)."""
        d = Path(directory)
        tensors = dict(self.trainable_named_parameters()) if tensors is None else tensors
        save_tensors(d / WEIGHTS_NAME, tensors, metadata={"llm_modules": json.dumps(self.signature())})
        self.config.save_yaml(d / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls, directory: Union[str, Path], config: Optional[LLMModulesConfig] = None, tokenizer=None
    ) -> "LLMModules":
        """Rebuild from a save_pretrained directory; `config` (optional) must describe the same model."""
        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise UserError(f"{d}: not a checkpoint directory (no {CONFIG_NAME}); give a directory from save_pretrained")
        saved = LLMModulesConfig.from_yaml(d / CONFIG_NAME)
        tensors, meta = load_tensors(d / WEIGHTS_NAME)
        if config is not None:
            check_compatible(config, saved, str(d))
        model = cls.from_config(config or saved, tokenizer=tokenizer)
        model._load_saved(tensors, meta, str(d / WEIGHTS_NAME))
        return model

    def load_weights_from(self, directory: Union[str, Path]) -> None:
        """The trained weights of another save_pretrained directory of this model (a step checkpoint of the same
        run, say) copied into it; the frozen large model is not loaded again."""
        path = Path(directory) / WEIGHTS_NAME
        self._load_saved(*load_tensors(path), str(path))

    def _load_saved(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> None:
        if "llm_modules" in meta:
            check_signature(json.loads(meta["llm_modules"]), self.signature(), where)
        self.load_trainable(tensors, where)

    def signature(self) -> dict:
        """What a checkpoint must agree on to be loadable into this model."""
        return {
            "large": self.config.large.identity,
            "coupling": self.config.coupling,
            "large_hidden": self.bridge.large_hidden,
            "small_hidden": hidden_size(self.small.config),
            "vocab_size": self.lm_head.out_features,
        }

    def load_trainable(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.check_trainable(tensors, where)
        with torch.no_grad():
            for k, p in self.trainable_named_parameters():
                p.copy_(tensors[k])

    def check_trainable(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """UserError naming every missing, unexpected or misshapen tensor (shapes are whole ones, sharded or not)."""
        own = dict(self.trainable_named_parameters())
        problems = [f"missing tensor {k}" for k in own if k not in tensors]
        problems += [f"unexpected tensor {k}" for k in tensors if k not in own]
        problems += [
            f"{k}: shape {tuple(tensors[k].shape)} in the checkpoint, {tuple(p.shape)} in the model"
            for k, p in own.items()
            if k in tensors and tensors[k].shape != p.shape
        ]
        collect(problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else []),
                f"{where} does not match the model its config builds")


# ---- builder helpers -----------------------------------------------------------------------------------------
def check_source_layers(spec, large_config) -> None:
    """large.layer (or each of large.layers) names a hidden state of the large model."""
    n = large_config.num_hidden_layers
    key, given = ("large.layers", spec.layers) if spec.layers else ("large.layer", spec.layer)
    bad = [layer for layer in spec.read_layers if not (layer == -1 or 0 <= layer <= n)]
    if bad:
        raise UserError(f"{key}: {given} is out of range; the large model has hidden states 0..{n} (or -1)")


def resolve_vocab_size(config: LLMModulesConfig, tokenizer, large_vocab: int) -> int:
    """The new head predicts the large tokenizer's vocabulary: len(tokenizer) (as in the paper)."""
    if tokenizer is not None:
        n = len(tokenizer)
        if n > large_vocab:
            raise UserError(f"the tokenizer has {n} entries but the large model embeds only {large_vocab}")
        if config.vocab_size is not None and config.vocab_size != n:
            raise UserError(f"vocab_size: {config.vocab_size} in the config, but the tokenizer has {n} entries")
        return n
    return config.vocab_size or large_vocab


def check_compatible(config: LLMModulesConfig, saved: LLMModulesConfig, where: str) -> None:
    problems = []
    if config.large.identity != saved.large.identity:
        problems.append(f"large model: checkpoint has {saved.large.identity!r}, config asks {config.large.identity!r}")
    if config.vocab_size is not None and saved.vocab_size is not None and config.vocab_size != saved.vocab_size:
        problems.append(f"vocabulary: checkpoint has {saved.vocab_size}, config asks {config.vocab_size}")
    collect(problems, f"checkpoint {where} was trained for another model")


def check_signature(saved: dict, own: dict, where: str) -> None:
    names = {"large": "large model", "coupling": "coupling", "large_hidden": "large hidden size", "small_hidden": "small hidden size",
             "vocab_size": "vocabulary size"}
    problems = [f"{names[k]}: checkpoint has {saved.get(k)!r}, model has {v!r}" for k, v in own.items() if saved.get(k) != v]
    collect(problems, f"checkpoint {where} was trained for another model")
