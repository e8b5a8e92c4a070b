"""bridge.init: large: the combined model starts at the large model's own predictions (warm_start.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm_modules import LLMModules, LLMModulesConfig
from llm_modules.distill import load_teacher_head
from llm_modules.warm_start import warm_start

from tiny import LARGE, SMALL

# Final RMSNorm with unit weight and a negligible eps: |s| is the same for every token, the exact case.
EXACT_LARGE = {**LARGE["qwen2"], "rms_norm_eps": 1e-12}


def config(large: dict, small: dict, **bridge) -> LLMModulesConfig:
    return LLMModulesConfig.from_dict({"large": {"config": large}, "small": {"config": small},
                                       "bridge": {"num_heads": 4, "adapter_dim": 8, **bridge}})


def states_of(model, n: int = 24, T: int = 16, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 96, (n, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    return model.source_states(ids, mask, torch.arange(T).expand(n, T)).flatten(0, 1)


def compare(model, head, seed: int = 1) -> tuple[float, float, float]:
    """(top-1 agreement, mean KL(large || combined), largest |logit difference|) on fresh random sequences."""
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        states = model.source_states(ids, torch.ones_like(ids), torch.arange(12).expand(4, 12))
        large = states @ head.T
        ours = model(ids).logits
    lp_l, lp_c = F.log_softmax(large, -1), F.log_softmax(ours, -1)
    kl = float((lp_l.exp() * (lp_l - lp_c)).sum(-1).mean())
    return float((large.argmax(-1) == ours.argmax(-1)).float().mean()), kl, float((large - ours).abs().max())


@pytest.mark.parametrize("small, residual, gate", [
    ("gpt_neo", "paper", "learned"), ("gpt2", "plain", "fixed"), ("llama", "paper", "none"),
    ("qwen2", "plain", "learned")])
def test_exact_when_the_small_model_is_wide_enough(small, residual, gate):
    wide = {**SMALL[small], **({"n_embd": 64} if small == "gpt2" else {"hidden_size": 64})}
    model = LLMModules.from_config(config(EXACT_LARGE, wide, residual=residual, gate=gate)).eval()
    cfg = model.config
    head = load_teacher_head(cfg)
    before = compare(model, head)
    report = warm_start(model, head, states_of(model))
    assert report["rank"] == 48  # nothing truncated: 64 - 2 >= 48
    agree, kl, diff = compare(model, head)
    assert agree == 1.0 and kl < 1e-6 and diff < 1e-4, (before, (agree, kl, diff))


def test_narrow_small_model_reports_agreement_above_a_floor():
    model = LLMModules.from_config(config(LARGE["qwen2"], SMALL["gpt_neo"])).eval()  # 48 -> 32: truncated
    head = load_teacher_head(model.config)
    random_agree, random_kl, _ = compare(model, head)
    report = warm_start(model, head, states_of(model, n=64))
    agree, kl, _ = compare(model, head)
    assert report["rank"] == 30  # 32 - the mean (LayerNorm) - the constant channel
    assert agree >= 0.5 and agree > random_agree + 0.3 and kl < random_kl / 4, (random_agree, random_kl, agree, kl)


def test_a_stored_fisher_metric_is_computed_once_and_gives_the_same_fit(tmp_path, monkeypatch):
    """The warm-start arms of an experiment suite (one process each) share the metric through the feature cache."""
    from llm_modules import warm_start as ws

    def fitted(n: int = 64, **kw) -> dict:
        torch.manual_seed(0)
        model = LLMModules.from_config(config(LARGE["qwen2"], SMALL["gpt_neo"])).eval()
        warm_start(model, load_teacher_head(model.config), states_of(model, n=n), **kw)
        return {k: v.clone() for k, v in model.state_dict().items()}

    direct = fitted()
    computed, original = [], ws.fisher_metric
    monkeypatch.setattr(ws, "fisher_metric", lambda *a: computed.append(1) or original(*a))
    first, second = fitted(fisher=ws.stored_fisher_metric(tmp_path)), fitted(fisher=ws.stored_fisher_metric(tmp_path))
    assert len(computed) == 1 and len(list(tmp_path.glob("warm-start-fisher-*.safetensors"))) == 1
    for k in direct:
        assert torch.equal(direct[k], first[k]) and torch.equal(first[k], second[k]), k
    fitted(32, fisher=ws.stored_fisher_metric(tmp_path))  # other states: another metric, not the stored one
    assert len(computed) == 2 and len(list(tmp_path.glob("warm-start-fisher-*.safetensors"))) == 2


def test_paper_init_is_unchanged_and_large_init_changes_only_trainable_weights(tmp_path):
    from llm_modules.train import setup

    base = LLMModulesConfig.from_yaml("configs/tiny-random.yaml")
    ref = {n: p.clone() for n, p in LLMModules.from_config(base).trainable_named_parameters()}
    for init in ("paper", "large"):
        cfg = base.replace(bridge={"init": init}, train={"output_dir": str(tmp_path / init), "num_threads": 1})
        run = setup(cfg, resume=False, log=lambda *a: None)
        got = {n: p.cpu() for n, p in run.unwrapped.trainable_named_parameters()}  # on a GPU if there is one
        same = [n for n in ref if torch.equal(ref[n], got[n])]
        if init == "paper":  # bit-identical to the initialization without the option
            assert len(same) == len(ref)
        else:
            assert len(same) < len(ref) and set(got) == set(ref)


def test_training_from_large_init_lowers_the_loss_and_keeps_the_large_model_frozen(tmp_path):
    from llm_modules.train import fit, setup

    cfg = LLMModulesConfig.from_yaml("configs/tiny-random.yaml").replace(
        bridge={"init": "large"}, train={"output_dir": str(tmp_path), "num_threads": 1, "max_steps": 6,
                                         "eval_every": 6, "warmup_steps": 0})
    run = setup(cfg, resume=False, log=lambda *a: None)
    large = {n: p.clone() for n, p in run.unwrapped.large.named_parameters()}
    fit(run)
    import json

    losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in losses if "val_loss" in r]
    assert val[-1] < val[0], val
    assert all(torch.equal(p, large[n]) for n, p in run.unwrapped.large.named_parameters())


def test_large_init_needs_the_stream_coupling_and_the_last_layer():
    from llm_modules.errors import UserError

    with pytest.raises(UserError, match="bridge.init: large needs coupling: stream"):
        config(LARGE["qwen2"], SMALL["gpt_neo"], init="large").replace(coupling="none")
    with pytest.raises(UserError, match="needs large.layer: -1"):
        config(LARGE["qwen2"], SMALL["gpt_neo"], init="large").replace(large={"layer": 1})
