"""No lost work, no unsafe loads, clear errors (issue 10).

- SIGKILL at random moments (some inside a checkpoint write) + resume == one uninterrupted run, bit for bit;
- a truncated / garbage / invalid file in the latest checkpoint is reported and skipped for the one before;
- only safe formats are read (source scan) and written (checkpoint directories);
- a non-finite loss, an out-of-memory error and a full disk stop with one clear message (exit 2), the last good
  checkpoint untouched and resumable;
- every case of tests/error_cases.py: exit code, message, no traceback (the same cases make docs/errors.md).
"""
from __future__ import annotations

import ast
import errno
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from error_cases import CASES, REPO, disk_full_at, fill, run_case
from safetensors.torch import load_file

from llm_modules import LLMModules
from llm_modules import checkpoint as ckpt
from llm_modules import train as train_mod
from llm_modules.__main__ import main
from llm_modules.experiment import launch

TINY = "configs/tiny-random.yaml"
SAFE_SUFFIXES = {".safetensors", ".json", ".yaml"}


# ---- helpers ----------------------------------------------------------------------------------------------------
def write_short_data(path: Path, n: int = 24) -> Path:
    """Short arithmetic chats: a step of the tiny-random model takes milliseconds, not a second."""
    pairs = random.Random(0).sample([(a, b) for a in range(1, 41) for b in range(1, 41)], n)  # no duplicates
    with open(path, "w", encoding="utf-8") as f:
        for a, b in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                             {"role": "assistant", "content": str(a + b)}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> Path:
    return write_short_data(tmp_path_factory.mktemp("data") / "short.jsonl")


def train_argv(out: Path, data: Path, *extra) -> list[str]:
    # Dropout on: an exact resume must restore the RNG too. One thread: tiny matrices on a busy 2-core machine
    # run ~10x faster than with two (the runs compared with each other all use the same count).
    return ["train", "--config", TINY, "--output-dir", str(out), "--data.path", str(data), "--train.batch_size", "2",
            "--train.eval_every", "2", "--bridge.dropout", "0.1", "--train.num_threads", "1", *map(str, extra)]


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.num_threads sets torch's thread count for the process: give the other test modules theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = weights(a), weights(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{a} and {b} differ in {different[:5]}"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every published file under `root` (relative path -> bytes); temporary (.hidden) ones are not included."""
    files = (p.relative_to(root) for p in sorted(root.rglob("*")) if p.is_file())
    return {str(r): (root / r).read_bytes() for r in files if not any(part.startswith(".") for part in r.parts)}


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_each_step_once(out: Path, last: int) -> None:
    steps = [r["step"] for r in metric_rows(out)]
    assert steps == list(range(last + 1)), steps


def assert_only_safe_files(out: Path) -> None:
    dirs = [d for d in (out / "checkpoints").iterdir()] + [out / "best"]
    assert not [d.name for d in dirs if d.name.startswith(".")], "temporary directories left behind"
    unsafe = [str(p) for d in dirs if d.exists() for p in d.rglob("*") if p.suffix not in SAFE_SUFFIXES]
    assert not unsafe, unsafe


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


