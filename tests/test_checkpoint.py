"""save_pretrained / from_pretrained: only trainable weights, bit-identical round trips, refusing mismatches."""
import os

import pytest
import torch
from tiny import LARGE, SMALL, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from llm_modules import LLMModules, LLMModulesConfig, UserError
from llm_modules.checkpoint import WEIGHTS_NAME, load_tensors
from llm_modules.files import atomic_write_text


def _roundtrip(cfg, tmp_path):
    model = LLMModules.from_config(cfg).eval()
    # Perturb the trainable weights so the test cannot pass by re-initializing.
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    loaded = LLMModules.from_pretrained(tmp_path / "ckpt").eval()
    x = torch.randint(0, 96, (2, 9))
    assert torch.equal(model(x).logits, loaded(x).logits)
    return model, loaded


def test_roundtrip_inline_configs_is_bit_identical(tmp_path):
    model, _ = _roundtrip(tiny_config(), tmp_path)
    tensors, meta = load_tensors(tmp_path / "ckpt" / WEIGHTS_NAME)
    assert set(tensors) == {n for n, _ in model.trainable_named_parameters()}
    assert not any(k.startswith("large.") for k in tensors)
    assert "llm_modules" in meta


def _save_hf(tmp_path, name, cfg_dict):
    d = dict(cfg_dict)
    torch.manual_seed(3)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    hf.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_roundtrip_with_local_pretrained_models(tmp_path):
    large_dir = _save_hf(tmp_path, "large-hf", LARGE["qwen2"])
    small_dir = _save_hf(tmp_path, "small-hf", SMALL["llama"])
    cfg = LLMModulesConfig.from_dict({"large": {"name_or_path": large_dir},
                                      "small": {"name_or_path": small_dir, "pretrained": True},
                                      "bridge": {"num_heads": 4, "adapter_dim": 8}})
    model, loaded = _roundtrip(cfg, tmp_path)
    # The large model really is the saved pretrained one.
    hf = AutoModelForCausalLM.from_pretrained(large_dir)
    assert torch.equal(model.large.embed_tokens.weight, hf.model.embed_tokens.weight)


def test_random_init_is_seeded_from_the_config():
    a, b = LLMModules.from_config(tiny_config()), LLMModules.from_config(tiny_config())
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()))
    c = LLMModules.from_config(tiny_config(seed=5))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_refuses_checkpoint_for_another_model(tmp_path):
    LLMModules.from_config(tiny_config()).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UserError, match="large model"):
        LLMModules.from_pretrained(tmp_path / "ckpt", config=tiny_config(large="llama"))
    other_vocab = tiny_config().replace(large={"config": {**LARGE["qwen2"], "vocab_size": 90}})
    with pytest.raises(UserError, match="large model"):
        LLMModules.from_pretrained(tmp_path / "ckpt", config=other_vocab)
    # A config edited on disk to another small width: the weights' shapes no longer fit.
    cfg = LLMModulesConfig.from_yaml(tmp_path / "ckpt" / "config.yaml")
    edited = cfg.replace(small={"config": {**SMALL["gpt_neo"], "hidden_size": 48}})
    edited.save_yaml(tmp_path / "ckpt" / "config.yaml")
    with pytest.raises(UserError, match="small hidden size: checkpoint has 32, model has 48"):
        LLMModules.from_pretrained(tmp_path / "ckpt")


def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint directory"):
        LLMModules.from_pretrained(tmp_path)
    LLMModules.from_config(tiny_config()).save_pretrained(tmp_path / "ckpt")
    w = tmp_path / "ckpt" / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[: os.path.getsize(w) // 2])
    with pytest.raises(UserError, match="corrupt"):
        LLMModules.from_pretrained(tmp_path / "ckpt")


def test_atomic_write_keeps_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def boom(p):
        p.write_text("half")
        raise RuntimeError("killed")

    from llm_modules.files import atomic_write

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("coupling", ["stream", "none", "prompt"])
def test_checkpoints_saved_before_the_couplings_refactor_load_and_predict_the_same(coupling):
    """Tiny checkpoints (perturbed weights) saved by the code before couplings.py (commit 4fc9ee2), with the logits
    that code computed: the current code loads them and computes the same logits."""
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(__file__).parent / "fixtures" / "pre-couplings" / coupling
    expected = load_file(str(d / "expected.safetensors"))
    model = LLMModules.from_pretrained(d).eval()
    memory = {k: expected[k] for k in ("memory_ids", "memory_mask") if k in expected}
    with torch.no_grad():
        logits = model(expected["input_ids"], **memory).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
