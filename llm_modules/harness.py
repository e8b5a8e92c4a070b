"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`pip install "lm-eval>=0.4.10"`).

Importing this module registers the model class "llm-modules" with lm-eval. The plain `lm_eval` command never
imports it (lm-eval has no plugin entry points for models), so run the harness through this module:

    python -m llm_modules.harness --model llm-modules --model_args checkpoint=runs/default \\
        --tasks hellaswag,arc_easy,gsm8k --batch_size 8

or call `evaluate_harness(...)` (or `lm_eval.simple_evaluate(model="llm-modules", ...)` after importing this module).

model_args: checkpoint=DIR (a save_pretrained directory or a training output directory; the small-alone baseline
is one too), large_only=True (the checkpoint's large model with its own LM head; DIR may then also be a config
YAML), max_length=N (context window; default: the smallest learned position table, else data.max_length),
max_gen_toks=N (default 256), device=cpu|cuda.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
except ImportError as e:  # an optional extra: say how to get it instead of a bare ImportError
    raise ImportError('llm_modules.harness needs lm-eval: pip install "llm-modules[harness]" '
                      '(or "lm-eval>=0.4.10")') from e

from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .errors import UserError
from .loading import load_for_eval
from .backbones import positions_from_mask

MODEL_NAME = "llm-modules"
log = logging.getLogger(__name__)
# Generation kwargs of a task that our decoding loop understands; others are ignored with a warning.
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def _register(cls):
    # `python -m llm_modules.harness` runs this file as __main__ too; only the importable copy registers, since a
    # second registration of the name under another class object is an error in lm-eval.
    return cls if __name__ == "__main__" else register_model(MODEL_NAME)(cls)