# ---- 1. SIGKILL at random moments, resume, compare with an uninterrupted run ------------------------------------
def _checkpoint_steps(root: Path) -> tuple[int, bool]:
    """(newest published step, whether a checkpoint is being written right now)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0, False
    steps = [int(n[5:]) for n in names if n.startswith("step-") and n[5:].isdigit()]
    return max(steps, default=0), any(n.startswith(".step-") for n in names)


def _last_metric_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError, KeyError):
        return -1


class SubprocessCLI:
    """`python -m llm_modules ARGV`, with the Process interface used below (exitcode, kill, join)."""

    def __init__(self, argv: list[str], log: Path):
        import subprocess

        with open(log, "w") as f:
            self.popen = subprocess.Popen([sys.executable, "-m", "llm_modules", *argv], cwd=REPO, stdout=f,
                                          stderr=subprocess.STDOUT)

    @property
    def exitcode(self):
        return self.popen.poll()  # -9 after SIGKILL, as multiprocessing reports it

    def kill(self) -> None:
        self.popen.kill()

    def join(self, timeout=None) -> None:
        import subprocess

        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass


def kill_resume_and_compare(tmp_path: Path, *, kills: int, steps: int, seed: int, timeout: float = 240,
                            launch=launch) -> list[str]:
    data = write_short_data(tmp_path / "short.jsonl", n=int(steps * 1.25) + 8)  # 2 epochs of >= steps / 2 batches
    out, root, rng, landed, procs = tmp_path / "run", tmp_path / "run" / "checkpoints", random.Random(seed), [], []

    def start_run(out: Path, log: Path):
        procs.append(launch(train_argv(out, data, "--max-steps", steps, "--save-every", 1), log))
        return procs[-1]

    deadline = time.monotonic() + timeout
    try:
        ref = start_run(tmp_path / "ref", tmp_path / "ref.log")  # the uninterrupted reference, alongside
        for i in range(kills):
            start, _ = _checkpoint_steps(root)
            proc = start_run(out, tmp_path / f"run{i}.log")
            # Training has started in this process once it publishes a checkpoint past the one it resumed from.
            while _checkpoint_steps(root)[0] <= start:
                assert proc.exitcode is None, (tmp_path / f"run{i}.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no training progress"
                time.sleep(0.005)
            # Where to aim: at random, inside a checkpoint write (a temporary directory exists), or between a
            # step's metrics line and its checkpoint (the line must be dropped on resume).
            aim = ("random", "checkpoint write", "metrics ahead")[i % 3]
            t_end = time.monotonic() + 3
            if aim == "random":
                time.sleep(rng.uniform(0.0, 0.4))
            while aim != "random" and time.monotonic() < t_end and proc.exitcode is None:
                if aim == "checkpoint write" and _checkpoint_steps(root)[1]:
                    break
                if aim == "metrics ahead" and _last_metric_step(out) > _checkpoint_steps(root)[0]:
                    break
                time.sleep(0.001)
            writing = _checkpoint_steps(root)[1]
            ahead = _last_metric_step(out) > _checkpoint_steps(root)[0]
            proc.kill()  # SIGKILL
            proc.join()
            assert proc.exitcode == -signal.SIGKILL, f"run {i} ended by itself ({proc.exitcode}): make it longer"
            newest, _ = _checkpoint_steps(root)
            landed.append(f"kill {i} ({aim}): after checkpoint {newest}" + (", during a checkpoint write" * writing)
                          + (", metrics ahead of the checkpoint" * ahead))
            # Publishing is atomic: the newest checkpoint is complete, nothing to fall back past.
            problems: list[str] = []
            assert ckpt.latest_training_checkpoint(root, log=problems.append) == step_dir(out, newest)
            assert not problems, problems
        final = start_run(out, tmp_path / "final.log")
        for proc, log in ((final, "final.log"), (ref, "ref.log")):
            proc.join(timeout=max(30.0, deadline - time.monotonic()))
            assert proc.exitcode == 0, (tmp_path / log).read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.exitcode is None:
                proc.kill()
                proc.join()
    a, b = tmp_path / "ref", out
    for name in (ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME):
        assert_same_tensors(step_dir(a, steps) / name, step_dir(b, steps) / name)
    assert_same_tensors(a / "best" / ckpt.WEIGHTS_NAME, b / "best" / ckpt.WEIGHTS_NAME)
    assert_each_step_once(b, steps)
    assert metric_rows(a) == metric_rows(b)  # same losses, bit for bit, and each step once
    assert_only_safe_files(b)
    return landed


def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    landed = kill_resume_and_compare(tmp_path, kills=6, steps=40, seed=10)
    print("\n".join(landed))


@pytest.mark.slow
def test_sigkill_many_times_then_resume_is_exact(tmp_path):
    landed = kill_resume_and_compare(tmp_path, kills=24, steps=120, seed=11, timeout=600)
    print("\n".join(landed))


@pytest.mark.slow
def test_sigkill_python_m_llm_modules_then_resume_is_exact(tmp_path):
    """The same with each run a new interpreter started as `python -m llm_modules train ...` (imports each time)."""
    landed = kill_resume_and_compare(tmp_path, kills=3, steps=30, seed=12, timeout=600, launch=SubprocessCLI)
    print("\n".join(landed))


# ---- a reference run shared by the in-process tests below ------------------------------------------------------
REF_STEPS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory, short_data) -> Path:
    """3 steps, a checkpoint after each (the latest two kept): what the interrupted runs below must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    return out


