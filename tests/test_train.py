"""Training through the real CLI, exact resume, and bad input (clear message, exit 2, no traceback)."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm_modules.__main__ import main
from llm_modules.config import load_config
from llm_modules.train import train

TINY = "configs/tiny-random.yaml"


def _cli(*args):
    return main(["train", "--config", TINY, *map(str, args)])


def test_few_steps_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("--output-dir", out, "--max-steps", 4, "--train.eval_every", 2, "--save-every", 2) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(set(r) >= {"train_loss", "lr", "tokens_per_s"} for r in rows[1:])
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert (out / "best" / "model.safetensors").exists()
    # A second call resumes and, already at max_steps, does nothing more.
    assert _cli("--output-dir", out, "--max-steps", 4) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_keep_every_keeps_step_zero_and_its_multiples_for_learning_curves(tmp_path):
    from llm_modules import LLMModules

    out = tmp_path / "run"
    assert _cli("--output-dir", out, "--max-steps", 5, "--save-every", 1, "--train.keep_every", 2) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-00000000", "step-00000002", "step-00000004", "step-00000005"]  # + the latest two
    resumable = [n for n in kept if (out / "checkpoints" / n / "optimizer.safetensors").exists()]
    assert resumable == ["step-00000004", "step-00000005"]  # the curve's older points keep their weights only
    start = LLMModules.from_pretrained(out / "checkpoints" / "step-00000000")
    fresh = LLMModules.from_config(load_config(TINY))
    assert all(torch.equal(p, dict(fresh.trainable_named_parameters())[n])
               for n, p in start.trainable_named_parameters())  # step 0 is the initialization


def test_a_frozen_head_stays_where_it_started_while_the_rest_trains(tmp_path):
    out = tmp_path / "run"
    assert _cli("--output-dir", out, "--max-steps", 3, "--save-every", 3, "--train.keep_every", 3,
                "--train.lr_head", 0) == 0
    start, end = (_weights(out / "checkpoints" / f"step-{k:08d}") for k in (0, 3))
    assert start.keys() == end.keys() and "lm_head.weight" in end
    assert torch.equal(start["lm_head.weight"], end["lm_head.weight"])
    assert all(not torch.equal(start[k], end[k]) for k in end if k.endswith(".weight") and k != "lm_head.weight"
               and "ln" not in k and "norm" not in k)


def test_small_from_step_trains_the_bridge_alone_first_and_resumes_across_the_stage_change(tmp_path):
    over = [("train.max_steps", 6), ("train.save_every", 1), ("train.keep_every", 1), ("train.warmup_steps", 2),
            ("train.small_from_step", 3)]
    whole = load_config(TINY, over, output_dir=str(tmp_path / "whole"))
    train(whole, resume=False)
    w = [_weights(tmp_path / "whole" / "checkpoints" / f"step-{k:08d}") for k in range(7)]
    small = [k for k in w[0] if k.startswith(("small.", "lm_head.")) and "ln" not in k and "norm" not in k]
    assert small and all(torch.equal(w[0][k], w[3][k]) for k in small)  # stage 1: the bridge alone
    assert all(not torch.equal(w[3][k], w[6][k]) for k in small if k.endswith(".weight"))  # stage 2: both
    assert all(not torch.equal(w[0][k], w[3][k]) for k in w[0] if k.startswith("bridge.") and k.endswith(".weight"))
    split = load_config(TINY, over, output_dir=str(tmp_path / "split"))
    train(split, resume=False, stop_at=2)
    train(split, resume=True)  # resumed inside stage 1, through the change
    end = _weights(tmp_path / "split" / "checkpoints" / "step-00000006")
    assert all(torch.equal(w[6][k], end[k]) for k in end)


def test_small_from_step_gives_the_small_model_a_schedule_of_its_own_from_that_step():
    from llm_modules.config import TrainConfig
    from llm_modules.train import make_scheduler

    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0, "name": n} for n in ("bridge", "small")]
    opt = torch.optim.SGD(groups)
    sched = make_scheduler(opt, TrainConfig(warmup_steps=2, small_from_step=4), max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    bridge, small = zip(*lrs)
    assert bridge[:3] == (0.0, 0.5, 1.0) and bridge[-1] < bridge[3]  # warm-up over 2 steps, cosine over 10
    assert small[:4] == (0.0,) * 4 and small[4:7] == (0.0, 0.5, 1.0)  # the same, started at step 4, over 6
    assert small[7] > bridge[7] and small[9] > bridge[9]


def test_a_run_saved_without_its_final_optimizer_state_is_finished_not_continued(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("--output-dir", out, "--max-steps", 3, "--save-every", 1, "--train.save_final_optimizer", "false") == 0
    saved = {d.name: (d / "optimizer.safetensors").exists() for d in (out / "checkpoints").iterdir()}
    assert saved == {"step-00000002": True, "step-00000003": False}  # only the last step goes without
    assert _cli("--output-dir", out, "--max-steps", 3) == 0  # a rerun finds the run finished
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert _cli("--output-dir", out, "--max-steps", 5) == 2
    err = capsys.readouterr().err
    assert "step-00000003 is the last step of a finished run saved without optimizer state" in err
    assert "cannot be continued to step 5. Keep train.max_steps at 3" in err and "Traceback" not in err


def test_best_and_the_checkpoint_of_its_step_share_one_weights_file(tmp_path):
    out = tmp_path / "run"
    assert _cli("--output-dir", out, "--max-steps", 3, "--save-every", 1, "--train.eval_every", 1) == 0
    state = json.loads((out / "checkpoints" / "step-00000003" / "training_state.json").read_text())
    assert state["progress"]["best_step"] == 3  # the validation loss falls at every step of this run
    best, step = out / "best" / "model.safetensors", out / "checkpoints" / "step-00000003" / "model.safetensors"
    assert best.samefile(step)  # written once, hard-linked
    assert not best.samefile(out / "checkpoints" / "step-00000002" / "model.safetensors")
    weights = load_file(step)
    shutil.rmtree(out / "checkpoints")  # the experiment removes the step checkpoints: best/ keeps its weights
    assert all(torch.equal(v, weights[k]) for k, v in load_file(best).items()) and len(weights) > 0


def test_console_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llm_modules", "train", "--config", TINY, "--output-dir",
                        str(tmp_path / "run"), "--max-steps", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-00000002").is_dir()


def test_training_lowers_validation_loss(tmp_path):
    cfg = load_config(TINY, [("train.eval_every", 13)], output_dir=str(tmp_path / "run"))
    train(cfg, resume=False)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) >= 2 and val[-1] < val[0] - 0.3, val


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def test_resume_is_exact(tmp_path):
    K = 5
    over = [("train.max_steps", 2 * K), ("train.save_every", 100), ("train.eval_every", 3),
            ("bridge.dropout", 0.2)]  # dropout on: the RNG state must be restored too
    whole = load_config(TINY, over, output_dir=str(tmp_path / "whole"))
    train(whole, resume=False)
    split = load_config(TINY, over, output_dir=str(tmp_path / "split"))
    train(split, resume=False, stop_at=K)
    assert (tmp_path / "split" / "checkpoints" / f"step-{K:08d}").is_dir()
    train(split, resume=True)
    a = _weights(tmp_path / "whole" / "checkpoints" / f"step-{2 * K:08d}")
    b = _weights(tmp_path / "split" / "checkpoints" / f"step-{2 * K:08d}")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in rows]  # noqa
    assert strip(ma) == strip(mb)


BAD = {
    "invalid JSON": ('{"messages": [', "invalid JSON"),
    "missing field": ('{"foo": 1}', "missing field"),
    "unknown role": ('{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "unknown role"),
    "empty assistant": ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
                        "empty"),
}


@pytest.mark.parametrize("case", list(BAD) + ["non-UTF-8"])
def test_bad_records_stop_with_file_and_line(tmp_path, capsys, case):
    data = tmp_path / "data.jsonl"
    good = open("tests/fixtures/tiny_chat.jsonl", "rb").read().splitlines()[:20]
    bad = b"\xff\xfe broken" if case == "non-UTF-8" else BAD[case][0].encode()
    data.write_bytes(b"\n".join(good[:7] + [bad] + good[7:]) + b"\n")
    out = tmp_path / "run"
    code = _cli("--output-dir", out, "--max-steps", 1, "--data.path", data)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{data}:8" in err, err
    if case != "non-UTF-8":
        assert BAD[case][1].lower() in err.lower(), err
    # --skip-bad trains and lists what it skipped.
    assert _cli("--output-dir", out, "--max-steps", 1, "--data.path", data, "--skip-bad") == 0
    skipped = (out / "skipped_records.jsonl").read_text().splitlines()
    assert len(skipped) == 1 and ":8" not in skipped[0] and json.loads(skipped[0])[1] == 8


@pytest.mark.parametrize("override,expect", [
    (["--train.lrr", "1"], "train.lrr: unknown key"),
    (["--train.batch_size", "four"], "train.batch_size: expected int"),
    (["--bridge.gate", "maybe"], "bridge.gate: 'maybe' is not one of"),
    (["--train.lr_head", "-1"], "train.lr_head: -1.0 must be >= 0"),
    (["--train.small_from_step", "-2"], "train.small_from_step: -2 must be >= 0"),
    (["--train.lr_gate", "0.01"], "train.lr_gate: only coupling 'prompt' has tanh gates"),
    (["--data.path", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl"),
    (["--train.output_dir", "/proc/forbidden"], "not writable"),
])
def test_bad_config_is_a_clear_error(tmp_path, capsys, override, expect):
    code = main(["train", "--config", TINY, "--max-steps", "1", "--output-dir", str(tmp_path / "r"), *override]
                if "output_dir" not in override[0] else ["train", "--config", TINY, "--max-steps", "1", *override])
    err = capsys.readouterr().err
    assert code == 2 and expect in err and "Traceback" not in err, err


def test_empty_dataset_after_filtering_is_a_clear_error(tmp_path, capsys):
    code = _cli("--output-dir", tmp_path / "r", "--max-steps", 1, "--data.max_length", 4)
    err = capsys.readouterr().err
    assert code == 2 and "max_length" in err, err
