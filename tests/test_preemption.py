"""Preemption-safe training (issue 22).

- SIGTERM / SIGINT at a random step (seeded) of a run with periodic saves off: the run finishes that step, saves a
  checkpoint there, says where, exits with 143 / 130; the same command resumes and ends bit for bit where a run that
  was never interrupted ends. In one process (a forked `llm-modules train`) and in 2 processes under
  `accelerate launch` (the signal reaching one rank only: both must stop after the same step);
- a second signal while the checkpoint is written is ignored: the checkpoint is complete, the run resumes exactly,
  and the handlers of the caller are back afterwards;
- the feature-cache build stops the same way, leaves only complete shards, and resumes without redoing them;
- resuming with another model / data / optimization config names the changed fields (old -> new) and the way out;
  the settings that may change on resume do not stop it; --no-resume really starts over.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_reliability import assert_same_tensors, metric_rows, step_dir, train_argv, write_short_data

from llm_modules import checkpoint as ckpt
from llm_modules import features
from llm_modules import train as train_mod
from llm_modules.__main__ import main
from llm_modules.experiment import launch

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-random.yaml"
STEPS = 40  # per run; periodic saves off, so the only checkpoints are the interruption's and the last step's
NO_PERIODIC_SAVES = ("--save-every", 100_000)


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.num_threads sets torch's thread count for the process: give the other test modules theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_short_data(tmp_path_factory.mktemp("data") / "short.jsonl", n=int(STEPS * 1.25) + 8)


def argv(out: Path, data: Path, *extra) -> list[str]:
    return train_argv(out, data, "--max-steps", STEPS, *NO_PERIODIC_SAVES, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    """The reference: the same command, never interrupted (a forked process, as the interrupted runs are)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = launch(argv(out, data), out.parent / "log")
    proc.join(240)
    assert proc.exitcode == 0, (out.parent / "log").read_text()[-3000:]
    return out


def last_metric_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else -1
    except (OSError, ValueError, KeyError, IndexError):
        return -1


def checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(d.name[5:]) for d in root.glob("step-*")) if root.is_dir() else []


def assert_same_end(a: Path, b: Path) -> None:
    """Bit for bit the same final trainable weights (torch.equal on every tensor), optimizer state and logged
    losses, and best/ the same."""
    for name in (ckpt.WEIGHTS_NAME, ckpt.OPTIMIZER_NAME):
        assert_same_tensors(step_dir(a, STEPS) / name, step_dir(b, STEPS) / name)
    assert_same_tensors(a / "best" / ckpt.WEIGHTS_NAME, b / "best" / ckpt.WEIGHTS_NAME)
    assert metric_rows(a) == metric_rows(b)


