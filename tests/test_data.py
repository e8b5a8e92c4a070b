"""Data: record shapes, rendering, assistant-only labels with eos, split, length filter, batching, bad input."""
import json
import statistics
from pathlib import Path

import pytest
import torch

from llm_modules.config import DataConfig
from llm_modules.reasoning_tasks import STEP_BY_STEP_TASKS, solution_text
from llm_modules.data import (IGNORE_INDEX, Example, LengthGroupedBatches, build_datasets, collate,
                              normalize, read_records, split_indices, tokenize)
from llm_modules.errors import UserError
from llm_modules.prompts import PAPER_SYSTEM_PROMPT, encode_prompt, render_prompt, resolve_system_prompt
from llm_modules.vocab import load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_chat.jsonl"
GSM8K_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
CHAT = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5"},
        {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "5 * 4 = 20 ✓"}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte-level")


def cfg(**kw):
    return DataConfig(**{"path": str(FIXTURE), "system_prompt": "", **kw})


def quiet(_msg):
    pass


# ---- tokenizer ----------------------------------------------------------------------------------------------
def test_byte_level_tokenizer(tok):
    assert len(tok) == 259 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = "Grüße, 数学 🤖\n\n\tspaces  and <tags> ...\r\n"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok(text)["input_ids"][:3] == list("Grü".encode()[:3])  # id == byte value
    prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_load_tokenizer_missing_path_names_it(tmp_path):
    with pytest.raises(UserError, match="no-such-tokenizer"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))


# ---- record shapes ------------------------------------------------------------------------------------------
def test_record_shapes():
    share = {"system": "S", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalize(share) == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]
    oai = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert normalize(oai) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    gsm = {"question": "q?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"}
    assert normalize(gsm)[1] == {"role": "assistant", "content": "1 + 1 = <<1+1=2>>2\n#### 2"}
    assert normalize({"text": "hello"}) == [{"role": "assistant", "content": "hello"}]


def test_fixture_parses_every_shape():
    records = read_records(str(FIXTURE))
    assert len(records) == 60 and all(r.line == i for i, r in enumerate(records, 1))
    kinds = {tuple(json.loads(line)) for line in FIXTURE.read_text(encoding="utf-8").splitlines()}
    assert {k[0] for k in kinds} >= {"conversations", "messages", "question", "text"}


def test_json_and_parquet_readers(tmp_path):
    recs = [{"text": "a"}, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}]
    (tmp_path / "list.json").write_text(json.dumps(recs, indent=2))
    (tmp_path / "wrapped.json").write_text(json.dumps({"meta": {"x": [1]}, "data": recs}, indent=1))
    for name in ("list.json", "wrapped.json"):
        got = read_records(str(tmp_path / name))
        assert [r.messages for r in got] == [normalize(r) for r in recs]
    assert [r.line for r in read_records(str(tmp_path / "list.json"))] == [2, 5]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "#### 1"}] * 2), tmp_path / "t.parquet")
    assert [r.line for r in read_records(str(tmp_path / "t.parquet"))] == [1, 2]


@pytest.mark.skipif(not GSM8K_TRAIN.exists(), reason="shared GSM8K not present")
def test_gsm8k_record_parses(tok):
    first = json.loads(GSM8K_TRAIN.open(encoding="utf-8").readline())
    messages = normalize(first)
    assert messages[1]["content"] == first["answer"] and messages[1]["content"].splitlines()[-1].startswith("#### ")
    bundle = build_datasets(DataConfig(path=str(GSM8K_TRAIN), max_examples=4, val_fraction=0.0), tok, log=quiet)
    assert len(bundle.train) == 4 and bundle.stats["records"] == 4