def test_killed_before_the_first_checkpoint_starts_over_without_duplicate_metrics(tmp_path, short_data, reference,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "run"
    argv = train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)

    def killed(run, best):
        raise KeyboardInterrupt  # the process dies after logging step 1, before its checkpoint exists

    monkeypatch.setattr(train_mod, "save_checkpoint", killed)
    assert main(argv) == 130
    assert [r["step"] for r in metric_rows(out)] == [0, 1]
    monkeypatch.undo()
    assert main(argv) == 0
    assert_each_step_once(out, REF_STEPS)
    assert metric_rows(out) == metric_rows(reference)
    assert_same_tensors(*(step_dir(d, REF_STEPS) / ckpt.WEIGHTS_NAME for d in (out, reference)))


def test_killed_right_after_publishing_the_last_step_keeps_best_current(tmp_path, short_data, reference, monkeypatch):
    out = tmp_path / "run"
    argv = train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)
    real = ckpt.prune_checkpoints

    def prune(root, keep, **kwargs):
        if step_dir(out, REF_STEPS).exists():
            raise KeyboardInterrupt  # killed between publishing the last checkpoint and anything after it
        real(root, keep, **kwargs)

    monkeypatch.setattr(ckpt, "prune_checkpoints", prune)
    assert main(argv) == 130
    monkeypatch.undo()
    assert main(argv) == 0  # nothing left to train
    best_step = json.loads((step_dir(reference, REF_STEPS) / ckpt.STATE_NAME).read_text())["progress"]["best_step"]
    assert best_step == REF_STEPS, "the test needs the last step to be the best one"
    # best/ (what `generate --checkpoint OUT` loads) holds the last, best-validated step, not an older one.
    assert_same_tensors(out / "best" / ckpt.WEIGHTS_NAME, step_dir(reference, REF_STEPS) / ckpt.WEIGHTS_NAME)


def test_killed_while_writing_best_leaves_no_temporary_file(tmp_path, short_data, reference):
    """A kill inside best/'s write (before step 3 is published) leaves a temporary file there: the redone step
    writes best/ again and removes it."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(step_dir(out, REF_STEPS))
    (out / "best" / ".model.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 100)
    assert main(train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)) == 0
    assert_only_safe_files(out)
    assert_same_tensors(out / "best" / ckpt.WEIGHTS_NAME, reference / "best" / ckpt.WEIGHTS_NAME)


# ---- 2. a damaged latest checkpoint is reported and skipped -------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "model truncated": (ckpt.WEIGHTS_NAME, _truncate),
    "optimizer garbage": (ckpt.OPTIMIZER_NAME, lambda p: p.write_bytes(random.Random(0).randbytes(4096))),
    "training_state.json cut short": (ckpt.STATE_NAME, _truncate),
    "training_state.json without the optimizer groups": (
        ckpt.STATE_NAME, lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                                             if k != "optimizer_param_groups"}))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, short_data, reference, capsys, damage):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    name, spoil = DAMAGE[damage]
    spoil(step_dir(out, REF_STEPS) / name)
    assert main(train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)) == 0
    said = capsys.readouterr().out
    assert f"checkpoint {step_dir(out, REF_STEPS)} is unreadable" in said and "falling back" in said, said
    assert f"resumed from {step_dir(out, REF_STEPS - 1)}" in said, said
    # Step 3 was trained again from step 2's state: the same weights as the first time.
    for f in (ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME):
        assert_same_tensors(step_dir(out, REF_STEPS) / f, step_dir(reference, REF_STEPS) / f)
    assert metric_rows(out) == metric_rows(reference)
    assert_only_safe_files(out)


# ---- 3. safe formats only -----------------------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {"eval", "exec"}
UNSAFE_ATTRS = {"read_pickle", "unsafe_load", "full_load", "load_pickle"}


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    """Deserialization that can run code: pickle & co., torch.load without weights_only=True, eval/exec,
    yaml.load with a non-safe loader, allow_pickle=True, trust_remote_code=True."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            f, kw = node.func, {k.arg: k.value for k in node.keywords}
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if isinstance(f, ast.Name) and name in UNSAFE_CALLS:
                found.append(f"{where}: {name}()")
            if name in UNSAFE_ATTRS:
                found.append(f"{where}: {owner}.{name}()")
            if name == "load" and owner == "torch":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where}: torch.load without weights_only=True")
            if name == "load" and owner == "yaml":
                loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
                if "Safe" not in loader:
                    found.append(f"{where}: yaml.load without SafeLoader")
            for key in ("allow_pickle", "trust_remote_code"):
                if key in kw and not (isinstance(kw[key], ast.Constant) and kw[key].value is False):
                    found.append(f"{where}: {key}={ast.unparse(kw[key])}")
    return found


