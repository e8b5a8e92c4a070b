"""The fine-tuning baselines (finetune.py): LoRA on the large model, full fine-tuning of a pretrained small one."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_modules import LLMModulesConfig
from llm_modules import finetune as ft
from llm_modules.data import build_datasets, collate
from llm_modules.errors import UserError
from llm_modules.prompts import encode_prompt, with_system_prompt
from llm_modules.vocab import byte_level_tokenizer, load_tokenizer
from tiny import LARGE, SMALL

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny-random.yaml"


def tiny_cfg(**train) -> LLMModulesConfig:
    cfg = LLMModulesConfig.from_yaml(TINY)
    return cfg.replace(data={"path": str(REPO / "tests/fixtures/tiny_chat.jsonl")},
                       train={"max_steps": 6, "eval_every": 3, "warmup_steps": 1, "patience": None, **train})


def hf(kind: dict, **over):
    spec = {**kind, **over}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """A 'pretrained' small causal LM with its own tokenizer: a byte-level one plus a merged 'Assistant:' token (id
    259), so its token ids differ from the large model's byte-level ones; 300 embedding rows."""
    d = tmp_path_factory.mktemp("small")
    tok = byte_level_tokenizer()
    tok.add_tokens(["Assistant:"])
    tok.save_pretrained(d)
    hf(SMALL["llama"], vocab_size=300, bos_token_id=None, eos_token_id=258, pad_token_id=256,
       tie_word_embeddings=True).save_pretrained(d)
    return d


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def val_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if r.get("val_loss") is not None]


@pytest.mark.parametrize("kind,targets", [("qwen2", ft.DEFAULT_TARGETS), ("llama", ["q_proj", "v_proj"]),
                                          ("gpt2", ["c_attn", "c_fc"])])