# ---- 1. one process: a signal at a random step ------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_random_step_saves_there_and_resumes_exactly(tmp_path, data, uninterrupted, sig):
    k = random.Random(1000 + sig).randint(2, STEPS // 3)  # seeded: the same step aimed at every time
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = launch(argv(out, data), log)
    deadline = time.monotonic() + 180
    try:
        while last_metric_step(out) < k:
            assert proc.exitcode is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no training progress"
            time.sleep(0.002)
        os.kill(proc.pid, sig)
        proc.join(120)
    finally:
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    said = log.read_text()
    assert proc.exitcode == 128 + sig, (proc.exitcode, said[-3000:])
    stopped = last_metric_step(out)
    assert k <= stopped < STEPS, f"the signal landed after the last step ({stopped}): make the run longer"
    # Exactly one checkpoint, at the step the run had reached: the one the signal made (periodic saves are off).
    assert checkpoint_steps(out) == [stopped]
    state = json.loads((step_dir(out, stopped) / ckpt.STATE_NAME).read_text())
    assert state["progress"]["step"] == stopped
    problems: list[str] = []
    assert ckpt.latest_training_checkpoint(out / "checkpoints", log=problems.append) == step_dir(out, stopped)
    assert not problems and not list((out / "checkpoints").glob(".*"))
    name = signal.Signals(sig).name
    assert f"received {name}: finishing the optimizer step in progress" in said, said[-3000:]
    assert (f"stopped by {name} after step {stopped} of {STEPS}: checkpoint saved in {step_dir(out, stopped)}"
            in said and "Run the same command again" in said), said[-3000:]
    # The same command resumes and ends where the uninterrupted run ends.
    proc = launch(argv(out, data), tmp_path / "resume.log")
    proc.join(240)
    assert proc.exitcode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert f"resumed from {step_dir(out, stopped)}" in (tmp_path / "resume.log").read_text()
    assert_same_end(out, uninterrupted)


# ---- 2. a second signal during the save ---------------------------------------------------------------------------
def test_a_second_signal_while_saving_is_ignored_and_the_checkpoint_is_complete(tmp_path, data, uninterrupted,
                                                                                 monkeypatch, capfd):
    """In-process, so the signals land exactly where aimed: SIGTERM after step 5's metrics line, SIGINT and SIGTERM
    again in the middle of the checkpoint write (after the weights, before the optimizer state)."""
    out, k = tmp_path / "run", 5
    real_log, real_save = train_mod.log_metrics, ckpt.save_tensors
    sent: list[str] = []

    def log_metrics(run, record):
        real_log(run, record)
        if record["step"] == k:
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append("SIGTERM")

    def save_tensors(path, tensors, metadata=None):
        if Path(path).name == ckpt.OPTIMIZER_NAME:
            for s in (signal.SIGINT, signal.SIGTERM):
                os.kill(os.getpid(), s)
                sent.append(signal.Signals(s).name)
        return real_save(path, tensors, metadata)

    monkeypatch.setattr(train_mod, "log_metrics", log_metrics)
    monkeypatch.setattr(ckpt, "save_tensors", save_tensors)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    assert main(argv(out, data)) == 143  # the first signal decides the status
    assert sent == ["SIGTERM", "SIGINT", "SIGTERM"]
    assert {s: signal.getsignal(s) for s in before} == before  # the caller's handlers are back
    said = capfd.readouterr()
    assert "received SIGINT while stopping: ignored until the checkpoint is written" in said.err, said.err[-3000:]
    assert checkpoint_steps(out) == [k] and not list((out / "checkpoints").glob(".*"))
    problems: list[str] = []
    assert ckpt.latest_training_checkpoint(out / "checkpoints", log=problems.append) == step_dir(out, k)
    assert not problems
    monkeypatch.undo()
    assert main(argv(out, data)) == 0
    assert_same_end(out, uninterrupted)


def test_library_callers_keep_their_handlers_and_an_interruption_is_an_exception(tmp_path, data, monkeypatch):
    """train() outside the CLI: the handlers exist only while the loop runs; the interruption is raised as
    Interrupted (a KeyboardInterrupt) carrying the exit status and the message."""
    from llm_modules.config import load_config
    from llm_modules.interrupt import Interrupted

    cfg = load_config(TINY, [("data.path", str(data)), ("train.batch_size", 2), ("train.num_threads", 1)],
                      output_dir=str(tmp_path / "run"), max_steps=STEPS, save_every=100_000)
    seen = []
    real_step = train_mod.train_step

    def train_step(run, *a, **k):
        seen.append(signal.getsignal(signal.SIGTERM))
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(run, *a, **k)

    monkeypatch.setattr(train_mod, "train_step", train_step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        train_mod.train(cfg, resume=False, log=lambda *a: None)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.exit_code == 130
    assert "after step 3 of" in e.value.message and str(step_dir(tmp_path / "run", 3)) in e.value.message
    assert seen[0] is not before and signal.getsignal(signal.SIGTERM) is before


# ---- 3. two processes under accelerate launch ---------------------------------------------------------------------
TWO_STEPS = 30


def _launch_two(record_dir: Path, out: Path, data: Path) -> subprocess.Popen:
    from test_distributed import CPU_2PROC, _env

    record_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / CPU_2PROC),
           str(REPO / "tests" / "test_distributed.py"), "--worker", str(record_dir),
           *train_argv(out, data, "--max-steps", TWO_STEPS, *NO_PERIODIC_SAVES)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, record_dir: Path, timeout: float = 150) -> tuple[str, dict]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate()
        for f in record_dir.glob("pid-rank*"):  # torchrun's workers run in sessions of their own
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        pytest.fail(f"2-process run did not finish in {timeout} s (ranks in different collectives?)\n{output[-4000:]}")
    ranks = {}
    for f in record_dir.glob("rank*.json"):
        r = json.loads(f.read_text())
        ranks[r["env_rank"]] = r
    return output, ranks


