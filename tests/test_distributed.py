"""Multi-process training for real (2 CPU processes, gloo; DDP, and FSDP2 with configs/accelerate/fsdp.yaml's
settings), checkpoints across process counts and wrappers, the example accelerate configs, and the GPU benchmark's
CPU smoke path.

The 2-process run goes through `accelerate launch` with configs/accelerate/cpu_2proc.yaml and the real CLI
(`llm_modules.__main__.main`), launched with this file as the script: in `--worker` mode it records, per rank, what
accelerate set up and the gradients of the first optimizer step (after DDP's all-reduce, before clipping), then
trains. A 1-process run in this process with twice the per-process batch must give the same gradients, losses and
weights; a checkpoint of the 2-process run must resume in 1 process and continue to the weights of an uninterrupted
1-process run.

Note: `accelerate launch --cpu --num_processes 2` starts ONE process on accelerate 1.x (the CPU path spawns several
only through mpirun); cpu_2proc.yaml uses the torchrun launcher instead, with ACCELERATE_USE_CPU=1 in the environment
so that every process picks the CPU and the gloo backend. The rank records below catch a launch that silently
ran a single process.
"""
from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-random.yaml"
CPU_2PROC = "configs/accelerate/cpu_2proc.yaml"
B, K = 2, 3  # per-process batch, optimizer steps of the 2-process run
# Everything random switched off (dropout in the bridge and in the small GPT-Neo; the large model is in eval mode),
# a constant schedule so that a run to K steps and one to 2K steps share their first K updates, and 2 held-out
# examples: fewer than B x world, so rank 1 has no validation batch of its own (the uneven case).
COMMON = ["--bridge.dropout", "0", "--small.config.embed_dropout", "0", "--small.config.attention_dropout", "0",
          "--small.config.resid_dropout", "0", "--train.schedule", "constant", "--train.warmup_steps", "1",
          "--data.val_fraction", "0.03", "--train.eval_every", str(K), "--train.save_every", "100",
          "--train.num_threads", "1"]
LAUNCH_TIMEOUT = 120  # a hang (mismatched collectives) ends here instead of blocking the suite
RTOL_GRAD, ATOL_W = 1e-5, 1e-5
# A gradient this small is rounding noise: the cross-attention key biases get an exactly zero gradient (q.b shifts all
# of a query's scores equally, which the softmax cancels), and AdamW turns noise into steps of up to lr * g / eps.
NOISE_GRAD, NOISE_ATOL_W = 1e-7, 1e-4


# ---- the worker: runs inside each launched process -------------------------------------------------------------
def _instrument(record: dict, grads_path: Path) -> None:
    """Wrap llm_modules.train.setup so that the run it builds reports its distributed set-up into `record` and saves
    the trainable gradients of its first optimizer step (taken where train_step clips them: after the all-reduce)."""
    import torch
    from safetensors.torch import save_file

    import llm_modules.train as T

    real_setup = T.setup

    def setup(*args, **kwargs):
        run = real_setup(*args, **kwargs)
        acc, model = run.accelerator, run.unwrapped
        large = model.large or torch.nn.Module()  # None when training reads the feature cache
        record.update(rank=acc.process_index, world=acc.num_processes, distributed_type=str(acc.distributed_type),
                      backend=acc.state.backend, wrapper=type(run.model).__name__,
                      large_loaded=model.large is not None,
                      large_trainable=any(p.requires_grad for p in large.parameters()),
                      sharded=sorted({type(p).__name__ for _, p in model.trainable_named_parameters()}),
                      large_sharded=sorted({type(p).__name__ for p in large.parameters()}),
                      threads=torch.get_num_threads())
        real_clip = acc.clip_grad_norm_

        def clip(parameters, *a, **k):
            parameters = list(parameters)
            if "grad_saved" not in record:
                grads = {n: _whole(p.grad).detach().clone() for n, p in model.trainable_named_parameters()
                         if p.grad is not None}
                save_file(grads, str(grads_path))
                record["grad_saved"] = len(grads)
                record["large_grads"] = sum(p.grad is not None for p in large.parameters())
            return real_clip(parameters, *a, **k)

        acc.clip_grad_norm_ = clip
        return run

    T.setup = setup
    real_prepare = T.features_mod.prepare

    def prepare(*args, **kwargs):  # builds (or finds) the feature cache with the large model
        record["built_features"] = True
        return real_prepare(*args, **kwargs)

    T.features_mod.prepare = prepare


