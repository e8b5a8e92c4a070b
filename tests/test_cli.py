"""generate / chat / weights through the CLI on a tiny checkpoint."""
import io

import pytest
import torch

import llm_modules.prompts as prompts
from llm_modules import LLMModules, LLMModulesConfig
from llm_modules.__main__ import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    LLMModules.from_config(LLMModulesConfig.from_yaml("configs/tiny-random.yaml")).save_pretrained(d)
    return d


def test_generate_streams_answers(ckpt, capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "What is 2 + 3?", "--max-new-tokens", "6"]) == 0
    f = tmp_path / "prompts.txt"
    f.write_text("first question\n\nsecond question\n")
    assert main(["generate", "--checkpoint", str(ckpt), "--prompts-file", str(f), "--max-new-tokens", "4",
                 "--do-sample", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert ">>> first question" in out and ">>> second question" in out


def test_generate_formats_prompts_as_training_did(ckpt, monkeypatch):
    seen = []
    real = prompts.encode_prompt
    monkeypatch.setattr(prompts, "encode_prompt", lambda m, s, t: seen.append((m, s)) or real(m, s, t))
    main(["generate", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "1"])
    assert seen == [([{"role": "user", "content": "hi"}], "paper")]


def test_chat_keeps_the_conversation(ckpt, monkeypatch, capsys):
    seen = []
    real = prompts.encode_prompt
    monkeypatch.setattr(prompts, "encode_prompt", lambda m, s, t: seen.append([x["role"] for x in m]) or real(m, s, t))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/reset\nagain\n\n"))
    assert main(["chat", "--checkpoint", str(ckpt), "--max-new-tokens", "3"]) == 0
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]


def test_generation_errors_are_clear(ckpt, capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(ckpt)]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err
    long = "x" * 1100  # the tiny GPT-Neo small model has 1024 learned positions
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", long, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the small model's 1024 learned positions" in err and "Traceback" not in err


def test_weights_list_and_unknown_name(capsys):
    assert main(["weights", "list"]) == 0
    assert "qwen2.5-coder-1.5b-instruct" in capsys.readouterr().out
    assert main(["weights", "fetch", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_generation_only_models_store_every_wide_weight_column_major(ckpt):
    """generate / chat never train: the model is frozen whole and its wide weights laid out for decoding once, so
    stream makes no per-answer copies (row_split.py)."""
    from llm_modules.loading import load_for_generation
    from llm_modules.row_split import RowSplitLinear, is_column_major, is_wide

    model = load_for_generation(ckpt)
    wide = [m for m in model.modules() if isinstance(m, RowSplitLinear) and is_wide(m)]
    assert wide and all(is_column_major(m.weight) for m in wide)
    assert not any(p.requires_grad for p in model.parameters())
    saved = LLMModules.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
