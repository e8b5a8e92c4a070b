"""Cached decoding equals full recompute; sampling is reproducible; stops and limits are respected."""
import pytest
import torch
from tiny import PAIRS, tiny_config

from llm_modules import LLMModules, UserError
from llm_modules.generate import IncrementalDecoder, SamplingConfig, stream
from llm_modules.row_split import prepare_for_cpu_decoding


def build(**kw):
    return LLMModules.from_config(tiny_config(**kw)).eval()


def _step_logits(model, ids, mask, use_cache, n=12):
    return [s.logits for s in stream(model, ids, mask, SamplingConfig(max_new_tokens=n), use_cache=use_cache)]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """With 2 threads the model is prepared for CPU decoding and one-row steps take row_split's bmm path; with 1,
    the model as constructed (plain linear)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("large,small", PAIRS)
def test_cached_logits_equal_recompute_batch_1(large, small, threads):
    model = build(large=large, small=small)
    if threads == 2:
        prepare_for_cpu_decoding(model)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    cached, full = _step_logits(model, ids, None, True), _step_logits(model, ids, None, False)
    assert len(cached) == len(full) == 12
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("large,small", PAIRS)
def test_cached_logits_equal_recompute_left_padded_batch_of_3(large, small):
    model = build(large=large, small=small)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (9, 4, 6)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 9 - len(p):], mask[i, 9 - len(p):] = p, 1
    cached, full = _step_logits(model, ids, mask, True), _step_logits(model, ids, mask, False)
    for a, b in zip(cached, full):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # Left padding does not change a row's result: row 1 alone, unpadded, gives the same first-step logits.
    alone = _step_logits(model, prompts[1][None], None, True, n=1)[0]
    torch.testing.assert_close(cached[0][1:2], alone, atol=1e-4, rtol=0)


def test_same_seed_same_sample_and_limits():
    model = build()
    ids = torch.randint(0, 96, (2, 5))
    kw = dict(max_new_tokens=9, do_sample=True, temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.1)
    a, b = model.generate(ids, seed=7, **kw), model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert a.shape == (2, 9) and torch.equal(a, b) and not torch.equal(a, c)
    assert model.generate(ids, max_new_tokens=0).shape == (2, 0)


def test_stops_on_eos_and_pads_finished_rows():
    model = build()
    ids = torch.randint(0, 96, (2, 5))
    free = model.generate(ids, max_new_tokens=6)
    eos = int(free[0, 2])  # make row 0's third token the eos
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=95)
    row0 = out[0].tolist()
    stop_at = row0.index(eos)
    assert stop_at <= 2 and all(t == 95 for t in row0[stop_at + 1:])
    if eos not in free[1].tolist():
        assert torch.equal(out[1, : out.shape[1]], free[1, : out.shape[1]])


class CharTok:
    """A toy tokenizer: token i is chr(97 + i % 26)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_end_generation():
    model = build()
    ids = torch.randint(0, 96, (1, 5))
    free = model.generate(ids, max_new_tokens=8)[0].tolist()
    text = CharTok().decode(free)
    out = model.generate(ids, max_new_tokens=8, stop=[text[2:4]], tokenizer=CharTok())
    assert out.shape[1] <= 4
    with pytest.raises(UserError, match="need a tokenizer"):
        model.generate(ids, max_new_tokens=2, stop=["x"])


def test_incremental_decoder_never_splits_multibyte_characters():
    from llm_modules.vocab import load_tokenizer

    tok = load_tokenizer("byte-level")
    text = "naïve café — 数学 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_bad_sampling_settings_are_user_errors():
    model = build()
    with pytest.raises(UserError, match="temperature"):
        model.generate(torch.randint(0, 96, (1, 3)), do_sample=True, temperature=0.0)