def test_rank_is_the_closest_count_and_peft_trains_that_many(kind, targets):
    model = hf({**LARGE, **SMALL}[kind])
    per_rank = ft.lora_params_per_rank(model, targets)
    target = 7 * per_rank + per_rank // 3  # between ranks 7 and 8, nearer 7
    rank = ft.lora_rank_for(model, target, targets)
    assert rank == min(range(1, 64), key=lambda r: abs(r * per_rank - target)) == 7
    assert ft.lora_rank_for(model, 1, targets) == 1
    wrapped = ft.apply_lora(model, rank, targets, log=lambda *a: None)
    trainable = {n: p.numel() for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(trainable.values()) == rank * per_rank


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt_neo", "gpt2"])
def test_head_at_labelled_positions_equals_the_full_forward(kind):
    model = hf({**LARGE, **SMALL}[kind], vocab_size=40).eval()
    assert model.config.model_type in ft.HEAD_ONLY_TYPES
    ids = torch.randint(0, 40, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    got, n = ft.loss_sum(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    full = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(full.flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_trains_the_adapter_only_lowers_the_loss_and_reloads(tmp_path):
    from llm_modules.model import LLMModules

    cfg = tiny_cfg()
    target = sum(p.numel() for _, p in LLMModules.from_config(cfg, load_large=False).trainable_named_parameters())
    out = tmp_path / "lora"
    run = ft.setup_finetune(cfg, method="lora", base="large", output_dir=out, target_params=target,
                            log=lambda *a: None)
    per_rank = ft.lora_params_per_rank(run.hf_model, ft.DEFAULT_TARGETS)
    assert run.trainable_params == run.rank * per_rank and abs(run.trainable_params - target) <= per_rank / 2
    assert run.lr == cfg.train.lr_small
    base = {n.replace(".base_layer", ""): p.detach().clone() for n, p in run.hf_model.named_parameters()
            if "lora_" not in n}
    ft.fit(run)
    after = {n.replace(".base_layer", ""): p for n, p in run.hf_model.named_parameters() if "lora_" not in n}
    assert after.keys() == base.keys() and all(torch.equal(after[n], base[n]) for n in base)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in run.hf_model.named_parameters() if "lora_B" in n)
    vals = val_losses(out)
    assert run.step == 6 and len(vals) == 3 and vals[-1] < vals[0]
    best = out / "best"
    meta = json.loads((best / ft.FINETUNE_NAME).read_text())
    assert {k: meta[k] for k in ("method", "base", "rank", "trainable_params")} == {
        "method": "lora", "base": "large", "rank": run.rank, "trainable_params": run.trainable_params}
    assert (best / "adapter_model.safetensors").is_file() and (best / "config.yaml").is_file()
    assert ft.is_finetuned(out) and ft.is_finetuned(best) and not ft.is_finetuned(tmp_path)

    model, tok, saved, limit = ft.load_finetuned(out)
    assert not model.training and saved.data == cfg.data and limit == 4096
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged into the base weights
    ids = torch.tensor([encode_prompt(with_system_prompt([{"role": "user", "content": "What is 3 + 6?"}],
                                                         cfg.data.system_prompt), cfg.data.format, tok)])
    run.model.eval()
    trained = logits(run.hf_model, ids.to(run.hf_model.device)).cpu()  # trained where accelerate put it (a GPU if any)
    torch.testing.assert_close(logits(model, ids), trained, rtol=1e-4, atol=1e-5)
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert new.shape == (1, ids.shape[1] + 3)


def test_full_finetune_keeps_the_small_models_vocabulary_and_is_detected_when_done(tmp_path, small_dir):
    cfg = tiny_cfg(lr_small=3e-3).replace(small={"name_or_path": str(small_dir), "pretrained": True, "config": None})
    out = tmp_path / "full"
    logs = []
    summary = ft.train_finetune(cfg, method="full", base="small", output_dir=out, log=logs.append)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(small_dir).parameters())
    assert summary["trainable_params"] == n_params and summary["rank"] is None
    assert summary["steps"] == 6 and summary["best_step"] == 6 and summary["peak_memory_gib"] > 0
    vals = val_losses(out)
    assert vals[-1] < vals[0] and summary["best_val"] == vals[-1]
    assert ft.finished(out) == summary and (out / "loss.png").is_file()

    model, tok, saved, limit = ft.load_finetuned(out / "best")
    assert model.get_output_embeddings().out_features == 300 and len(tok) == 260  # its own head and vocabulary
    assert tok.convert_tokens_to_ids("Assistant:") == 259
    own = build_datasets(cfg.data, load_tokenizer(str(small_dir)), log=lambda *a: None)
    prompt = encode_prompt([{"role": "user", "content": "What is 3 + 6?"}], cfg.data.format, tok)
    assert prompt[-3:] == [259, 10, 10]  # "Assistant:" "\n" "\n": the training format in the small tokenizer
    assert any(259 in e.input_ids for e in own.train)
    # the saved model is the best one: its held-out loss is the one logged
    total = count = 0
    with torch.no_grad():
        for e in own.val:
            s, n = ft.loss_sum(model, collate([e], tok.pad_token_id))
            total, count = total + float(s), count + n
    assert total / count == pytest.approx(summary["best_val"], rel=1e-5)

    again = ft.train_finetune(cfg, method="full", base="small", output_dir=out, log=logs.append)
    assert again == summary and "finished already" in logs[-1]
    with pytest.raises(UserError, match="other settings") as e:
        ft.train_finetune(cfg, method="full", base="small", output_dir=out, lr=1e-4, log=logs.append)
    assert "\n" not in str(e.value)


def test_an_unfinished_run_starts_over(tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n{"step": 1, "train_loss": 9.0}\n')
    assert ft.finished(out) is None
    summary = ft.train_finetune(tiny_cfg(max_steps=2), method="lora", base="large", output_dir=out, rank=2,
                                log=lambda *a: None)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[0]["val_loss"] != 1.0
    assert summary["rank"] == 2 and ft.finished(out) == summary


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    import os
    import signal

    from llm_modules.interrupt import Interrupted

    cfg, args = tiny_cfg(save_every=2), dict(method="lora", base="large", rank=2, log=lambda *a: None)
    reference = ft.train_finetune(cfg, output_dir=tmp_path / "reference", **args)
    out, real, events = tmp_path / "run", ft.train_step, {}

    def train_step(run, window):
        if events.get("sigterm") == run.step + 1:  # during this step: it finishes, resume/ is saved there
            os.kill(os.getpid(), signal.SIGTERM)
        if events.get("crash") == run.step + 1:  # killed inside this step: nothing of it is saved
            raise KeyboardInterrupt
        return real(run, window)

    monkeypatch.setattr(ft, "train_step", train_step)
    events["sigterm"] = 3
    with pytest.raises(Interrupted) as stopped:
        ft.train_finetune(cfg, output_dir=out, **args)
    assert stopped.value.exit_code == 143 and "resume" in stopped.value.message
    assert json.loads((out / ft.RESUME_NAME / "training_state.json").read_text())["progress"]["step"] == 3
    events.update(sigterm=None, crash=6)  # resumes at 3; the periodic save at 4 is what the next run finds
    with pytest.raises(KeyboardInterrupt):
        ft.train_finetune(cfg, output_dir=out, **args)
    events["crash"] = None
    summary = ft.train_finetune(cfg, output_dir=out, **args)

    def rows(d):
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
                for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(out) == rows(tmp_path / "reference")  # every step once, with the uninterrupted run's losses
    assert {k: summary[k] for k in ("steps", "best_step", "best_val")} == {
        k: reference[k] for k in ("steps", "best_step", "best_val")}
    from safetensors.torch import load_file

    got, want = (load_file(str(d / "best" / "adapter_model.safetensors")) for d in (out, tmp_path / "reference"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not (out / ft.RESUME_NAME).exists() and ft.finished(out) == summary  # resume/ goes when the run ends


@pytest.mark.parametrize("kwargs,cfg_over,message", [
    ({"method": "qlora", "base": "large", "rank": 4}, {}, "method: 'qlora' is not one of"),
    ({"method": "lora", "base": "medium", "rank": 4}, {}, "base: 'medium' is not one of"),
    ({"method": "lora", "base": "large"}, {}, "give exactly one of rank"),
    ({"method": "lora", "base": "large", "rank": 4, "target_params": 100}, {}, "give exactly one of rank"),
    ({"method": "lora", "base": "large", "rank": 0}, {}, "rank: 0 must be an integer >= 1"),
    ({"method": "full", "base": "small", "rank": 4}, {}, "rank, target_params and alpha are for method lora"),
    ({"method": "full", "base": "large", "lr": 0.0}, {}, "lr: 0.0 must be > 0"),
    ({"method": "full", "base": "small"}, {}, "set small.name_or_path"),
    ({"method": "lora", "base": "large", "rank": 4, "target_modules": ["c_attn"]}, {},
     "no module of this Qwen2ForCausalLM matches target_modules c_attn; its linear layers are named"),
    ({"method": "lora", "base": "large", "rank": 4}, {"tokenizer": None}, "needs `tokenizer`"),
])
def test_bad_input_is_a_one_line_user_error(tmp_path, kwargs, cfg_over, message):
    cfg = tiny_cfg().replace(**cfg_over)
    with pytest.raises(UserError) as e:
        ft.train_finetune(cfg, output_dir=tmp_path / "x", log=lambda *a: None, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a fine-tuned baseline"):
        ft.load_finetuned(tmp_path)


def test_without_held_out_data_best_holds_the_final_weights(tmp_path):
    cfg = tiny_cfg(max_steps=2).replace(data={"val_fraction": 0.0})
    summary = ft.train_finetune(cfg, method="lora", base="large", output_dir=tmp_path, rank=1, log=lambda *a: None)
    assert summary["best_step"] == 2 and summary["best_val"] is None
    assert json.loads((tmp_path / "best" / ft.FINETUNE_NAME).read_text())["step"] == 2
    assert "val_loss" not in (tmp_path / "metrics.jsonl").read_text()
