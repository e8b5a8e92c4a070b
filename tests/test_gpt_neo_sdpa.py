"""GPT-Neo attention through SDPA (llm_modules/gpt_neo_sdpa.py) computes what the eager attention computes."""
import copy

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from llm_modules.gpt_neo_sdpa import GPTNeoEagerAttention, GPTNeoSDPAAttention, no_host_copies, use_sdpa


def tiny_neo(window: int = 4) -> GPTNeoForCausalLM:
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       attention_types=[[["global", "local"], 1]], window_size=window, max_position_embeddings=64,
                       attention_dropout=0.0, resid_dropout=0.0, embed_dropout=0.0)
    return GPTNeoForCausalLM(cfg).eval()


def test_switches_every_attention_and_keeps_weights():
    eager = tiny_neo()
    fast = copy.deepcopy(eager)
    assert use_sdpa(fast) == 2
    assert all(type(b.attn.attention) is GPTNeoSDPAAttention for b in fast.transformer.h)
    assert use_sdpa(fast) == 0  # already switched
    for (n, a), (_, b) in zip(eager.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("left_pad", [0, 3])
def test_same_logits_and_gradients_as_eager(left_pad):
    """Sequences longer than the local window (so the window matters), with and without left padding."""
    eager = tiny_neo(window=4)
    fast = copy.deepcopy(eager)
    use_sdpa(fast)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = []
    for model in (eager, fast):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        outs.append((logits, [p.grad.clone() for p in model.parameters()]))
    keep = mask.bool()
    torch.testing.assert_close(outs[1][0][keep], outs[0][0][keep], rtol=1e-4, atol=1e-5)
    for g_fast, g_eager in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g_fast, g_eager, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(outs[1][0]).all()  # padding rows too: an additive mask, no NaN


def test_the_window_is_applied():
    """A local layer must not see past its window: a change to token 0 does not reach position 11 through a
    local-only model."""
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                       attention_types=[[["local"], 1]], window_size=4, max_position_embeddings=64)
    model = GPTNeoForCausalLM(cfg).eval()
    use_sdpa(model)
    ids = torch.randint(1, 50, (1, 12))
    other = ids.clone()
    other[0, 0] = 0
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    torch.testing.assert_close(a[0, 11], b[0, 11])
    assert not torch.allclose(a[0, 1], b[0, 1])


def test_cached_decoding_matches_eager():
    eager = tiny_neo(window=4)
    fast = copy.deepcopy(eager)
    use_sdpa(fast)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    got = [m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0) for m in (eager, fast)]
    assert torch.equal(got[0], got[1])


def test_eager_attention_without_host_copies_is_bit_for_bit_transformers():
    """GPTNeoEagerAttention (what LLMModules builds) gives exactly transformers' eager logits and gradients, padded
    or not, and use_sdpa still switches it."""
    eager = tiny_neo(window=4)
    ours = copy.deepcopy(eager)
    assert no_host_copies(ours) == 2 and no_host_copies(ours) == 0
    assert all(type(b.attn.attention) is GPTNeoEagerAttention for b in ours.transformer.h)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    outs = []
    for model in (eager, ours):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits.logsumexp(-1).sum().backward()
        outs.append((logits, [p.grad for p in model.parameters()]))
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1]))
    assert use_sdpa(ours) == 2


def _sdpa_calls(monkeypatch):
    """Record (has a mask, is_causal) of every scaled_dot_product_attention call of gpt_neo_sdpa."""
    import llm_modules.gpt_neo_sdpa as module

    calls, real = [], module.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask is not None, kw.get("is_causal", False)))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(module.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("left_pad", [0, 3])
def test_global_layers_without_padding_run_is_causal_with_no_mask(monkeypatch, left_pad):
    """Without padding the global layer builds no mask (is_causal); the local layer, longer than its window, keeps
    its window mask; with padding both get a mask. Outputs equal eager's either way (the test above)."""
    model = tiny_neo(window=4)
    use_sdpa(model)
    calls = _sdpa_calls(monkeypatch)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == ([(False, True), (True, False)] if left_pad == 0 else [(True, False), (True, False)])


def test_window_longer_than_the_sequence_and_one_new_position_need_no_mask(monkeypatch):
    eager = tiny_neo(window=16)
    fast = copy.deepcopy(eager)
    use_sdpa(fast)
    calls = _sdpa_calls(monkeypatch)
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(4))
    got = [m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True) for m in (eager, fast)]
    assert torch.equal(got[0].sequences, got[1].sequences)
    for a, b in zip(got[0].scores, got[1].scores):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert calls and not any(has_mask for has_mask, _ in calls)  # prefill is_causal, each new token no mask


def test_combined_model_with_sdpa_small_decodes_as_eager_without_syncs():
    """The paper's pairing (Qwen2 large, GPT-Neo small), a left-padded batch of 3: the same step logits with the small
    model's attention switched to SDPA, and no host synchronization inside a decode step."""
    from tiny import tiny_config

    from llm_modules import LLMModules
    from llm_modules.generate import SamplingConfig, stream
    from llm_modules.host_syncs import SyncCounter

    eager = LLMModules.from_config(tiny_config()).eval()
    fast = copy.deepcopy(eager)
    assert use_sdpa(fast.small) == 2
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, n in enumerate((9, 4, 6)):
        ids[i, 9 - n:], mask[i, 9 - n:] = torch.randint(0, 96, (n,), generator=g), 1
    runs = [[s.logits for s in stream(m, ids, mask, SamplingConfig(max_new_tokens=8), use_cache=use_cache)]
            for m, use_cache in ((eager, True), (fast, True), (fast, False))]
    for steps in runs[1:]:
        for a, b in zip(runs[0], steps):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        cache = fast.new_cache()
        fast(ids, mask, cache=cache, logits_to_keep=1)
        with SyncCounter() as syncs:
            fast(ids[:, -1:], torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1), cache=cache, logits_to_keep=1)
    assert syncs.total == 0
