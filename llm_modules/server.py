"""An OpenAI-compatible HTTP server: `llm-modules serve --checkpoint D`.

Built on FastAPI (routing, responses, error handlers) and uvicorn (HTTP/1.1, the event loop); server-sent events
are a plain `StreamingResponse` of `data: {...}` lines; request bodies are validated by pydantic models (strict:
`"10"` is not a number). Serves

    GET  /v1/models
    POST /v1/chat/completions   messages -> formatted exactly as in training (generate.prompt_batch, prompts.py)
    POST /v1/completions        prompt: raw text, encoded as training encodes plain text

with `stream` (one chunk per decoded text delta, then `data: [DONE]`), `max_tokens` / `max_completion_tokens`,
`temperature` (0 = greedy; default 1, as OpenAI), `top_p`, `seed`, `stop`, `n: 1`, `stream_options.include_usage`;
`usage` counts tokens; `finish_reason` is `stop` (end of sequence or a stop string) or `length`.

Batching: one worker thread owns the model. Requests queue up; the worker takes the oldest one and every other
queued request with the same sampling settings (all greedy requests share a batch; sampled ones share a batch when
temperature and top_p agree; a request with a seed runs alone so that its seed decides its output), up to
--max-batch-size, and runs them through `generate.stream` as one left-padded batch. Requests that arrive while a
batch runs join the next one. Each row has its own max_tokens and stop strings (handled here, not by `stream`);
a row that is finished or whose client went away is no longer reported, and a batch stops once no row is left.

Errors are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status and a message
naming the field. Nothing a request contains is executed or written to disk.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import torch

from .errors import UserError

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # an optional extra: say how to get it instead of a bare ImportError
    raise ImportError('llm_modules.server needs FastAPI and uvicorn: pip install "llm-modules[serve]"') from e

log = logging.getLogger("llm_modules.server")

DEFAULT_CHAT_MAX_TOKENS = 256  # chat without max_tokens: up to this many, or what the context leaves
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_BODY_BYTES = 8 * 2**20
DISCONNECT_CHECK_S = 0.25  # how often a waiting request looks whether its client is still there


# ---- errors ---------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _param(loc: tuple) -> Optional[str]:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, as a 400 naming the field."""
    err = e.errors(include_url=False)[0]
    kind, loc = err["type"], tuple(err["loc"])
    if kind == "json_invalid":
        return APIError(400, f"malformed JSON in the request body: {err.get('ctx', {}).get('error', err['msg'])}")
    if kind == "model_type" and not loc:
        return APIError(400, "the request body must be a JSON object")
    param = _param(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return APIError(400, f"{param}: this field is required", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return APIError(400, f"{param}: unknown field", param)
    got = "" if kind.startswith("value_error") else f" (got {_short(err.get('input'))})"
    return APIError(400, f"{param}: {msg[0].lower() + msg[1:]}{got}", param, "invalid_type" if kind.endswith(
        "_type") or kind.endswith("_parsing") else "invalid_value")


# ---- request bodies -------------------------------------------------------------------------------------------
class _Body(BaseModel):
    # Unknown fields are ignored (clients send many: user, metadata, store ...); known ones are strictly typed.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    # a string, or a list of {"type": "text", "text": ...} parts (checked in `message_text`)
    content: Any = None


class _Sampling(_Body):
    model: Optional[str] = None  # optional here (OpenAI requires it); when given it must be the served model
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Any = None  # a string or a list of strings (checked in `_stop_strings`, for a clearer message)
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    logprobs: Any = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # the newer name of max_tokens for chat
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None


class CompletionRequest(_Sampling):
    prompt: Any = None  # a string, or a list of one (checked in `completion_prompt`)
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None


def _unsupported(body: _Sampling) -> None:
    """Fields whose requested behaviour this server does not have: refused rather than silently ignored."""
    if body.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported (got {body.n}); send several requests instead", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise APIError(400, f"{name}: not supported by this server (give 0 or leave it out)", name)
    if body.logit_bias:
        raise APIError(400, "logit_bias: not supported by this server", "logit_bias")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs: not supported by this server", "logprobs")
    if isinstance(body, ChatCompletionRequest) and body.tools:
        raise APIError(400, "tools: tool calling is not supported by this server", "tools")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError(400, "echo: not supported by this server", "echo")
        if body.suffix:
            raise APIError(400, "suffix: not supported by this server", "suffix")
        if body.best_of not in (None, 1):
            raise APIError(400, f"best_of: only 1 is supported (got {body.best_of})", "best_of")


def _stop_strings(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not (isinstance(stops, list) and all(isinstance(x, str) for x in stops)):
        raise APIError(400, f"stop: must be a string or a list of strings (got {_short(stop)})", "stop",
                       "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(stops)})", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: stop strings must not be empty", "stop")
    return tuple(stops)


def message_text(m: ChatMessage, i: int) -> str:
    """A message's content as one string: a string, or the text parts of a list joined."""
    where = f"messages[{i}].content"
    c = m.content
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    "supported", f"{where}[{j}]")
            parts.append(part["text"])
        c = "".join(parts)
    if c is None:
        raise APIError(400, f"{where}: this field is required", where, "missing_required_parameter")
    if not isinstance(c, str):
        raise APIError(400, f"{where}: must be a string or a list of text parts (got {_short(c)})", where,
                       "invalid_type")
    if not c.strip():
        raise APIError(400, f"{where}: the content is empty", where, "invalid_value")
    return c


def conversation(body: ChatCompletionRequest) -> list[dict]:
    if not body.messages:
        raise APIError(400, "messages: give at least one message", "messages", "invalid_value")
    out = [{"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
           for i, m in enumerate(body.messages)]
    if out[-1]["role"] != "user":
        last = len(out) - 1
        raise APIError(400, f"messages[{last}].role: the conversation must end with a user message (got "
                            f"{out[-1]['role']!r})", f"messages[{last}].role", "invalid_value")
    return out


def completion_prompt(body: CompletionRequest) -> str:
    p = body.prompt
    if p is None:
        raise APIError(400, "prompt: this field is required", "prompt", "missing_required_parameter")
    if isinstance(p, list):
        if len(p) != 1:
            raise APIError(400, f"prompt: give one string (got a list of {len(p)}); send several requests instead",
                           "prompt", "invalid_value")
        p = p[0]
    if not isinstance(p, str):
        raise APIError(400, f"prompt: must be a string (got {_short(p)}; token id lists are not supported)",
                       "prompt", "invalid_type")
    if not p:
        raise APIError(400, "prompt: the prompt is empty", "prompt", "invalid_value")
    return p


# ---- the engine: one worker thread, batched decoding ----------------------------------------------------------
@dataclass(eq=False)
class Job:
    """One request: prompt ids (and the prompt coupling's memory ids), its limits, and where its output goes."""

    ids: list[int]
    memory: Optional[list[int]]
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    queue: Optional[asyncio.Queue] = None
    cancelled: bool = False  # set by the request side when its client is gone
    produced: int = 0  # tokens generated for this row so far (set by the worker)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def key(self) -> tuple:
        """Requests with equal keys can share a batch (the whole batch is decoded with one sampling setting)."""
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", id(self))  # alone, so the seed alone decides the sample
        return ("sample", self.temperature, self.top_p)

    def put(self, item: tuple) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        if self.loop is None or self.queue is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancelled = True


class _Row:
    """One row of a running batch: its incremental detokenizer, stop strings and finish."""

    def __init__(self, job: Job, tokenizer):
        from .generate import IncrementalDecoder

        self.job, self.decoder = job, IncrementalDecoder(tokenizer)
        self.text, self.sent, self.done = "", 0, False
        self.longest = max(map(len, job.stop), default=0)

    def _advance(self, piece: str, final: bool) -> Optional[str]:
        """Add decoded text; send what can no longer turn into a stop string. Returns "stop" on a stop string."""
        self.text += piece
        stop = self.job.stop
        end, hit = len(self.text), None
        if stop:
            hits = [i for s in stop if (i := self.text.find(s, self.sent)) >= 0]
            if hits:
                end = hit = min(hits)
            elif not final:  # hold back the longest tail that could still grow into a stop string
                tail = self.text[max(self.sent, end - self.longest + 1):]
                for k in range(len(tail), 0, -1):
                    if any(s.startswith(tail[-k:]) for s in stop):
                        end -= k
                        break
        if end > self.sent:
            self.job.put(("delta", self.text[self.sent:end]))
            self.sent = end
        return "stop" if hit is not None else None

    def push(self, token: int, eos: set) -> Optional[str]:
        """Feed one generated token; returns the finish reason once the row is done."""
        self.job.produced += 1
        if token in eos:
            return self._advance(self.decoder.flush(), final=True) or "stop"
        if self._advance(self.decoder.push(token), final=False):
            return "stop"
        if self.job.produced >= self.job.max_tokens:
            return self._advance(self.decoder.flush(), final=True) or "length"
        return None

    def finish(self, reason: str) -> None:
        self.done = True
        self.job.put(("end", reason, self.job.produced))


class Engine:
    """Owns the model; a single worker thread decodes queued jobs in batches."""

    def __init__(self, model, tokenizer, *, context: int, large_only: bool = False, max_batch_size: int = 16,
                 eos_token_ids: Optional[list[int]] = None):
        if max_batch_size < 1:
            raise UserError(f"--max-batch-size {max_batch_size}: must be >= 1")
        if tokenizer is None:
            raise UserError("this model has no tokenizer, so it cannot read text prompts; set `tokenizer` in its config")
        self.model, self.tokenizer, self.context = model, tokenizer, int(context)
        self.large_only, self.max_batch_size = large_only, int(max_batch_size)
        eos = list(eos_token_ids or []) or [tokenizer.eos_token_id]
        self.eos = {int(e) for e in eos if e is not None}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self.threads = torch.get_num_threads()  # OpenMP settings are per thread: the worker sets the same
        self.prompt_coupling = not large_only and model.bridge.memory
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._held = False
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self.batch_sizes: list[int] = []  # every batch run so far (tests and logs read it)
        self.running: list[Job] = []  # the jobs of the batch being decoded now

    # ---- prompts -------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> tuple[list[int], Optional[list[int]]]:
        """Prompt ids (and memory ids for the prompt coupling) exactly as training formatted the conversation; the
        large model alone uses its tokenizer's chat template."""
        from .prompts import TemplateRejected

        try:
            if self.large_only:
                tok = self.tokenizer
                if getattr(tok, "chat_template", None) is None:
                    raise APIError(400, "messages: this model's tokenizer has no chat template; use /v1/completions",
                                   "messages")
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                return tok(text, add_special_tokens=False)["input_ids"], None
            from .generate import prompt_batch

            ids, mask, extra = prompt_batch(self.model, [messages])
            memory = extra["memory_ids"][0][extra["memory_mask"][0].bool()].tolist() if extra else None
            return ids[0][mask[0].bool()].tolist(), memory
        except (TemplateRejected, UserError) as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        except APIError:
            raise
        except Exception as e:  # a chat template (jinja) rejecting a conversation raises many kinds of errors
            raise APIError(400, f"messages: the chat template rejected this conversation ({e})", "messages") from None

    def encode_text(self, text: str) -> tuple[list[int], Optional[list[int]]]:
        """Raw text: encoded as training encodes plain text (the large model alone: as lm-eval's HF model does)."""
        tok = self.tokenizer
        if self.large_only:
            bos = tok.bos_token
            return tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"], None
        from .prompts import encode_segments

        style = self.model.config.data.format
        ids = encode_segments([(text, False)], style, tok)[0]
        memory = encode_segments([(text, False)], style, self.model.large_tokenizer)[0] if self.prompt_coupling \
            else None
        return ids, memory

    def check_length(self, n_prompt: int, n_memory: Optional[int], max_tokens: Optional[int], default: int,
                     what: str) -> int:
        """max_tokens for this prompt (the default fitted to the context); APIError when it does not fit."""
        if n_prompt == 0:
            raise APIError(400, f"{what}: the prompt encodes to no tokens", what, "invalid_value")
        longest = max(n_prompt, n_memory or 0)
        if longest >= self.context:
            raise APIError(400, f"{what}: the prompt is {longest} tokens; this model's context is {self.context} "
                                "tokens, which leaves no room for an answer", what, "context_length_exceeded")
        if max_tokens is None:
            return min(default, self.context - n_prompt)
        if n_prompt + max_tokens > self.context:
            raise APIError(400, f"max_tokens: {n_prompt} prompt tokens + max_tokens {max_tokens} = "
                                f"{n_prompt + max_tokens} exceeds this model's context of {self.context} tokens; "
                                f"lower max_tokens to at most {self.context - n_prompt} or shorten the prompt",
                           "max_tokens", "context_length_exceeded")
        return max_tokens

    # ---- queue ---------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None or not self._thread.is_alive():
            self._stopped = False
            self._thread = threading.Thread(target=self._work, name="llm-modules-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            for job in self._pending:
                job.put(("error", "the server is shutting down"))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopped:
                raise APIError(503, "the server is shutting down", type="server_error")
            self._pending.append(job)
            self._cond.notify()

    @contextmanager
    def held(self) -> Iterator[None]:
        """No new batch starts inside this block (queued requests wait, then go together): for tests."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def _take(self) -> list[Job]:
        """The oldest live job and the queued jobs that can share its batch (called under the lock)."""
        while self._pending and self._pending[0].cancelled:
            self._pending.popleft()
        if not self._pending:
            return []
        key = self._pending[0].key
        batch, rest = [], deque()
        for job in self._pending:
            if len(batch) < self.max_batch_size and job.key == key and not job.cancelled:
                batch.append(job)
            elif not job.cancelled:
                rest.append(job)
        self._pending = rest
        return batch

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stopped and (self._held or not self._pending):
                    self._cond.wait()
                if self._stopped:
                    return
                batch = self._take()
            if batch:
                self.running = batch
                try:
                    self._run_batch(batch)
                except Exception as e:  # a bug or a resource problem: fail this batch, keep serving
                    log.error("batch of %d failed:\n%s", len(batch), traceback.format_exc())
                    for job in batch:
                        job.put(("error", f"generation failed: {type(e).__name__}: {e}"))
                finally:
                    self.running = []

    def _inputs(self, batch: list[Job]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Left-padded prompt ids and mask, and the right-padded memory of the prompt coupling, as prompt_batch
        builds them."""
        from .vocab import pad

        ids, mask = pad([j.ids for j in batch], self.pad, left=True)
        extra = {}
        if self.prompt_coupling:
            mem_ids, mem_mask = pad([j.memory for j in batch], 0, left=False)
            extra = {"memory_ids": mem_ids, "memory_mask": mem_mask}
        return ids, mask, extra

    @torch.no_grad()
    def _run_batch(self, batch: list[Job]) -> None:
        from .generate import SamplingConfig, stream

        self.batch_sizes.append(len(batch))
        first = batch[0]
        ids, mask, extra = self._inputs(batch)
        sampling = SamplingConfig(max_new_tokens=max(j.max_tokens for j in batch), do_sample=not first.greedy,
                                  temperature=first.temperature if not first.greedy else 1.0, top_p=first.top_p)
        generator = torch.Generator().manual_seed(first.seed) if first.seed is not None and not first.greedy else None
        rows = [_Row(job, self.tokenizer) for job in batch]
        steps = stream(self.model, ids, mask, sampling, eos_token_id=sorted(self.eos), pad_token_id=self.pad,
                       generator=generator, model_kwargs=extra)
        try:
            for step in steps:
                tokens = step.tokens.tolist()
                for row, token in zip(rows, tokens):
                    if row.done:
                        continue
                    if row.job.cancelled:
                        row.done = True  # its client is gone: the row is no longer reported
                        continue
                    reason = row.push(int(token), self.eos)
                    if reason:
                        row.finish(reason)
                if all(row.done for row in rows):
                    break
                if self._stopped:  # shutting down: the rows still running end with an error
                    for row in rows:
                        if not row.done:
                            row.done = True
                            row.job.put(("error", "the server is shutting down"))
                    break
        finally:
            steps.close()
        for row in rows:  # stream ran out (every row hit eos): anything not finished yet ends here
            if not row.done and not row.job.cancelled:
                row.finish(row._advance(row.decoder.flush(), final=True) or "length")


# ---- the large model alone through the same decoding loop -----------------------------------------------------
class LargeOnly(torch.nn.Module):
    """A transformers causal LM with the interface `generate.stream` drives (check_length, new_cache,
    forward(ids, mask, cache=, logits_to_keep=)); positions count real tokens only, so left padding is exact."""

    def __init__(self, lm, context: int):
        super().__init__()
        self.lm, self.context = lm, int(context)

    def check_length(self, length: int) -> None:
        if length > self.context:
            raise UserError(f"sequence of {length} tokens exceeds the large model's {self.context} positions")

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache=None, logits_to_keep: int = 0,
                **unused):
        from .backbones import positions_from_mask

        positions = positions_from_mask(attention_mask)[:, -input_ids.shape[1]:]
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache,
                       use_cache=cache is not None, logits_to_keep=logits_to_keep)


# ---- loading ---------------------------------------------------------------------------------------------------
def load_engine(checkpoint: Union[str, Path], *, large_only: bool = False, max_batch_size: int = 16) -> Engine:
    """The checkpoint's combined model (frozen whole and laid out for decoding, as `generate` / `chat` load it), or
    with large_only its large model with its own LM head (loaded as the lm-eval model does). The context is the
    smallest learned position table, else data.max_length (the large model alone: its max_position_embeddings)."""
    if large_only:
        from .loading import load_for_eval
        from .row_split import prepare_for_cpu_decoding

        lm, tokenizer, cfg, limit = load_for_eval(checkpoint, large_only=True)
        prepare_for_cpu_decoding(lm)
        gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        eos = ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [getattr(tokenizer, "eos_token_id",
                                                                                           None)]
        return Engine(LargeOnly(lm, limit).eval(), tokenizer, context=limit, large_only=True,
                      max_batch_size=max_batch_size, eos_token_ids=[e for e in eos if e is not None])
    from .loading import load_for_generation

    model = load_for_generation(checkpoint)
    limits = [n for n in model.position_limits.values() if n is not None]
    context = min(limits) if limits else model.config.data.max_length
    return Engine(model, model.tokenizer, context=context, max_batch_size=max_batch_size)


# ---- the HTTP app ----------------------------------------------------------------------------------------------
class _APIKey:
    """ASGI middleware: every /v1 request needs `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if not header:
                await error_response(401, "missing API key: send the header `Authorization: Bearer KEY`",
                                     code="invalid_api_key")(scope, receive, send)
                return
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), self.key):
                await error_response(401, "incorrect API key provided", code="invalid_api_key")(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """Server-sent events; when the response ends for any reason (the client went away included), the job is
    marked cancelled so the worker stops reporting its row."""

    def __init__(self, content, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# Long by FastAPI's idiom: the routes are closures over the engine, each handler a few lines.
def create_app(engine: Engine, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; the engine's worker runs while the app does."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="llm-modules", description="OpenAI-compatible API for an LLM Modules checkpoint",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}; this server has /v1/models, /v1/chat/completions and "
                        "/v1/completions", 405: f"method {request.method} not allowed on {request.url.path}"}
        return error_response(e.status_code, message.get(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.error("internal error:\n%s", traceback.format_exc())
        return error_response(500, f"internal server error: {type(e).__name__}", type="server_error")

    async def parse(request: Request, model: type[_Body]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
        if not raw.strip():
            raise APIError(400, "the request body is empty; send a JSON object")
        try:
            body = model.model_validate_json(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"model: the model {body.model!r} does not exist; this server serves "
                                f"{model_name!r}", "model", "model_not_found")
        _unsupported(body)
        return body

    def new_job(body: _Sampling, ids: list[int], memory: Optional[list[int]], max_tokens: Optional[int],
                default: int, what: str) -> Job:
        n = engine.check_length(len(ids), len(memory) if memory is not None else None, max_tokens, default, what)
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
        return Job(ids=ids, memory=memory, max_tokens=n, stop=_stop_strings(body.stop), temperature=temperature,
                   top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                   loop=asyncio.get_running_loop(), queue=asyncio.Queue())

    async def events(job: Job, request: Request) -> Any:
        """The worker's events for `job`; stops (and cancels the job) once the client has disconnected (checked at
        most every DISCONNECT_CHECK_S; a streamed response is also stopped by Starlette's own disconnect listener,
        see _EventStream)."""
        checked = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(job.queue.get(), timeout=DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                item = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    job.cancelled = True
                    return
            if item is None:
                continue
            yield item
            if item[0] in ("end", "error"):
                return

    def usage(job: Job, completion_tokens: int) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": completion_tokens,
                "total_tokens": len(job.ids) + completion_tokens}

    async def respond(request: Request, body: _Sampling, job: Job, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": model_name}
        engine.submit(job)
        if not body.stream:
            pieces, reason, produced = [], None, 0
            try:
                async for item in events(job, request):
                    if item[0] == "delta":
                        pieces.append(item[1])
                    elif item[0] == "end":
                        reason, produced = item[1], item[2]
                    else:
                        raise APIError(500, item[1], type="server_error")
            finally:
                job.cancelled = True  # done, failed or abandoned: the worker stops reporting it
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return {**head, "choices": [choice], "usage": usage(job, produced)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: Optional[str] = None, reason: Optional[str] = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            return _sse({**head, "choices": [choice], **extra})

        async def body_iter():
            if chat:
                yield chunk(role=True)
            async for item in events(job, request):
                if item[0] == "delta":
                    yield chunk(item[1])
                elif item[0] == "end":
                    yield chunk(reason=item[1])
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": usage(job, item[2])})
                else:  # headers are sent already: the error goes in the stream, as OpenAI does
                    yield _sse({"error": {"message": item[1], "type": "server_error", "param": None, "code": None}})
            yield "data: [DONE]\n\n"

        return _EventStream(body_iter(), job)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "llm-modules"}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(404, f"model: the model {name!r} does not exist; this server serves {model_name!r}",
                           "model", "model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "llm-modules"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        ids, memory = engine.encode_chat(conversation(body))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = new_job(body, ids, memory, max_tokens, DEFAULT_CHAT_MAX_TOKENS, "messages")
        return await respond(request, body, job, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionRequest = await parse(request, CompletionRequest)
        ids, memory = engine.encode_text(completion_prompt(body))
        job = new_job(body, ids, memory, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        return await respond(request, body, job, chat=False)

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": engine.pending, "running": len(engine.running)}

    return _APIKey(app, api_key) if api_key else app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), or a UserError naming the address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app, log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug")
    return uvicorn.Server(config)


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 16,
          api_key: Optional[str] = None, large_only: bool = False, model_name: Optional[str] = None,
          log_level: str = "info") -> int:
    """Load the checkpoint and serve it until interrupted (the `serve` subcommand)."""
    from .loading import resolve_checkpoint

    path = Path(checkpoint)
    if not (large_only and path.is_file()):  # the large model alone may also come from a config YAML
        resolve_checkpoint(checkpoint)  # a missing checkpoint is an error before anything else happens
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size {max_batch_size}: must be >= 1")
    if model_name is not None and not model_name.strip():
        raise UserError("--model-name: must not be empty")
    sock = bind(host, port)  # before the model loads: a busy port is an error at once
    try:
        engine = load_engine(checkpoint, large_only=large_only, max_batch_size=max_batch_size)
        name = model_name or (path.stem if path.is_file() else path.resolve().name)
        app = create_app(engine, name, api_key)
        where = sock.getsockname()
        if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("serving on %s without --api-key: anyone who can reach it can use it", host)
        print(f"serving {name!r} ({'large model alone' if large_only else engine.model.config.coupling + ' coupling'},"
              f" context {engine.context} tokens, batches of up to {max_batch_size}) on "
              f"http://{where[0]}:{where[1]}/v1", flush=True)
        uvicorn_server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()
    return 0