def test_two_processes_stop_after_the_same_step_save_and_resume_exactly(tmp_path):
    """SIGTERM reaches rank 1 only (torchrun forwards a signal it gets to every rank; this is the harder case):
    both ranks agree to stop after the same step, the checkpoint holds every rank's state, both exit with 143, and
    the same launch resumes to the weights of a 2-process run never interrupted (bit for bit, dropout on)."""
    k = random.Random(2000).randint(3, TWO_STEPS // 3)
    data = write_short_data(tmp_path / "short.jsonl", n=int(TWO_STEPS * 2.5) + 8)  # 2 epochs of global batch 4
    t0 = time.perf_counter()
    ref = _launch_two(tmp_path / "ref-records", tmp_path / "ref", data)  # alongside: the machine has 2 cores
    out, rec = tmp_path / "run", tmp_path / "records"
    proc = _launch_two(rec, out, data)
    deadline = time.monotonic() + 150
    while last_metric_step(out) < k:
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.002)
    os.kill(int((rec / "pid-rank1").read_text()), signal.SIGTERM)
    output, ranks = _finish(proc, rec)
    assert sorted(ranks) == [0, 1], output[-4000:]
    assert all(r["exit_code"] == 143 and r["world"] == 2 for r in ranks.values()), (ranks, output[-4000:])
    stopped = last_metric_step(out)
    assert k <= stopped < TWO_STEPS, f"the signal landed after the last step ({stopped}): make the run longer"
    assert checkpoint_steps(out) == [stopped]
    rng = ckpt.load_tensors(step_dir(out, stopped) / ckpt.RNG_NAME)[0]
    assert {"torch.rank0", "torch.rank1"} <= set(rng)  # every rank's state
    assert f"stopped by SIGTERM after step {stopped} of {TWO_STEPS}" in output, output[-4000:]
    ref_output, ref_ranks = _finish(ref, tmp_path / "ref-records")
    assert [r["exit_code"] for r in ref_ranks.values()] == [0, 0], ref_output[-4000:]
    output, ranks = _finish(_launch_two(tmp_path / "resume-records", out, data), tmp_path / "resume-records")
    assert [r["exit_code"] for r in ranks.values()] == [0, 0], output[-4000:]
    assert f"resumed from {step_dir(out, stopped)}" in output
    a = ckpt.load_tensors(step_dir(out, TWO_STEPS) / ckpt.WEIGHTS_NAME)[0]
    b = ckpt.load_tensors(step_dir(tmp_path / "ref", TWO_STEPS) / ckpt.WEIGHTS_NAME)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert metric_rows(out) == metric_rows(tmp_path / "ref")
    print(f"2-process stop at step {stopped} (aimed at {k}), resume and reference: {time.perf_counter() - t0:.1f} s")


# ---- 4. the feature cache ----------------------------------------------------------------------------------------
def _cache_argv(cache_dir: Path) -> list[str]:
    return ["cache-features", "--config", TINY, "--train.feature_cache_dir", str(cache_dir), "--train.num_threads", "1"]


def _shards(cache_dir: Path) -> dict[str, list[str]]:
    return {d.name.split("-")[0]: sorted(p.name for p in d.iterdir()) for d in sorted(cache_dir.iterdir())}


@pytest.mark.parametrize("where", ["after a shard", "inside a shard"])
def test_feature_cache_build_stops_on_a_signal_and_resumes_without_redoing_shards(tmp_path, monkeypatch, where):
    monkeypatch.setattr(features, "SHARD_EXAMPLES", 8)  # tiny_chat's 51 train examples: 7 shards
    computed, armed, fired, real_compute, real_save = [], [], [], features._compute, features.save_tensors
    sig = signal.SIGTERM if where == "after a shard" else signal.SIGINT

    def compute(large, layer, examples, first, batch_tokens, *rest):
        computed.append(first)
        if where == "inside a shard" and first == 16 and armed and not fired:
            forward = large.forward

            def signalling_forward(*args, **kwargs):  # the signal arrives while the large model runs on shard 2
                if not fired:
                    os.kill(os.getpid(), sig)
                    fired.append(sig)
                return forward(*args, **kwargs)

            large.forward = signalling_forward  # this model instance only (each command builds its own)
        # Batches of one example: a shard takes several calls of the large model, so a signal can land inside one.
        return real_compute(large, layer, examples, first, 64, *rest)

    def save(path, tensors, metadata=None):
        real_save(path, tensors, metadata)
        if where == "after a shard" and Path(path).name == "shard-00001.safetensors" and armed and not fired:
            os.kill(os.getpid(), sig)  # as the second shard is published
            fired.append(sig)

    monkeypatch.setattr(features, "_compute", compute)
    monkeypatch.setattr(features, "save_tensors", save)
    whole = tmp_path / "whole"
    assert main(_cache_argv(whole)) == 0  # the reference: never interrupted
    computed.clear()
    armed.append(True)
    cache = tmp_path / "cache"
    assert main(_cache_argv(cache)) == 128 + sig
    (d,) = list(cache.iterdir())  # the train split; val never started
    names = sorted(p.name for p in d.iterdir())
    # Only complete shards under their final names: shards 0 and 1 (the third is dropped when the signal comes
    # during it), no temporary file, no completion marker.
    assert names == ["shard-00000.safetensors", "shard-00001.safetensors"], names
    assert "meta.json" not in names
    for name in names:
        ckpt.load_tensors(d / name)
    assert fired == [sig]
    computed.clear()
    assert main(_cache_argv(cache)) == 0
    assert computed[:5] == [16, 24, 32, 40, 48]  # train shards 2..6, then val: shards 0 and 1 were not redone
    assert _shards(cache) == _shards(whole)
    for split_dir, ref_dir in zip(sorted(cache.iterdir()), sorted(whole.iterdir())):
        assert split_dir.name == ref_dir.name
        for shard in ref_dir.glob("shard-*.safetensors"):
            assert_same_tensors(split_dir / shard.name, shard)


