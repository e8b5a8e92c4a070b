"""Decoding: prefill once, then one token per step with every cache reused; a generator that streams tokens.

Sampling reuses the `transformers` logits processors (repetition penalty, temperature, top-k, top-p); only the loop
is ours, because the combined model carries three caches (large KV, bridge cross-attention KV, small KV) that the
`GenerationMixin` does not know about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import UserError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def processors(self) -> LogitsProcessorList:
        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs

    def check(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.do_sample and self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be > 0 when sampling")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            problems.append("top_k must be >= 0 and repetition_penalty > 0")
        if problems:
            raise UserError("bad generation settings: " + "; ".join(problems))


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) the token chosen at this step (pad for finished rows)
    logits: torch.Tensor  # (B, V) the raw logits it was chosen from
    finished: torch.Tensor  # (B,) bool, True once a row has stopped (including this step)


# The decode loop, read top to bottom in one place; its signature is 15 of its lines.
@torch.no_grad()
def stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    sampling: Optional[SamplingConfig] = None,
    *,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    stop: Sequence[str] = (),
    tokenizer=None,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    model_kwargs: Optional[dict] = None,
    check_every: int = 1,
) -> Iterator[Step]:
    """Yield one Step per new token. input_ids (B, T) left-padded; stops rows on eos ids or stop strings.
    model_kwargs (e.g. memory_ids / memory_mask of the prompt coupling) go with the prefill, and with every step
    when nothing is cached. The tokens and finished flags stay on the model's device: the loop reads them on the
    host only to test whether every row has finished, once every `check_every` steps (a synchronization on a GPU;
    with check_every > 1 up to check_every - 1 steps of padding follow the last row's end), and, with stop strings,
    once a step to match them."""
    sampling = sampling or SamplingConfig()
    sampling.check()
    if stop and tokenizer is None:
        raise UserError("stop strings need a tokenizer to decode the output")
    if check_every < 1:
        raise UserError(f"check_every={check_every} must be >= 1")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    B, T = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    prompt_len = int(mask.sum(-1).max())
    model.check_length(prompt_len)
    try:
        model.check_length(prompt_len + sampling.max_new_tokens)
    except UserError as e:
        limit = str(e).split("exceeds ")[-1].split(";")[0]
        raise UserError(f"a prompt of {prompt_len} tokens + --max-new-tokens {sampling.max_new_tokens} exceeds "
                        f"{limit}; shorten the prompt or lower --max-new-tokens") from None
    procs = sampling.processors()
    eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)  # copied to the device once
    ids, finished = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new: list[list[int]] = [[] for _ in range(B)]  # each row's tokens on the host, kept for stop strings only
    cache = model.new_cache() if use_cache else None
    step_input = input_ids
    for i in range(sampling.max_new_tokens):
        if use_cache:
            extra = model_kwargs or {} if step_input is input_ids else {}
            logits = model(step_input, mask, cache=cache, logits_to_keep=1, **extra).logits[:, -1]  # (B, V)
        else:  # full recompute, as the reference does
            logits = model(ids, mask, logits_to_keep=1, **(model_kwargs or {})).logits[:, -1]
        scores = procs(ids, logits.float())
        if sampling.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
        else:
            token = scores.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        done_now = torch.isin(token, eos) | finished
        all_done = None
        if stop:  # matched on the host: one read of the step's tokens and flags
            tokens, was, done = torch.stack([token, finished.long(), done_now.long()]).tolist()
            stopped = [False] * B
            for b in range(B):
                if not was[b]:
                    new[b].append(tokens[b])
                    stopped[b] = not done[b] and any(s in tokenizer.decode(new[b][-32:]) for s in stop)
            if any(stopped):
                done_now = done_now | torch.tensor(stopped, device=done_now.device)
            all_done = all(d or s for d, s in zip(done, stopped))
        finished = done_now
        yield Step(tokens=token, logits=logits, finished=finished.clone())
        if all_done is None and (i + 1) % check_every == 0:
            all_done = bool(finished.all())
        if all_done:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_input = token[:, None]


def prompt_batch(model, conversations: list[list[dict]]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Prompts formatted exactly as training formatted them: left-padded ids and mask in the output tokenizer, and
    for coupling "prompt" the memory (the same prompts in the large tokenizer) as model kwargs."""
    from .vocab import pad
    from .prompts import encode_prompt, with_system_prompt

    data = model.config.data
    convs = [with_system_prompt(c, data.system_prompt) for c in conversations]
    ids, mask = pad([encode_prompt(c, data.format, model.tokenizer) for c in convs], model.tokenizer.pad_token_id,
                       left=True)
    extra = {}
    if model.bridge.memory:  # the large model reads the prompt in its own tokenizer
        mem_ids, mem_mask = pad([encode_prompt(c, data.format, model.large_tokenizer) for c in convs], 0, left=False)
        extra = {"memory_ids": mem_ids, "memory_mask": mem_mask}
    return ids, mask, extra


def generate(model, input_ids, attention_mask=None, *, seed: Optional[int] = None, **kwargs) -> torch.Tensor:
    """New token ids (B, N), rows padded with pad_token_id after they stop. check_every: see `stream` (the output is
    the same for any value)."""
    sampling_keys = {f for f in SamplingConfig.__dataclass_fields__}
    sampling = SamplingConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in sampling_keys})
    generator = kwargs.pop("generator", None)
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    check_every = kwargs.pop("check_every", 1)
    tokens, ended = [], []
    for step in stream(model, input_ids, attention_mask, sampling, generator=generator, check_every=check_every,
                       **kwargs):
        tokens.append(step.tokens)
        ended.append(step.finished.all())
    if not tokens:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    out = torch.stack(tokens, dim=1)  # (B, N)
    if check_every > 1:  # drop the steps after every row had finished: the output of check_every=1, one read
        ended = torch.stack(ended)  # (N,)
        out = out[:, :int(torch.where(ended.any(), ended.int().argmax() + 1, len(tokens)))]
    return out


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, never emitting a broken multi-byte character.

    Decodes a short window of recent tokens (not the whole output each step), as vLLM and TGI do.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix, self.read = 0, 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (a genuinely invalid byte sequence stays as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