def test_the_scanner_finds_unsafe_loads():
    bad = ("import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\n"
           "torch.load(f)\ntorch.load(f, weights_only=False)\nyaml.load(s, Loader=yaml.Loader)\n"
           "np.load(f, allow_pickle=True)\neval(text)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
           "pd.read_pickle(f)\n")
    assert [int(u.split(":")[1]) for u in unsafe_uses(bad)] == [1, 2, 4, 5, 6, 7, 8, 9, 10], unsafe_uses(bad)
    ok = ("import torch, yaml, ast\ntorch.load(f, weights_only=True)\nyaml.safe_load(s)\n"
          "yaml.load(s, Loader=yaml.SafeLoader)\nast.literal_eval(s)\nmodel.eval()\nre.compile('x')\n")
    assert unsafe_uses(ok) == []


def test_sources_read_only_safe_formats():
    files = sorted((REPO / "llm_modules").rglob("*.py"))
    assert len(files) > 10
    found = [u for p in files for u in unsafe_uses(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, found


def test_checkpoints_hold_only_safe_formats(reference):
    assert_only_safe_files(reference)
    names = {p.name for p in step_dir(reference, REF_STEPS).iterdir()}
    assert names == {ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME, ckpt.RNG_NAME, ckpt.STATE_NAME, ckpt.CONFIG_NAME}


# ---- 4. non-finite loss -------------------------------------------------------------------------------------------
def inject_nan(monkeypatch, at_call: int, out: Path, snap: dict) -> None:
    """The `at_call`-th training loss is NaN (its gradients too); the checkpoints on disk are recorded then."""
    real, calls = train_mod._loss_sum, [0]

    def loss_sum(run, split, indices, pad, *args, **kwargs):
        loss = real(run, split, indices, pad, *args, **kwargs)
        if split == "train":
            calls[0] += 1
            if calls[0] == at_call:
                snap.update(snapshot(out / "checkpoints"))
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_mod, "_loss_sum", loss_sum)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, short_data, monkeypatch,
                                                                           capsys):
    out, before = tmp_path / "run", {}
    inject_nan(monkeypatch, 3, out, before)
    assert main(train_argv(out, short_data, "--max-steps", 5, "--save-every", 2)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: non-finite training loss (nan) at step 3" in err and "--skip-nonfinite" in err, err
    assert sorted(before) and snapshot(out / "checkpoints") == before  # byte-identical, nothing added
    monkeypatch.undo()
    problems: list[str] = []
    assert ckpt.latest_training_checkpoint(out / "checkpoints", log=problems.append) == step_dir(out, 2)
    assert not problems
    LLMModules.from_pretrained(step_dir(out, 2))  # loadable


def test_skip_nonfinite_continues_past_one_bad_step(tmp_path, short_data, monkeypatch):
    out = tmp_path / "run"
    inject_nan(monkeypatch, 3, out, {})
    assert main(train_argv(out, short_data, "--max-steps", 5, "--save-every", 2, "--skip-nonfinite", 1)) == 0
    state = json.loads((step_dir(out, 5) / ckpt.STATE_NAME).read_text())
    assert state["progress"]["step"] == 5 and state["progress"]["nonfinite_skipped"] == 1
    assert_each_step_once(out, 5)
    assert all(torch.isfinite(t).all() for t in weights(step_dir(out, 5) / ckpt.WEIGHTS_NAME).values())


# ---- 5. out of memory ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_names_batch_and_length_and_the_fix(tmp_path, short_data, monkeypatch, capsys, where):
    from accelerate import Accelerator

    real, shapes = LLMModules.forward, []

    def forward(self, input_ids, *a, **k):
        if self.training:
            shapes.append(tuple(input_ids.shape))
            if where == "forward":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, input_ids, *a, **k)

    def backward(self, loss, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LLMModules, "forward", forward)
    if where == "backward":
        monkeypatch.setattr(Accelerator, "backward", backward)
    argv = train_argv(tmp_path / "run", short_data, "--max-steps", 2, "--train.batch_size", 3)
    assert main(argv) == 2
    err = capsys.readouterr().err
    B, T = shapes[0]
    assert "Traceback" not in err
    assert f"error: out of memory on a batch of {B} sequences of {T} tokens" in err, err
    assert all(fix in err for fix in ("train.batch_size", "data.max_length", "small.gradient_checkpointing")), err