def _whole(t):
    """A sharded (FSDP DTensor) gradient gathered whole - a collective every rank makes in the same order."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_on_cpu() -> None:
    """Make accelerate run FSDP2 on CPU processes (gloo), for this test only.

    accelerate turns FSDP on only for GPU-type backends (with ACCELERATE_USE_CPU=1 it silently falls back to DDP), yet
    torch's FSDP2 (fully_shard, DTensor) runs on CPU with gloo. After the Accelerator is built as usual (MULTI_CPU,
    gloo) this switches its shared state to FSDP with the plugin that the FSDP_* environment describes - the test
    sets it from configs/accelerate/fsdp.yaml - so `prepare` takes accelerate's own FSDP2 path."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    real_init = Accelerator.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        # Both shared states: every later AcceleratorState() copies PartialState's over its own.
        self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    Accelerator.__init__ = init


def _full_disk() -> None:
    """This rank's checkpoint writes fail as on a full disk."""
    import errno

    import llm_modules.checkpoint as ckpt

    def replace_dir(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    ckpt.replace_dir = replace_dir


def _worker(argv: list[str]) -> int:
    """`test_distributed.py --worker RECORD_DIR train --config ...`: the CLI, instrumented, in one rank."""
    sys.path.insert(0, str(REPO))  # the package of this checkout, whatever is installed
    record_dir, cli = Path(argv[0]), argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"env_rank": rank, "env_world": int(os.environ.get("WORLD_SIZE", "1")), "pid": os.getpid()}
    (record_dir / f"pid-rank{rank}").write_text(str(os.getpid()))  # lets the test stop a hung worker
    stacks = open(record_dir / f"stacks-rank{rank}.txt", "w")  # where a hung worker was, for the failure message
    faulthandler.dump_traceback_later(float(os.environ.get("LLM_MODULES_TEST_HANG_S", LAUNCH_TIMEOUT - 15)),
                                      file=stacks)
    _instrument(record, record_dir / f"grads-rank{rank}.safetensors")
    if os.environ.get("LLM_MODULES_TEST_FSDP") == "1":
        _fsdp_on_cpu()
    if os.environ.get("LLM_MODULES_TEST_FULL_DISK") == "1" and rank == 0:
        _full_disk()
    from llm_modules.__main__ import main

    t0 = time.perf_counter()
    code = main(cli)
    faulthandler.cancel_dump_traceback_later()
    record.update(exit_code=code, seconds=time.perf_counter() - t0)
    (record_dir / f"rank{rank}.json").write_text(json.dumps(record))
    return code


