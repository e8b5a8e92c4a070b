"""The combined model: causality, freezing, the bridge's math, length limits, save/load."""
import math

import pytest
import torch
from tiny import PAIRS, SMALL, tiny_config

import llm_modules.bridge as bridge_mod
from llm_modules import LLMModules, LLMModulesConfig, UserError
from llm_modules.bridge import cross_attention_mask


def build(cfg=None, **kw):
    torch.manual_seed(0)
    return LLMModules.from_config(cfg or tiny_config(**kw)).eval()


@pytest.mark.parametrize("large,small", PAIRS)
def test_future_tokens_never_change_past_logits(large, small):
    model = build(large=large, small=small)
    T = 10
    x = torch.randint(0, 96, (2, T), generator=torch.Generator().manual_seed(1))
    base = model(x).logits
    for t in range(T - 1):
        for k in (1, T - 1 - t):
            y = x.clone()
            y[:, t + k] = (y[:, t + k] + 1 + k) % 96
            out = model(y).logits
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), (t, k)
            assert not torch.equal(out[:, t + k], base[:, t + k])  # the change does reach its own position


def _train_on_uniform_tokens(steps=150, V=64, T=16):
    cfg = LLMModulesConfig.from_dict({
        "large": {"config": {"model_type": "qwen2", "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}},
        "small": {"config": {**SMALL["gpt_neo"], "num_layers": 1, "attention_types": [[["global"], 1]]}},
        "bridge": {"num_heads": 4, "adapter_dim": 16, "dropout": 0.0},
    })
    model = LLMModules.from_config(cfg).train()
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randint(0, V, (16, T), generator=g)  # fresh i.i.d. tokens: nothing to learn
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-50:]) / 50, math.log(V)


def test_uniform_random_tokens_stay_at_the_causal_floor(monkeypatch):
    mean, floor = _train_on_uniform_tokens()
    assert abs(mean - floor) < 0.05, (mean, floor)
    # Control: the reference's padding-only mask lets the same training beat the floor, so this test can fail.
    monkeypatch.setattr(bridge_mod, "cross_attention_mask",
                        lambda valid, n: torch.ones(valid.shape[0], n, valid.shape[1], dtype=torch.bool))
    leaky, _ = _train_on_uniform_tokens()
    assert leaky < floor - 0.2, leaky


def test_cross_attention_mask_is_causal_and_skips_padding():
    valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = cross_attention_mask(valid, 5)[0]
    for t in range(5):
        for s in range(5):
            assert bool(m[t, s]) == ((s <= t and s >= 2) or s == t)
    # With a cache: the last query sees everything valid.
    assert cross_attention_mask(valid, 1)[0, 0].tolist() == [False, False, True, True, True]


def test_bridge_matches_a_naive_per_query_loop():
    model = build(gate="learned")
    br = model.bridge
    B, T, D = 2, 6, 48
    source = torch.randn(B, T, D)
    valid = torch.ones(B, T, dtype=torch.long)
    valid[0, :2] = 0
    out = br(source, valid)
    # Recompute every query on its own, with an explicit softmax over allowed source positions.
    pre = br.pre_proj(source)
    x = br.ffn(pre)
    for layer in br.layers:
        ca = layer.cross_attn
        k = ca.k_proj(ca.norm_source(pre))
        v = ca.v_proj(ca.norm_source(pre))
        q = ca.q_proj(ca.norm_x(x))
        H, hd = ca.num_heads, ca.head_dim
        rows = []
        for b in range(B):
            for t in range(T):
                allowed = [s for s in range(t + 1) if valid[b, s]] or [t]
                heads = []
                for h in range(H):
                    qh = q[b, t, h * hd:(h + 1) * hd]
                    kh = k[b, allowed, h * hd:(h + 1) * hd]
                    vh = v[b, allowed, h * hd:(h + 1) * hd]
                    w = torch.softmax(kh @ qh / math.sqrt(hd), dim=0)
                    heads.append(w @ vh)
                rows.append(torch.cat(heads))
        attn = ca.out_proj(torch.stack(rows).view(B, T, -1))
        a = layer.adapter(attn)
        g = torch.sigmoid(layer.gate(torch.cat([x, a], -1)))
        x = x + (g * a + (1 - g) * x)  # the paper's double residual
    expected = x + br.proj(pre)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gate_fixed_at_zero_with_plain_residual_equals_no_cross_attention():
    closed = build(gate="fixed", gate_value=0.0, residual="plain")
    none = build(num_layers=0)
    none.load_state_dict({k: v for k, v in closed.state_dict().items() if not k.startswith("bridge.layers.")})
    x = torch.randint(0, 96, (2, 7))
    torch.testing.assert_close(closed(x).logits, none(x).logits, atol=0, rtol=0)