# ---- rendering and labels -----------------------------------------------------------------------------------
def labelled_text(tok, ex):
    return tok.decode([t for t in ex.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("style", ["paper", "chat_template"])
def test_labels_cover_exactly_assistant_turns_plus_eos(tok, style):
    ex = tokenize(CHAT, tok, style=style, system_prompt="Be brief.")
    assert labelled_text(tok, ex) == "2 + 3 = 5<|im_end|>5 * 4 = 20 ✓<|im_end|>"
    # Masked tokens are exactly the rest of the text, and labels are not shifted.
    assert all(y in (t, IGNORE_INDEX) for t, y in zip(ex.input_ids, ex.labels, strict=True))
    rest = tok.decode([t for t, y in zip(ex.input_ids, ex.labels, strict=True) if y == IGNORE_INDEX])
    assert "2 + 3 = 5" not in rest and "What is 2 + 3?" in rest and "Be brief." in rest
    assert [y for y in ex.labels if y != IGNORE_INDEX][-1] == tok.eos_token_id


def test_paper_format_text(tok):
    ex = tokenize(CHAT[:2], tok, style="paper", system_prompt="paper")
    expected = f"System:\n\n{PAPER_SYSTEM_PROMPT}\n\nUser:\n\nWhat is 2 + 3?\n\nAssistant:\n\n2 + 3 = 5<|im_end|>"
    assert tok.decode(ex.input_ids) == expected
    assert "'\\n\\n'" in PAPER_SYSTEM_PROMPT and PAPER_SYSTEM_PROMPT.startswith("**Your role")


@pytest.mark.parametrize("style", ["paper", "chat_template"])
def test_prompt_is_training_prefix(tok, style):
    for cut in (1, 3):
        full = tokenize(CHAT[: cut + 1], tok, style=style, system_prompt="S")
        prompt_ids = encode_prompt([{"role": "system", "content": "S"}] + CHAT[:cut], style, tok)
        assert full.input_ids[: len(prompt_ids)] == prompt_ids
        history = "" if cut == 1 else "2 + 3 = 5<|im_end|>"  # earlier answers keep their labels
        assert labelled_text(tok, Example(full.input_ids, full.labels[: len(prompt_ids)])) == history
        assert full.labels[len(prompt_ids)] != IGNORE_INDEX  # the answer starts right after the prompt
    assert render_prompt(CHAT[:1], "paper", tok) == "User:\n\nWhat is 2 + 3?\n\nAssistant:\n\n"


def test_prompt_prefix_with_merges_across_the_boundary():
    # GPT-2-style pre-tokenization splits "\n\n5" as "\n" + "\n5" but a prompt's final "\n\n" as one piece.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llm_modules.vocab import _bytes_to_unicode

    nl = _bytes_to_unicode()[10]
    vocab = {c: b for b, c in _bytes_to_unicode().items()} | {nl + nl: 256, "<eos>": 257}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[(nl, nl)]))
    core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")
    prompt = render_prompt(CHAT[:1], "paper", tok)
    naive = tok(prompt)["input_ids"]
    assert tok(prompt + "2")["input_ids"][: len(naive)] != naive  # why the text is not encoded in one piece
    ex = tokenize(CHAT[:2], tok, system_prompt="")
    prompt_ids = encode_prompt(CHAT[:1], "paper", tok)
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids and prompt_ids[-1] == 256
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "2 + 3 = 5<eos>"