# ---- 5. resuming with another config -------------------------------------------------------------------------------
def _quick(out: Path, *extra) -> list[str]:
    return ["train", "--config", TINY, "--output-dir", str(out), "--train.num_threads", "1", "--max-steps", "2",
            *map(str, extra)]


def test_resuming_with_another_config_names_the_changed_fields(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_quick(out)) == 0
    capsys.readouterr()
    code = main(_quick(out, "--max-steps", 4, "--bridge.num_layers", 3, "--train.lr_bridge", 0.0001,
                       "--save-every", 3))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "bridge.num_layers: 2 -> 3" in err and "train.lr_bridge: 0.001 -> 0.0001" in err, err
    assert "--no-resume" in err and "--output-dir" in err and "docs/training.md" in err, err
    assert "missing tensor" not in err and "train.max_steps" not in err.split("Start over")[0], err  # allowed
    assert checkpoint_steps(out) == [2]  # untouched
    # Settings that may change on resume: the run goes on, and says what changed.
    assert main(_quick(out, "--max-steps", 3, "--save-every", 3, "--train.eval_every", 1, "--skip-bad",
                       "--train.patience", 9, "--train.num_threads", 1, "--small.gradient_checkpointing", "true")) == 0
    said = capsys.readouterr().out
    assert "resumed from" in said and "resuming with changed settings: " in said, said
    assert "train.max_steps: 2 -> 3" in said and "the cosine schedule now decays to 0 at step 3" in said, said
    # --no-resume starts over with the new config.
    assert main(_quick(out, "--bridge.num_layers", 3, "--no-resume")) == 0
    assert checkpoint_steps(out) == [2]


def test_a_checkpoint_saved_before_a_config_field_existed_still_resumes(tmp_path, capsys):
    """Fields added to the config since (here: bridge.every and train.distill_temperature, removed from the saved
    config.yaml) take their defaults, so they do not count as changes."""
    out = tmp_path / "run"
    assert main(_quick(out)) == 0
    path = step_dir(out, 2) / ckpt.CONFIG_NAME
    d = yaml.safe_load(path.read_text())
    del d["bridge"]["every"], d["train"]["distill_temperature"]
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert main(_quick(out, "--max-steps", 3)) == 0
    assert "resumed from" in capsys.readouterr().out
    # ... but a field whose default differs from what this run asks for is a change.
    d["train"]["max_steps"] = 3
    (step_dir(out, 3) / ckpt.CONFIG_NAME).write_text(yaml.safe_dump(d, sort_keys=False))
    assert main(_quick(out, "--max-steps", 4, "--bridge.every", 2)) == 2
    assert "bridge.every: 4 -> 2" in capsys.readouterr().err


def test_config_changes_flattens_nested_fields():
    saved = {"large": {"config": {"model_type": "qwen2", "hidden_size": 64}}, "bridge": {"num_layers": 2},
             "data": {"path": "a.jsonl", "reasoning_gym_tasks": ["x"], "skip_bad": False},
             "train": {"save_every": 10, "lr_bridge": 0.001}}
    current = {"large": {"config": {"model_type": "llama", "hidden_size": 64, "rope_theta": 1e4}},
               "bridge": {"num_layers": 2}, "data": {"path": "a.jsonl", "reasoning_gym_tasks": [], "skip_bad": True},
               "train": {"save_every": 5, "lr_bridge": 0.001}}
    forbidden, allowed = ckpt.config_changes(saved, current)
    assert forbidden == ["large.config.model_type: qwen2 -> llama", "large.config.rope_theta: (not set) -> 10000.0",
                         'data.reasoning_gym_tasks: ["x"] -> []']
    assert allowed == ["data.skip_bad: false -> true", "train.save_every: 10 -> 5"]


def test_no_resume_into_a_directory_of_a_longer_run_starts_over(tmp_path, capsys):
    """Before: the earlier run's higher steps outranked the new run's checkpoints (pruning keeps the highest) and
    the next resume continued the earlier run."""
    out = tmp_path / "run"
    assert main(_quick(out, "--max-steps", 4, "--save-every", 1)) == 0
    assert checkpoint_steps(out) == [3, 4]
    assert main(_quick(out, "--save-every", 1, "--no-resume")) == 0
    assert "removed the earlier run's checkpoints (step-00000003, step-00000004) and best/" in capsys.readouterr().out
    assert checkpoint_steps(out) == [1, 2]
    assert [r["step"] for r in metric_rows(out)] == [0, 1, 2]