def test_gate_modes_change_the_parameter_set():
    names = lambda m: {n for n, _ in m.trainable_named_parameters()}  # noqa: E731
    assert "bridge.layers.0.gate.weight" in names(build(gate="learned"))
    assert not any(".gate." in n for n in names(build(gate="fixed")))
    assert not any(".gate." in n for n in names(build(gate="none")))
    fixed = build(gate="fixed", gate_value=0.5)
    assert fixed(torch.randint(0, 96, (1, 5))).logits.isfinite().all()


def test_exact_trainable_set_and_frozen_large():
    model = build()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.trainable_named_parameters()}
    layer = ["cross_attn.norm_source", "cross_attn.norm_x", "cross_attn.q_proj", "cross_attn.k_proj",
             "cross_attn.v_proj", "cross_attn.out_proj", "adapter.fc1", "adapter.fc2", "adapter.norm", "gate"]
    expected = {f"bridge.{m}.{w}" for m in ["pre_proj", "proj", "ffn.0", "ffn.1", "ffn.3", "ffn.4"]
                for w in ("weight", "bias")}
    expected |= {f"bridge.layers.{i}.{m}.{w}" for i in range(2) for m in layer for w in ("weight", "bias")}
    expected |= {"lm_head.weight"}
    expected |= {"small." + n for n, _ in model.small.named_parameters()}
    assert trainable == expected
    assert not any(n.startswith("small.wte") for n in trainable)  # the small model's token table is gone
    assert all(not p.requires_grad for p in model.large.parameters())
    assert not hasattr(model.large, "lm_head")  # the large LM head is never even built
    # Optimizer groups cover exactly the trainable set, bridge and small at their own learning rates.
    groups = model.param_groups(1e-4, 5e-5, 0.0)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_a_step_changes_trainable_weights_only():
    model = build()
    model.train()
    assert not model.large.training  # frozen stays in eval mode
    before_large = {n: p.clone() for n, p in model.large.named_parameters()}
    before_train = {n: p.clone() for n, p in model.trainable_named_parameters()}
    opt = torch.optim.AdamW(model.param_groups(1e-2, 1e-2, 0.01))
    x = torch.randint(0, 96, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    assert all(torch.equal(p, before_large[n]) for n, p in model.large.named_parameters())
    changed = [n for n, p in model.trainable_named_parameters() if not torch.equal(p, before_train[n])]
    assert len(changed) == len(before_train)


def test_lr_head_puts_the_head_in_a_group_of_its_own_and_zero_freezes_it():
    model = build()
    groups = model.param_groups(1e-4, 5e-5, 0.0, lr_head=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("bridge", 1e-4), ("small", 5e-5), ("lm_head", 1e-3)]
    assert groups[2]["params"] == [model.lm_head.weight]
    model = build()
    groups = model.param_groups(1e-2, 1e-2, 0.01, lr_head=0)
    assert [g["name"] for g in groups] == ["bridge", "small"] and not model.lm_head.weight.requires_grad
    assert sum(len(g["params"]) for g in groups) == len(model.trainable_named_parameters()) - 1
    head = model.lm_head.weight.clone()
    model.train()
    opt = torch.optim.AdamW(groups)
    x = torch.randint(0, 96, (2, 8))
    model(x, labels=x).loss.backward()
    opt.step()
    assert model.lm_head.weight.grad is None and torch.equal(model.lm_head.weight, head)
    assert "lm_head.weight" in dict(model.trainable_named_parameters())  # frozen, still saved with the rest


def test_lr_head_is_refused_for_a_head_tied_to_the_small_models_embedding():
    model = build()
    model.small.tied_head = model.lm_head  # as a pretrained small model's own tied head (coupling prompt)
    with pytest.raises(UserError, match=r"train.lr_head: .*\(tied\)"):
        model.param_groups(1e-4, 5e-5, 0.0, lr_head=0)
    assert len(model.param_groups(1e-4, 5e-5, 0.0)) == 2  # unset: the head trains with the small model


def test_labels_loss_matches_hugging_face_convention():
    model = build()
    x = torch.randint(0, 96, (2, 8))
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 96)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_too_long_for_learned_positions_is_a_clear_error():
    model = build(small="gpt_neo")  # 64 learned positions
    model(torch.randint(0, 96, (1, 64)))
    with pytest.raises(UserError, match="65 tokens exceeds the small model's 64 learned positions"):
        model(torch.randint(0, 96, (1, 65)))
    rotary = build(small="llama")
    assert rotary(torch.randint(0, 96, (1, 80))).logits.shape == (1, 80, 96)