# ---- 6. full disk ------------------------------------------------------------------------------------------------
def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("where", ["writing a file", "publishing the directory"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, short_data, reference, monkeypatch, capsys,
                                                               where):
    out, before = tmp_path / "run", {}
    argv = train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)
    if where == "writing a file":
        failing = disk_full_at("step-00000002")

        def save_file(tensors, filename, metadata=None):
            if "step-00000002" in str(filename) and not before:
                before.update(snapshot(out / "checkpoints"))
            return failing(tensors, filename, metadata=metadata)

        monkeypatch.setattr(ckpt, "save_file", save_file)
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst).name == "step-00000002":
                before.update(snapshot(out / "checkpoints"))
                raise _enospc(dst)
            return real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
    code = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert (f"could not save the checkpoint of step 2 in {out / 'checkpoints'} (No space left on device); "
            "step-00000001 is intact: free some space and run the same command again") in err, err
    # The previous checkpoint is byte-identical, nothing else is there (no temporary directory either).
    assert snapshot(out / "checkpoints") == before and {p.split("/")[0] for p in before} == {"step-00000001"}
    assert os.listdir(out / "checkpoints") == ["step-00000001"]
    # Space freed, the same command resumes from step 1 and ends where an uninterrupted run does.
    assert main(argv) == 0
    assert f"resumed from {step_dir(out, 1)}" in capsys.readouterr().out
    assert_same_tensors(*(step_dir(d, REF_STEPS) / ckpt.WEIGHTS_NAME for d in (out, reference)))
    assert metric_rows(out) == metric_rows(reference)


def test_full_disk_while_logging_metrics_is_a_clear_error(tmp_path, short_data, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = train_argv(out, short_data, "--max-steps", REF_STEPS, "--save-every", 1)

    def full_open(path, mode="r", *a, **k):
        if Path(path).name == "metrics.jsonl" and "a" in mode and step_dir(out, 1).exists():
            f = open(path, mode, *a, **k)
            f.write('{"step": 2, "epoch": 0, "train_lo')  # part of the line made it to the disk
            f.close()
            raise _enospc(path)
        return open(path, mode, *a, **k)

    monkeypatch.setattr(train_mod, "open", full_open, raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot append to" in err and "No space left on device" in err, err
    monkeypatch.undo()
    assert main(argv) == 0  # the cut line is dropped on resume
    assert metric_rows(out) == metric_rows(reference)


# ---- 7. every bad-input case: exit code, message, no traceback ---------------------------------------------------
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_error_case(tmp_path, case):
    code, out, err = run_case(case, tmp_path)
    assert "Traceback" not in err, err[-3000:]
    assert code == case.code, (code, err[-3000:])
    assert fill(case.message, tmp_path) in err, err[-3000:]
    assert "error: " in err, err[-3000:]
