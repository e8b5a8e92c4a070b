"""The properties that a device could break, checked on every device this machine has: the CPU always, CUDA where
torch sees a GPU (benchmarks/gpu_check.sh runs this file there; on a machine without one the CUDA cases skip).

Cached decoding equals full recompute, the model is causal, a bf16-autocast step trains the trainable weights only, a
checkpoint saved from a device loads back to the same logits, and the training CLI runs in bf16 and resumes on the
device accelerate picks (the GPU when there is one). fp32 comparisons use a tolerance rather than exact equality:
GPU kernels (SDPA, cuBLAS) pick different algorithms for different shapes, so the cached and the full pass round
differently.
"""
import json
import subprocess
import sys

import pytest
import torch
from tiny import tiny_config

from llm_modules import LLMModules
from llm_modules.generate import SamplingConfig, stream

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"))]


def build(device, **kw):
    torch.manual_seed(0)
    return LLMModules.from_config(tiny_config(**kw)).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
def test_cached_decoding_equals_recompute(device):
    model = build(device)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row

    def steps(use_cache):
        return list(stream(model, ids, mask, SamplingConfig(max_new_tokens=16), use_cache=use_cache))

    cached, full = steps(True), steps(False)
    assert len(cached) == len(full) == 16
    for a, b in zip(cached, full):
        assert a.logits.device.type == torch.device(device).type
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
        assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("device", DEVICES)
def test_future_tokens_never_change_past_logits(device):
    model = build(device)
    T = 10
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1)).to(device)
    base = model(x).logits
    for t in range(T - 1):
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 7) % 96
        out = model(y).logits
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-3  # the change does reach its own position


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_trains_the_trainable_weights_only(device):
    model = build(device, large="qwen2").train()
    large_before = {n: p.clone() for n, p in model.large.named_parameters()}
    trained_before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        fp32_loss = model(x, labels=x).loss
    opt = torch.optim.AdamW(model.param_groups(1e-2, 1e-2, 0.0))
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = model(x, labels=x)
    assert abs(out.loss.item() - fp32_loss.item()) < 0.05 * fp32_loss.item()  # bf16 rounding, not a different model
    out.loss.backward()
    opt.step()
    assert all(torch.equal(p, large_before[n]) for n, p in model.large.named_parameters())
    assert all(p.dtype == torch.float32 for _, p in model.trainable_named_parameters())  # master weights stay fp32
    changed = [n for n, p in model.trainable_named_parameters() if not torch.equal(p, trained_before[n])]
    assert len(changed) == len(trained_before)


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_saved_on_a_device_loads_to_the_same_logits(device, tmp_path):
    model = build(device)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the seed's initialization
    x = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3)).to(device)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LLMModules.from_pretrained(tmp_path / "ckpt").to(device).eval()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_training_cli_in_bf16_on_the_default_device(tmp_path):
    """The training loop as users run it: accelerate picks the GPU when there is one (the CPU otherwise), bf16 mixed
    precision, a checkpoint, and a resume that continues from it."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "llm_modules", "train", "--config", "configs/tiny-random.yaml", "--output-dir",
            str(out), "--train.mixed_precision", "bf16", "--train.eval_every", "2", "--save-every", "2"]
    for steps in (2, 4):  # own processes: accelerate's state is per process, and other tests set it without bf16
        r = subprocess.run([*args, "--max-steps", str(steps)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert all(torch.isfinite(torch.tensor(v)) for v in losses) and losses[-1] < losses[0], losses
    assert (out / "checkpoints" / "step-00000004" / "model.safetensors").exists()