def _batches(keys: Sequence, batch_size: int):
    """Index lists of at most batch_size, longest first, so each batch pads little (results are put back by index)."""
    order = sorted(range(len(keys)), key=lambda i: keys[i], reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@_register
class LLMModulesLM(TemplateLM):
    """lm-eval model "llm-modules": an LLMModules checkpoint (or its large model alone) answering the harness's
    loglikelihood, loglikelihood_rolling and generate_until requests in length-sorted, padded batches."""

    def __init__(self, checkpoint: Optional[str] = None, large_only: bool = False, batch_size: Union[int, str] = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, device: Optional[str] = None,
                 max_batch_size: Optional[int] = None, loaded: Optional[tuple] = None, **unknown):
        """`loaded`: what load_for_eval returned, for a caller that already holds the model (Python use only)."""
        super().__init__()  # max_batch_size: passed by lm-eval for batch_size=auto, which is not supported
        if unknown:
            raise UserError(f"model_args: unknown {', '.join(sorted(unknown))}; llm-modules takes checkpoint, "
                            "large_only, max_length, max_gen_toks, device (and batch_size)")
        if checkpoint is None and loaded is None:
            raise UserError("model_args: give checkpoint=DIR (a save_pretrained or training output directory)")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UserError(f"batch_size={batch_size!r}: give a positive integer (automatic sizing is not supported)")
        self.model, self.tokenizer, self.cfg, limit = loaded or load_for_eval(checkpoint, bool(large_only))
        if self.tokenizer is None:
            raise UserError(f"{checkpoint}: the model has no tokenizer, so it cannot read benchmark text; set "
                            "`tokenizer` in its config")
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI asks for cuda by default
        self._device = torch.device(device)
        self.model.to(self._device).eval()
        self.large_only, self.batch_size = bool(large_only), int(batch_size)
        self.max_length, self.max_gen_toks = int(max_length or limit), int(max_gen_toks)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    # ---- tokenization: as lm-eval's HF model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context (and each rolling document) is conditioned on: BOS if the tokenizer has one, else EOS.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's default, unless the text already starts with its BOS
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """`--apply_chat_template`: the prompt format the model was trained with (data.format, data.system_prompt);
        the large model alone uses its tokenizer's chat template."""
        tok = self.tokenizer
        if self.large_only:
            return tok.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           continue_final_message=not add_generation_prompt)
        from .prompts import render_prompt, render_training, with_system_prompt

        data = self.cfg.data
        messages = with_system_prompt(chat_history, data.system_prompt)
        if add_generation_prompt:
            return render_prompt(messages, data.format, tok)
        text = "".join(t for t, _ in render_training(messages, data.format, tok))
        return text.rstrip().removesuffix(tok.eos_token)  # a prefilled answer goes on: no end-of-turn

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        return f"llm-modules:{self.cfg.data.format}" if chat_template else None

    # ---- scoring -------------------------------------------------------------------------------------------
    def _pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (ids, mask): rows aligned at the right end so their last tokens line up."""
        from .vocab import pad

        ids, mask = pad(rows, self.pad_id, left=True)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def _last_logprobs(self, rows: list[list[int]], keep: int) -> torch.Tensor:
        """Log-probs (B, keep, V) at the last `keep` positions of a left-padded batch: with a 150k vocabulary the
        head and the softmax over the context positions would cost as much as a small model."""
        ids, mask = self._pad(rows)
        extra = {"position_ids": positions_from_mask(mask)} if self.large_only else {}  # ours derives them itself
        logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **extra).logits
        return F.log_softmax(logits.float(), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation exactly)."""
        out: list = [None] * len(requests)
        if cut := sum(len(c) + len(t) > self.max_length + 1 for _, c, t in requests):
            log.warning("%d requests exceed the %d-token window and lose context from the left", cut, self.max_length)
        for idx in tqdm(_batches([len(c) + len(t) for _, c, t in requests], self.batch_size),
                        disable=disable_tqdm, desc="loglikelihood batches"):
            rows = []
            for i in idx:
                _, ctx, cont = requests[i]
                if not 0 < len(cont) <= self.max_length:
                    raise UserError(f"cannot score a continuation of {len(cont)} tokens in a {self.max_length}-token "
                                    "window; check the task's choices or raise max_length in model_args")
                rows.append((ctx + cont)[-(self.max_length + 1) :][:-1])  # too long: drop context from the left
            keep = max(len(requests[i][2]) for i in idx)
            for i, lp in zip(idx, self._last_logprobs(rows, keep)):
                cont = torch.tensor(requests[i][2])
                lp = lp[keep - len(cont) :]  # the positions that predict the continuation
                out[i] = (float(lp.gather(1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document, in disjoint max_length windows that each keep a full context."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            toks = self.tok_encode(req.args[0])
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=toks, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, rows: list[list[int]], max_new: int, until: list[str], sampling: dict) -> list[list[int]]:
        """New token ids per row: one left-padded batch through the cached decoder, stopping at `until`."""
        ids, mask = self._pad(rows)
        if self.large_only:
            new = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, stop_strings=until,
                                      tokenizer=self.tokenizer, pad_token_id=self.pad_id, **sampling)[:, ids.shape[1]:]
        else:
            new = self.model.generate(ids, mask, max_new_tokens=max_new, stop=until, **sampling)
        return new.tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or the task's sampling) continuations, cut at the first of the request's `until` strings."""
        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}  # one decoding setting per batch
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list = [None] * len(requests)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise UserError(f"max_gen_toks={max_new} leaves no room for the prompt in the {self.max_length}-token "
                                "window; lower it or raise max_length in model_args")
            sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
            if kwargs:
                log.warning("llm-modules ignores these generation settings: %s", sorted(kwargs))
            if not sampling.get("do_sample"):
                sampling = {"do_sample": False}  # greedy: temperature & co. do not apply
            room = self.max_length - max_new  # prompts are left-truncated so that prompt + answer fit the window
            contexts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in members]
            if cut := sum(len(c) > room for c in contexts):
                log.warning("%d prompts exceed %d tokens (max_length - max_gen_toks) and lose their start", cut, room)
            contexts = [c[-room:] for c in contexts]
            for idx in tqdm(_batches([len(c) for c in contexts], self.batch_size), disable=disable_tqdm,
                            desc="generate_until batches"):
                for j, new in zip(idx, self._generate([contexts[j] for j in idx], max_new, until, sampling)):
                    text = postprocess_generated_text(self.tokenizer.decode(new, skip_special_tokens=True), until, None)
                    out[members[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        return out


def evaluate_harness(checkpoint: Union[str, Path], tasks: Union[str, Sequence[str]], *, limit: Optional[float] = None,
                     batch_size: int = 8, include_path: Union[str, Path, None] = None,
                     num_fewshot: Optional[int] = None, model_args: Optional[dict] = None, **kwargs) -> dict:
    """Run lm-eval tasks (names or a comma-separated string) on a checkpoint; returns lm-eval's results dict
    (`out["results"][task]["acc,none"]` ...). include_path adds a folder of task YAMLs; model_args adds
    LLMModulesLM arguments (e.g. {"large_only": True}); other keywords go to `lm_eval.simple_evaluate`
    (e.g. log_samples=True, apply_chat_template=True, bootstrap_iters=0, task_manager=...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [t for t in tasks.split(",") if t] if isinstance(tasks, str) else list(tasks)
    kwargs.setdefault("log_samples", False)
    if "task_manager" not in kwargs:
        kwargs["task_manager"] = TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(model=MODEL_NAME, model_args={"checkpoint": str(checkpoint), **(model_args or {})},
                                   tasks=names, num_fewshot=num_fewshot, batch_size=batch_size, limit=limit, **kwargs)


def main(argv: Optional[list[str]] = None) -> int:
    """lm-eval's own command line (`lm_eval ...` arguments) with the "llm-modules" model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from llm_modules.harness import main as _main  # the registered copy of this module

    sys.exit(_main())
