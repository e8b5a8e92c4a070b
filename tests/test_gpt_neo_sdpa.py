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