# ---- helpers -----------------------------------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ)
    # CPU processes by design (gloo), also on a machine with a GPU: without hiding it, each rank asks for cuda:RANK.
    env.update(ACCELERATE_USE_CPU="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _fsdp_launch_env() -> dict:
    """The environment `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = REPO / "configs/accelerate/fsdp.yaml"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "x.py"]))
    return prepare_multi_gpu_env(args)


def _fsdp_env() -> dict:
    """fsdp.yaml's FSDP_* settings (its bf16 left out: the comparison with one process is made in fp32), and the
    switch that makes the worker run them on CPU."""
    return {k: v for k, v in _fsdp_launch_env().items() if k.startswith("FSDP_")} | {"LLM_MODULES_TEST_FSDP": "1"}


def _launch(cmd: list[str], timeout: float, record_dir: Path, extra_env: Optional[dict] = None):
    """Run the launcher; on timeout stop it and its workers and return (None, stdout, stderr). torchrun starts each
    worker in a session of its own, so killing the launcher alone would leave them running: SIGTERM makes the
    launcher stop its workers, and any worker still alive after that is killed by the pid it recorded at start."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env() | (extra_env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        for f in record_dir.glob("pid-rank*"):
            try:
                os.kill(int(f.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        return None, stdout, stderr


def _weights(out: Path, step: int) -> dict:
    from safetensors.torch import load_file

    path = out / "checkpoints" / f"step-{step:08d}" / "model.safetensors"
    assert path.is_file(), f"no checkpoint {path}; present: {sorted(p.name for p in (out / 'checkpoints').glob('*'))}"
    return load_file(str(path))


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _max_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(((a[k].double() - b[k].double()).abs().max().item(), k) for k in a)


def _assert_same_weights(a: dict, b: dict, grads: dict) -> None:
    """Equal within fp32 tolerance; tensors whose first gradient was pure rounding noise within NOISE_ATOL_W."""
    assert a.keys() == b.keys() == grads.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        noise = grads[k].abs().max().item() < NOISE_GRAD
        assert diff <= (NOISE_ATOL_W if noise else ATOL_W), (k, diff, "noise-gradient tensor" if noise else "")
    assert sum(grads[k].abs().max().item() >= NOISE_GRAD for k in a) > 0.9 * len(a)  # the exception stays one


def _train_in_process(out: Path, batch: int, max_steps: int, stop_at=None, resume=False, record=None):
    """One process, in this interpreter, through the same train() the CLI calls."""
    import torch

    import llm_modules.train as T
    from llm_modules.config import load_config, parse_overrides

    cfg = load_config(str(REPO / TINY), parse_overrides(COMMON + ["--train.batch_size", str(batch)]),
                      output_dir=str(out), max_steps=max_steps)
    lines: list[str] = []
    real_setup, threads = T.setup, torch.get_num_threads()
    if record is not None:
        _instrument(record, out / "grads-1proc.safetensors")
    try:
        progress = T.train(cfg, resume=resume, stop_at=stop_at, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    finally:
        T.setup = real_setup
        torch.set_num_threads(threads)  # train.num_threads: 1 must not slow down the tests that run after these
    return progress, lines


# ---- fixtures: each run once per module ------------------------------------------------------------------------
def _run_two(out: Path, extra_env: Optional[dict] = None, resume_from: Optional[Path] = None,
             max_steps: int = K, extra_args: tuple = (), exit_code: int = 0) -> dict:
    """2 processes with batch B each, through accelerate launch + the CLI (resuming from a copy of `resume_from`)."""
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        shutil.copytree(resume_from, run_dir)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / CPU_2PROC),
           str(Path(__file__).resolve()), "--worker", str(out),
           "train", "--config", TINY, "--output-dir", str(run_dir), "--max-steps", str(max_steps),
           "--train.batch_size", str(B), *([] if resume_from else ["--no-resume"]), *COMMON, *extra_args]
    t0 = time.perf_counter()
    code, stdout, stderr = _launch(cmd, LAUNCH_TIMEOUT, out, extra_env)
    seconds = time.perf_counter() - t0
    if code is None:
        stacks = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(out.glob("stacks-rank*")))
        pytest.fail(f"2-process run did not finish in {LAUNCH_TIMEOUT} s - a hang (ranks waiting in different "
                    f"collectives?); all its processes were killed\nSTDOUT\n{stdout[-3000:]}\nWORKER STACKS\n{stacks}")
    assert code == exit_code, f"exit {code}\nSTDOUT\n{stdout[-3000:]}\nSTDERR\n{stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2) if (out / f"rank{i}.json").exists()]
    # Snapshot the checkpoint before any test resumes from it.
    snapshot = out / "snapshot"
    shutil.copytree(run_dir, snapshot)
    print(f"2-process run: {seconds:.1f} s wall")
    return {"out": snapshot, "ranks": ranks, "seconds": seconds, "stdout": stdout, "stderr": stderr,
            "grads": [out / f"grads-rank{i}.safetensors" for i in range(2)]}


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    """K steps in 2 processes (DDP) with batch B each."""
    return _run_two(tmp_path_factory.mktemp("two_proc"))


@pytest.fixture(scope="module")
def fsdp_two_proc(tmp_path_factory):
    """K steps in 2 processes under FSDP2 (configs/accelerate/fsdp.yaml's sharding, on CPU) with batch B each."""
    return _run_two(tmp_path_factory.mktemp("fsdp_two_proc"), _fsdp_env())


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """The reference: 1 process, batch 2B, 2K steps, with a checkpoint at K (stop_at + exact resume)."""
    out = tmp_path_factory.mktemp("one_proc") / "run"
    record: dict = {}
    t0 = time.perf_counter()
    _train_in_process(out, 2 * B, 2 * K, stop_at=K, record=record)
    w_k = _weights(out, K)  # read now: the run below prunes old checkpoints
    metrics_k = _metrics(out)
    at_k = shutil.copytree(out, out.parent / "at_k")  # the run as it stood at step K, for resuming elsewhere
    _train_in_process(out, 2 * B, 2 * K, resume=True)
    return {"out": out, "record": record, "w_k": w_k, "metrics_k": metrics_k, "w_2k": _weights(out, 2 * K),
            "at_k": at_k, "seconds": time.perf_counter() - t0, "grads": out / "grads-1proc.safetensors"}


# ---- the tests ---------------------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_with_the_global_batch(two_proc, one_proc):
    # Really 2 ranks, on the CPU with gloo, DDP-wrapped (whole parameters), frozen large model outside the gradient.
    for r in two_proc["ranks"]:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["wrapper"] == "DistributedDataParallel", r
        assert r["sharded"] == ["Parameter"], r
    _assert_equals_one_process(two_proc, one_proc)


def test_fsdp_two_processes_equal_one_process_with_the_global_batch(fsdp_two_proc, one_proc):
    # FSDP2 as configs/accelerate/fsdp.yaml sets it up: the trainable parameters are DTensor shards, the frozen large
    # model is left whole (fsdp_ignored_modules: large) and never gets a gradient.
    for r in fsdp_two_proc["ranks"]:
        assert r["distributed_type"] == "DistributedType.FSDP" and r["wrapper"] == "FSDPLLMModules", r
        assert r["sharded"] == ["DTensor"] and r["large_sharded"] == ["Parameter"], r
    _assert_equals_one_process(fsdp_two_proc, one_proc)


def _assert_equals_one_process(two: dict, one: dict) -> None:
    from safetensors.torch import load_file

    from llm_modules.config import load_config, parse_overrides
    from llm_modules.model import LLMModules

    ranks = two["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1], ranks
    for r in ranks:
        assert r["world"] == 2 and r["env_world"] == 2 and r["exit_code"] == 0 and r["backend"] == "gloo", r
        assert not r["large_trainable"] and r["large_grads"] == 0 and r["grad_saved"] > 0, r
    assert ranks[0]["pid"] != ranks[1]["pid"]

    # The first step's gradients, reduced, are those of one process over the whole global batch: the loss scaling
    # (token sum / global token count, DDP's or FSDP's averaging undone) is exact, and each rank took its own slice.
    g0, g1, g = (load_file(str(p)) for p in (*two["grads"], one["grads"]))
    assert _max_diff(g0, g1)[0] == 0.0  # every rank ends with the same averaged gradient (whole, or gathered whole)
    assert g0.keys() == g.keys() and len(g) > 10
    for k in g:  # fp32 rounding differs (each rank pads its slice to its own length), nothing else
        diff, scale = (g0[k] - g[k]).abs().max().item(), g[k].abs().max().item()
        assert diff <= RTOL_GRAD * scale + 1e-8, (k, diff, scale)

    # Same losses (the reduced train loss and the token-weighted validation loss over uneven rank shares).
    m2, m1 = _metrics(two["out"]), one["metrics_k"]
    assert [r["step"] for r in m2] == list(range(K + 1))
    assert [r["step"] for r in m1] == list(range(K + 1))
    assert [r["step"] for r in m2 if "val_loss" in r] == [r["step"] for r in m1 if "val_loss" in r] == [0, K]
    for a, b in zip(m2, m1):
        for key in ("train_loss", "val_loss", "lr"):
            assert (key in a) == (key in b), (key, a, b)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a, b)

    # Same weights after K steps, and they did move from the initialization.
    w2, w1 = _weights(two["out"], K), one["w_k"]
    _assert_same_weights(w2, w1, g)
    cfg = load_config(str(REPO / TINY), parse_overrides(COMMON))
    init = {n: p.detach() for n, p in LLMModules.from_config(cfg).trainable_named_parameters()}
    moved = {k: (w2[k] - init[k]).abs().max().item() for k in w2}
    assert min(moved.values()) > 0 and max(moved.values()) > 100 * ATOL_W, moved  # every tensor trained


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_resumes_in_one(wrapper, request, one_proc, tmp_path):
    """Gathered whole (FSDP: from the shards) by every rank, written by the main one, read by a single process."""
    from safetensors.torch import load_file

    two_proc = request.getfixturevalue({"ddp": "two_proc", "fsdp": "fsdp_two_proc"}[wrapper])
    out = tmp_path / "resumed"
    shutil.copytree(two_proc["out"], out)
    progress, lines = _train_in_process(out, 2 * B, 2 * K, resume=True)
    assert any("resumed from" in ln and f"step {K}" in ln for ln in lines), lines
    assert progress.step == 2 * K
    rows = _metrics(out)
    assert [r["step"] for r in rows] == list(range(2 * K + 1))  # the 2-process rows kept, the new ones appended
    # K steps in 2 processes + K in 1 process (global batch 2B throughout) == 2K steps in 1 process.
    _assert_same_weights(_weights(out, 2 * K), one_proc["w_2k"], load_file(str(one_proc["grads"])))
    assert _max_diff(_weights(out, 2 * K), _weights(two_proc["out"], K))[0] > 100 * ATOL_W  # it did train on


def test_one_process_checkpoint_resumes_sharded_in_two(one_proc, tmp_path):
    """The other direction: whole tensors written by one process are scattered into FSDP shards by 2 processes."""
    from safetensors.torch import load_file

    two = _run_two(tmp_path, _fsdp_env(), resume_from=one_proc["at_k"], max_steps=2 * K)
    assert all(r["sharded"] == ["DTensor"] and r["exit_code"] == 0 for r in two["ranks"]), two["ranks"]
    assert "resumed from" in two["stdout"] + two["stderr"]
    assert [r["step"] for r in _metrics(two["out"])] == list(range(2 * K + 1))
    _assert_same_weights(_weights(two["out"], 2 * K), one_proc["w_2k"], load_file(str(one_proc["grads"])))


def test_two_process_resume_with_dropout_is_exact(tmp_path):
    """Each rank's RNG state is saved and restored: with dropout on, K steps + resume + K steps in 2 processes give
    bit for bit the weights of 2K uninterrupted steps (the ranks draw different masks, so rank 0's state alone would
    not do)."""
    dropout = ("--bridge.dropout", "0.2", "--small.config.resid_dropout", "0.2")
    whole = _run_two(tmp_path / "whole", max_steps=2 * K, extra_args=dropout)
    first = _run_two(tmp_path / "first", max_steps=K, extra_args=dropout)
    resumed = _run_two(tmp_path / "resumed", resume_from=first["out"], max_steps=2 * K, extra_args=dropout)
    assert "resumed from" in resumed["stdout"] + resumed["stderr"]
    assert _max_diff(_weights(resumed["out"], 2 * K), _weights(whole["out"], 2 * K))[0] == 0.0


def test_feature_cache_is_built_once_by_the_main_process(tmp_path):
    """train.feature_cache: auto in 2 processes: rank 0 runs the large model to fill the cache while rank 1 waits,
    then finds the cache complete and never loads the large model."""
    two = _run_two(tmp_path, extra_args=("--train.feature_cache", "auto",
                                         "--train.feature_cache_dir", str(tmp_path / "features")))
    by_rank = {r["rank"]: r for r in two["ranks"]}
    assert by_rank[0].get("built_features") is True and "built_features" not in by_rank[1], by_rank
    assert not any(r["large_loaded"] for r in by_rank.values()), by_rank  # rank 0 released it after the build
    assert "the large model is not loaded" not in two["stdout"] + two["stderr"]  # only rank 0 speaks, and it built
    assert [r["step"] for r in _metrics(two["out"])] == list(range(K + 1))


def test_failed_checkpoint_write_stops_every_process(tmp_path):
    """The main process cannot write its checkpoint: it says why, and the other process stops too (with its own
    short message) instead of waiting in the next collective."""
    two = _run_two(tmp_path, {"LLM_MODULES_TEST_FULL_DISK": "1"}, exit_code=1)
    by_rank = {r["rank"]: r for r in two["ranks"]}
    assert by_rank[0]["exit_code"] == by_rank[1]["exit_code"] == 2, by_rank  # UserError: exit 2, no traceback
    err = two["stderr"]
    assert f"could not save the checkpoint of step {K}" in err and "No space left on device" in err, err[-3000:]
    assert "process 1: stopping, the main process could not save the checkpoint" in err, err[-3000:]
    assert "llm_modules/" not in err, err[-3000:]  # no traceback from the workers (the launcher prints its own)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))


# ---- accelerate configs ----------------------------------------------------------------------------------------
CONFIGS = {
    "multi_gpu.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "mixed_precision": "bf16"},
    "multi_node.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 2, "mixed_precision": "bf16"},
    "fsdp.yaml": {"distributed_type": "FSDP", "num_machines": 1, "mixed_precision": "bf16"},
    "cpu_2proc.yaml": {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 2,
                       "mixed_precision": "no"},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_accelerate_config_parses_and_validates(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = REPO / "configs" / "accelerate" / name
    cfg = load_config_from_file(str(path))
    for key, value in CONFIGS[name].items():
        got = getattr(cfg, key)
        assert str(getattr(got, "value", got)) == str(value), (key, got)
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    if name == "fsdp.yaml":
        f = cfg.fsdp_config
        assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "GPTNeoBlock" in f["fsdp_transformer_layer_cls_to_wrap"]
        assert f["fsdp_ignored_modules"] == "large"  # the frozen large model: replicated, never sharded
    if name == "multi_node.yaml":
        assert cfg.num_processes % cfg.num_machines == 0 and cfg.main_process_ip and cfg.main_process_port
    # What `accelerate launch --config_file` does with it before starting anything.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "llm_modules", "train"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == cfg.num_processes
    assert args.use_fsdp == (name == "fsdp.yaml") and args.multi_gpu == (name != "fsdp.yaml")


def test_fsdp_config_builds_the_plugin_each_process_would(monkeypatch):
    """fsdp.yaml -> the environment `accelerate launch` gives each process -> accelerate's FSDP plugin: FSDP2, block
    auto-wrap on a class that exists (a typo would wrap nothing), the large model ignored. (The FSDP tests above
    train with it.)"""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers.models.gpt_neo import modeling_gpt_neo

    env = _fsdp_launch_env()
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(k, v)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.ignored_modules == "large" and plugin.use_orig_params is None
    assert plugin.transformer_cls_names_to_wrap == ["GPTNeoBlock"]
    assert all(hasattr(modeling_gpt_neo, c) for c in plugin.transformer_cls_names_to_wrap)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"


# ---- the GPU benchmark on CPU ------------------------------------------------------------------------------------
BENCH = REPO / "benchmarks" / "gpu.py"


def test_gpu_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "results.json"
    r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--out", str(out)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    assert {"device", "smoke", "sizes", "params", "train", "generation", "flops", "peak_tflops", "elapsed_s"} <= set(res)
    assert res["smoke"] is True and res["device"]["type"] == "cpu"
    arms = {(a["features"], a["gradient_checkpointing"]): a for a in res["train"]}
    assert set(arms) == {("live", False), ("live", True), ("cached", False), ("cached", True)}
    for a in arms.values():
        assert {"tokens_per_s", "step_s", "peak_memory_gib", "flops_per_step", "achieved_tflops", "mfu",
                          "mfu_trainable_only"} <= set(a)
        assert a["tokens_per_s"] > 0 and a["flops_per_step"] > 0 and a["loss"] == a["loss"]  # not NaN
    # The large model's forward counts only with live features.
    assert arms[("live", False)]["flops_per_step"] > arms[("cached", False)]["flops_per_step"]
    gen = res["generation"]
    assert {"cached", "recompute", "speedup_per_token"} <= set(gen)
    assert gen["cached"]["new_tokens"] > 0 and gen["cached"]["tokens_per_s"] > 0
    assert gen["recompute"]["new_tokens"] > 0 and gen["recompute"]["tokens_per_s"] > 0
    assert gen["cached"]["tokens_match_recompute"] is True  # the two decoders agree on the greedy tokens
    assert "6" in res["flops"]["formula"] and res["peak_tflops"] is None  # no known peak for a CPU


def test_gpu_benchmark_options_on_cpu(tmp_path):
    """The SDPA small attention with one checkpointing setting and no generation; then generation alone."""
    runs = {"train": ["--small-attn", "sdpa", "--checkpointing", "off", "--skip-generation"], "gen": ["--skip-train"]}
    res = {}
    for name, flags in runs.items():
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(BENCH), "--smoke", "--device", "cpu", "--out", str(out), *flags],
                           cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-4000:]
        res[name] = json.loads(out.read_text())
    train = res["train"]
    assert train["options"]["small_attn"] == "sdpa" and train["generation"] is None
    arms = [(a["features"], a["gradient_checkpointing"]) for a in train["train"]]
    assert arms == [("live", False), ("cached", False)]
    assert all(a["loss"] == a["loss"] and a["tokens_per_s"] > 0 for a in train["train"])
    gen = res["gen"]
    assert gen["train"] == [] and gen["generation"]["cached"]["tokens_match_recompute"] is True


def test_gpu_benchmark_without_gpu_says_so_and_exits_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "x.json")], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "CUDA" in r.stderr and "--smoke --device cpu" in r.stderr, r.stderr
    assert not (tmp_path / "x.json").exists()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.exit(_worker(sys.argv[2:]))