def test_bad_source_layer_is_rejected():
    with pytest.raises(UserError, match="large.layer: 7 is out of range"):
        LLMModules.from_config(tiny_config().replace(large={"layer": 7}))
    mid = LLMModules.from_config(tiny_config().replace(large={"layer": 1}))
    assert mid(torch.randint(0, 96, (1, 5))).logits.shape == (1, 5, 96)


def test_small_alone_baseline_has_its_own_embeddings_and_no_large_model():
    alone = build(tiny_config().replace(coupling="none"))
    combined = build()
    assert alone.large is None and not list(alone.bridge.parameters())  # no large model, no bridge weights
    names = {n for n, _ in alone.trainable_named_parameters()}
    assert "small.wte.weight" in names and not any(n.startswith("bridge.") for n in names)
    assert alone.small.wte.weight.shape == (96, 32)
    # Same small model: every small block parameter has the same name and shape in both arms.
    blocks = lambda m: {n: p.shape for n, p in m.small.named_parameters() if ".h." in n}  # noqa: E731
    assert blocks(alone) == blocks(combined)
    x = torch.randint(0, 96, (2, 8))
    out = alone(x, labels=x)
    assert out.logits.shape == (2, 8, 96) and out.loss.isfinite()
    # Causal and cacheable like the combined model.
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 96
    assert torch.equal(alone(y).logits[:, :5], out.logits[:, :5])
    torch.testing.assert_close(alone.generate(x, max_new_tokens=4), alone.generate(x, max_new_tokens=4, use_cache=False))


def test_loss_without_full_logits_equals_the_full_loss():
    model = build()
    x = torch.randint(0, 96, (3, 9))
    labels = x.clone()
    labels[0, :4] = -100
    labels[2, 6:] = -100
    full = model(x, labels=labels)
    lean = model(x, labels=labels, return_logits=False)
    assert lean.logits is None and lean.num_targets == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(lean.loss, full.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lean.loss_sum, full.loss * lean.num_targets, atol=1e-5, rtol=1e-6)


def test_gradient_checkpointing_of_the_small_model_gives_the_same_gradients():
    plain = build()
    ckpt = LLMModules.from_config(tiny_config().replace(small={"gradient_checkpointing": True}))
    x = torch.randint(0, 96, (2, 8))
    for m in (plain, ckpt):
        m.train()
        m(x, labels=x).loss.backward()
    assert ckpt.small.is_activation_checkpointing and not plain.small.is_activation_checkpointing
    for (n, p), (_, q) in zip(plain.trainable_named_parameters(), ckpt.trainable_named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)