def test_eos_kept_when_pad_is_eos():
    tok = load_tokenizer("byte-level")
    tok.pad_token = tok.eos_token
    ex = tokenize(CHAT[:2], tok, system_prompt="")
    assert tok.pad_token_id == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    short = tokenize([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tok, system_prompt="")
    batch = collate([ex, short], tok.pad_token_id)
    assert batch["labels"][1, len(short) - 1] == tok.eos_token_id and batch["labels"][1, len(short)] == IGNORE_INDEX


def test_loss_on_all_and_plain_text(tok):
    ex = tokenize(CHAT, tok, loss_on="all")
    assert ex.labels == ex.input_ids
    plain = tokenize([{"role": "assistant", "content": "free text"}], tok, system_prompt="paper")
    assert tok.decode(plain.input_ids) == "free text<|im_end|>" and plain.labels == plain.input_ids


def test_system_prompt_resolution(tok):
    assert resolve_system_prompt("paper") == PAPER_SYSTEM_PROMPT and resolve_system_prompt("") is None
    assert resolve_system_prompt("Be brief.") == "Be brief."
    own = [{"role": "system", "content": "Mine."}] + CHAT[:2]
    assert "Mine." in tok.decode(tokenize(own, tok, system_prompt="paper").input_ids)
    assert "Your role" not in tok.decode(tokenize(own, tok, system_prompt="paper").input_ids)
    assert tok.decode(tokenize(CHAT[:2], tok, system_prompt="").input_ids).startswith("User:")


# ---- datasets -----------------------------------------------------------------------------------------------
def test_length_filter_counts(tok):
    lengths = [len(tokenize(r.messages, tok, system_prompt="")) for r in read_records(str(FIXTURE))]
    limit = sorted(lengths)[len(lengths) // 2]
    b = build_datasets(cfg(max_length=limit, val_fraction=0.0), tok, log=quiet)
    assert b.stats["train_too_long"] == sum(n > limit for n in lengths) > 0
    assert len(b.train) == sum(n <= limit for n in lengths) and max(map(len, b.train)) <= limit
    with pytest.raises(UserError, match=r"60 longer than data.max_length=2"):
        build_datasets(cfg(max_length=2, val_fraction=0.0), tok, log=quiet)


def test_split_fixed_by_seed_and_disjoint(tok):
    train, val = split_indices(100, 0.2, seed=3)
    assert len(val) == 20 and not set(train) & set(val) and sorted(train + val) == list(range(100))
    assert split_indices(100, 0.2, seed=3) == (train, val) and split_indices(100, 0.2, seed=4) != (train, val)
    a = build_datasets(cfg(val_fraction=0.2, seed=1), tok, log=quiet)
    b = build_datasets(cfg(val_fraction=0.2, seed=1), tok, log=quiet)
    assert [e.input_ids for e in a.val] == [e.input_ids for e in b.val] and len(a.val) == 12
    assert not {tuple(e.input_ids) for e in a.val} & {tuple(e.input_ids) for e in a.train}


def test_val_path_and_max_examples(tok, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "held out"}) + "\n")
    b = build_datasets(cfg(val_path=str(val), max_examples=10), tok, log=quiet)
    assert len(b.train) == 10 and len(b.val) == 1


def test_duplicates_dropped_before_split(tok, tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text((json.dumps({"text": "same"}) + "\n") * 5 + json.dumps({"text": "other"}) + "\n")
    b = build_datasets(cfg(path=str(p), val_fraction=0.5), tok, log=quiet)
    assert b.stats["duplicates"] == 4 and len(b.train) + len(b.val) == 2


# ---- bad input ----------------------------------------------------------------------------------------------
BAD_LINES = {
    "invalid JSON": b'{"text": "a"\n',
    "missing field": b'{"prompt": "a"}\n',
    "unknown role": b'{"messages": [{"role": "bot", "content": "a"}]}\n',
    "empty assistant": b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]}\n',
    "UTF-8": b'{"text": "caf\xe9"}\n',
    "no assistant": b'{"messages": [{"role": "user", "content": "q"}]}\n',
    "missing field 'messages[0].content'": b'{"messages": [{"role": "user"}]}\n',
}


@pytest.mark.parametrize("problem", BAD_LINES)
def test_bad_record_names_file_and_line(tmp_path, problem):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "fine"}\n\n' + BAD_LINES[problem])
    with pytest.raises(UserError) as e:
        read_records(str(p))
    assert f"{p}:3:" in str(e.value) and problem in str(e.value) and "skip_bad" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="missing.jsonl: file does not exist"):
        read_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"data.csv: unsupported file type \.csv"):
        read_records(str(tmp_path / "data.csv"))
    (tmp_path / "broken.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(UserError, match=r"broken.json:3: invalid JSON"):
        read_records(str(tmp_path / "broken.json"))
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"txt": "b"}\n]')
    with pytest.raises(UserError, match=r"bad.json:3: missing field"):
        read_records(str(tmp_path / "bad.json"))


