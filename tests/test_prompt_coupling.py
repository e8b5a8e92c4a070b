"""coupling: prompt: gate closed == small model alone, cached == uncached, the large model runs once per prompt."""
import pytest
import torch
from tiny import LARGE, SMALL
from transformers import AutoConfig, AutoModelForCausalLM

from llm_modules import LLMModules, LLMModulesConfig
from llm_modules.backbones import seeded
from llm_modules.generate import SamplingConfig, stream


def cfg(small="llama", every=1, **over):
    d = {"large": {"config": LARGE["qwen2"]}, "small": {"config": {**SMALL[small], "vocab_size": 300}},
         "bridge": {"num_heads": 4, "adapter_dim": 8, "dropout": 0.0, "every": every},
         "coupling": "prompt", "small_tokenizer": "byte-level", **over}
    return LLMModulesConfig.from_dict(d)


def small_alone(c):
    d = dict(c.small.config)
    with seeded(c.bridge.seed + 2):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).eval()


def open_gates(model, value=0.7):
    with torch.no_grad():
        for g in model.bridge.layers:
            g.alpha.fill_(value)


@pytest.mark.parametrize("small", ["llama", "gpt_neo", "gpt2", "qwen2"])
def test_gate_closed_equals_the_small_model_alone(small):
    c = cfg(small)
    model = LLMModules.from_config(c).eval()
    ref = small_alone(c)
    ids = torch.randint(0, 300, (2, 9))
    memory = torch.randint(0, 96, (2, 5))
    # The same call the combined model makes: explicit mask and positions, no cache (GPT-Neo's kernels differ in the
    # last bit with a cache or without a mask).
    same = dict(attention_mask=torch.ones_like(ids), position_ids=torch.arange(9).expand(2, 9), use_cache=False)
    assert torch.equal(model(ids, memory_ids=memory).logits, ref(ids, **same).logits)
    open_gates(model)  # once open, the memory matters
    a, b = model(ids, memory_ids=memory).logits, model(ids, memory_ids=(memory + 1) % 96).logits
    assert not torch.allclose(a, b)


def test_cross_attention_every_k_blocks_and_trainable_set():
    model = LLMModules.from_config(cfg("llama", every=2))
    assert model.bridge.block_indices == [1]  # 2 small blocks, every 2nd
    names = {n for n, _ in model.trainable_named_parameters()}
    assert "bridge.layers.0.alpha" in names and "bridge.pre_proj.weight" in names
    assert not any(n.startswith("large.") for n in names)
    assert "small.embed_tokens.weight" in names  # the small model keeps its own embeddings


@pytest.mark.parametrize("small", ["llama", "gpt_neo"])
def test_cached_decoding_equals_recompute_and_large_runs_once(small):
    model = LLMModules.from_config(cfg(small)).eval()
    open_gates(model)
    ids = torch.randint(0, 300, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    memory = torch.randint(0, 96, (3, 7))
    memory_mask = torch.ones_like(memory)
    memory_mask[2, 5:] = 0
    kw = {"memory_ids": memory, "memory_mask": memory_mask}
    calls = []
    hook = model.large.register_forward_hook(lambda *a: calls.append(1))
    cached = [s.logits for s in stream(model, ids, mask, SamplingConfig(max_new_tokens=10), model_kwargs=kw)]
    assert len(calls) == 1  # the large model read the prompt once; decoding ran the small model alone
    full = [s.logits for s in stream(model, ids, mask, SamplingConfig(max_new_tokens=10), model_kwargs=kw,
                                     use_cache=False)]
    hook.remove()
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_small_side_stays_causal():
    model = LLMModules.from_config(cfg()).eval()
    open_gates(model)
    ids = torch.randint(0, 300, (1, 8))
    memory = torch.randint(0, 96, (1, 4))
    base = model(ids, memory_ids=memory).logits
    y = ids.clone()
    y[0, 6] = (y[0, 6] + 1) % 300
    assert torch.equal(model(y, memory_ids=memory).logits[:, :6], base[:, :6])


def test_save_and_load_roundtrip(tmp_path):
    model = LLMModules.from_config(cfg()).eval()
    open_gates(model, 0.3)
    model.save_pretrained(tmp_path / "c")
    again = LLMModules.from_pretrained(tmp_path / "c").eval()
    ids, memory = torch.randint(0, 300, (2, 5)), torch.randint(0, 96, (2, 4))
    assert torch.equal(model(ids, memory_ids=memory).logits, again(ids, memory_ids=memory).logits)


def test_memory_and_labels_of_prompt_coupling_examples():
    from llm_modules.data import build_datasets
    from llm_modules.prompts import encode_prompt, with_system_prompt
    from llm_modules.vocab import load_tokenizer

    c = LLMModulesConfig.from_yaml("configs/tiny-prompt.yaml")
    tok = load_tokenizer("byte-level")
    data = build_datasets(c.data, tok, log=lambda *a: None, memory_tokenizer=tok)
    for ex in data.train[:10]:
        messages = ex.record.messages
        prompt = with_system_prompt(messages[:-1], c.data.system_prompt)
        assert ex.memory_ids == encode_prompt(prompt, c.data.format, tok)
        start = len(encode_prompt(prompt, c.data.format, tok))
        assert all(x == -100 for x in ex.labels[:start])
        answer = tok.decode([x for x in ex.labels if x != -100])
        assert answer == messages[-1]["content"] + tok.eos_token


def test_trains_through_the_cli_with_and_without_the_feature_cache(tmp_path):
    from llm_modules.__main__ import main

    args = ["train", "--config", "configs/tiny-prompt.yaml", "--max-steps", "3", "--train.eval_every", "3"]
    assert main(args + ["--output-dir", str(tmp_path / "live")]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "cached"), "--train.feature_cache", "auto",
                        "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0
    import json

    last = lambda d: json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert abs(last("live")["val_loss"] - last("cached")["val_loss"]) < 1e-2
    assert main(["generate", "--checkpoint", str(tmp_path / "live"), "--prompt", "What is 1 + 1?",
                 "--max-new-tokens", "4"]) == 0


def test_a_pretrained_small_model_is_kept_whole(tmp_path):
    """The design case: a pretrained small causal LM (its own embeddings, head, tokenizer) used as it is."""
    d = {**SMALL["llama"], "vocab_size": 300, "tie_word_embeddings": True}
    mt = d.pop("model_type")
    torch.manual_seed(5)
    pretrained = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **d)).eval()
    pretrained.save_pretrained(tmp_path / "small")
    c = LLMModulesConfig.from_dict({"large": {"config": LARGE["qwen2"]},
                                    "small": {"name_or_path": str(tmp_path / "small"), "pretrained": True},
                                    "bridge": {"num_heads": 4, "adapter_dim": 8, "every": 1},
                                    "coupling": "prompt", "small_tokenizer": "byte-level"})
    model = LLMModules.from_config(c).eval()
    assert model.lm_head.weight is model.small.embed_tokens.weight  # tied, as the pretrained model has it
    ids = torch.randint(0, 300, (1, 7))
    same = dict(attention_mask=torch.ones_like(ids), position_ids=torch.arange(7)[None], use_cache=False)
    assert torch.equal(model(ids, memory_ids=torch.randint(0, 96, (1, 3))).logits, pretrained(ids, **same).logits)


def test_lr_gate_gives_the_tanh_gates_a_group_of_their_own():
    # Adam's first step moves each scalar by its group's learning rate (m / sqrt(v) = sign of the gradient).
    def first_step(lr_gate):
        model = LLMModules.from_config(cfg("llama")).train()
        groups = model.param_groups(1e-3, 1e-3, 0.0, lr_gate=lr_gate)
        opt = torch.optim.AdamW(groups)
        ids = torch.randint(0, 300, (2, 9))
        model(ids, memory_ids=torch.randint(0, 96, (2, 5)), labels=ids).loss.backward()
        opt.step()
        return groups, torch.stack([g.alpha.detach().abs() for g in model.bridge.layers])

    groups, moved = first_step(0.1)
    assert [(g["name"], g["lr"]) for g in groups] == [("bridge", 1e-3), ("gate", 0.1), ("small", 1e-3)]
    assert len(groups[1]["params"]) == 2 and all(p.dim() == 0 for p in groups[1]["params"])  # the 2 layers' alphas
    assert torch.allclose(moved, torch.full_like(moved, 0.1), rtol=1e-3)
    groups, moved = first_step(None)  # unset: the gates train with the bridge, as before
    assert [g["name"] for g in groups] == ["bridge", "small"]
    assert torch.allclose(moved, torch.full_like(moved, 1e-3), rtol=1e-3)


def test_lr_small_zero_freezes_the_small_model_and_its_head_so_only_the_memory_attention_trains():
    # Flamingo's case: the pretrained small model frozen, the loss can fall only through what it reads.
    model = LLMModules.from_config(cfg("llama")).train()
    open_gates(model, 0.3)  # open, so the memory attention's own weights get a gradient too
    before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    groups = model.param_groups(1e-3, 0.0, 0.01, lr_gate=1e-2)
    assert [g["name"] for g in groups] == ["bridge", "gate", "small"] and groups[2]["params"] == []
    opt = torch.optim.AdamW([g for g in groups if g["params"]])
    ids = torch.randint(0, 300, (2, 9))
    model(ids, memory_ids=torch.randint(0, 96, (2, 5)), labels=ids).loss.backward()
    opt.step()
    changed = {n.split(".", 1)[0] for n, p in model.trainable_named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"bridge"}
    assert all(p.grad is None for p in model.small.parameters()) and model.lm_head.weight.grad is None
    trained = model.trained_named_parameters(lr_small=0.0)
    assert {n.split(".", 1)[0] for n, _ in trained} == {"bridge"}
    assert len(trained) == len([n for n, _ in model.trainable_named_parameters() if n.startswith("bridge.")])


def test_lr_gate_is_refused_where_there_are_no_gates():
    from llm_modules.errors import UserError

    with pytest.raises(UserError, match=r"train.lr_gate: only coupling 'prompt' has tanh gates, not 'stream'"):
        cfg("llama", coupling="stream", train={"lr_gate": 1e-2})