def test_skip_bad_counts_and_returns(tok, tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(FIXTURE.read_bytes() + b"".join(BAD_LINES.values()))
    b = build_datasets(cfg(path=str(p), skip_bad=True), tok, log=quiet)
    assert b.stats["malformed"] == len(BAD_LINES) == len(b.skipped)
    assert [line for _, line, _ in b.skipped] == list(range(61, 61 + len(BAD_LINES)))
    assert all(src == str(p) for src, _, _ in b.skipped) and len(b.train) + len(b.val) == 60


def test_test_derived_sources_refused(tok):
    with pytest.raises(UserError, match="gsm_symbolic.*GSM8K test"):
        build_datasets(DataConfig(reasoning_gym_tasks=["chain_sum", "gsm_symbolic"]), tok, log=quiet)
    with pytest.raises(UserError, match="GSM8K test"):
        build_datasets(DataConfig(path="../shared/data/gsm8k/test.jsonl"), tok, log=quiet)
    with pytest.raises(UserError, match="no training data"):
        build_datasets(DataConfig(), tok, log=quiet)


# ---- reasoning-gym ------------------------------------------------------------------------------------------
def test_reasoning_gym_examples(tok):
    pytest.importorskip("reasoning_gym")
    b = build_datasets(DataConfig(reasoning_gym_tasks=["chain_sum", "word_sorting"], reasoning_gym_size=10,
                                  system_prompt="", val_fraction=0.0), tok, log=quiet)
    assert len(b.train) >= 18 and all(any(y != IGNORE_INDEX for y in e.labels) for e in b.train)


def test_reasoning_gym_solutions_reach_the_answer():
    rg = pytest.importorskip("reasoning_gym")
    for task in STEP_BY_STEP_TASKS:
        items = list(rg.create_dataset(task, size=20, seed=0))
        texts = [solution_text(task, it) for it in items]
        answers = [str(it["answer"]) for it in items]
        assert all(t.endswith(f"\n#### {a}") or t == a for t, a in zip(texts, answers, strict=True))
        assert sum("\n#### " in t for t in texts) >= 18, task  # steps rendered for (almost) all
    item = rg.create_dataset("chain_sum", size=1, seed=0)[0]
    assert solution_text("chain_sum", item) == "1663 - 5242 = -3579\n-3579 - 9376 = -12955\n" \
        "-12955 - 8961 = -21916\n-21916 + 7634 = -14282\n#### -14282"


# ---- batching -----------------------------------------------------------------------------------------------
def test_collate_pads_right(tok):
    a, b = tokenize(CHAT, tok), tokenize(CHAT[:2], tok)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    assert all(v.dtype == torch.long and v.shape == (2, len(a)) for v in batch.values())
    assert batch["attention_mask"][1].sum() == len(b) and (batch["input_ids"][1, len(b):] == tok.pad_token_id).all()
    assert batch["labels"][1, : len(b)].tolist() == b.labels and (batch["labels"][1, len(b):] == IGNORE_INDEX).all()


def mean_padding(batches, lengths):
    return statistics.mean(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches():
    import random

    lengths = [random.Random(i).randint(5, 500) for i in range(1003)]
    s = LengthGroupedBatches(lengths, batch_size=8, seed=0, chunk_batches=10)
    e0, e1 = s.batches(0), s.batches(1)
    assert len(s) == len(e0) == 126 and sorted(i for b in e0 for i in b) == list(range(1003))
    assert e0 == LengthGroupedBatches(lengths, 8, seed=0, chunk_batches=10).batches(0) and e0 != e1
    s.set_epoch(1)
    assert list(s) == e1 and list(s.iter_from(1, 50)) == e1[50:] and list(s.iter_from(0, 0)) == e0
    order = list(range(1003))
    random.Random(0).shuffle(order)
    naive = [order[i : i + 8] for i in range(0, 1003, 8)]
    assert mean_padding(e0, lengths) < 0.5 * mean_padding(naive, lengths)


def test_split_by_template_holds_out_whole_reasoning_gym_tasks():
    pytest.importorskip("reasoning_gym")
    from llm_modules.config import DataConfig
    from llm_modules.errors import UserError
    from llm_modules.vocab import load_tokenizer

    tok = load_tokenizer("byte-level")
    cfg = DataConfig(reasoning_gym_tasks=["chain_sum", "gcd"], reasoning_gym_val_tasks=["lcm"],
                     reasoning_gym_size=6, system_prompt="")
    data = build_datasets(cfg, tok, log=lambda *a: None)
    assert {e.record.source for e in data.train} == {"reasoning-gym:chain_sum", "reasoning-gym:gcd"}
    assert {e.record.source for e in data.val} == {"reasoning-gym:lcm"}
    with pytest.raises(UserError, match="must not be trained on"):
        build_datasets(DataConfig(reasoning_gym_tasks=["gcd"], reasoning_gym_val_tasks=["gcd"]), tok)
