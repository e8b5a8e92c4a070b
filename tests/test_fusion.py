"""The residual fusion (issue 48): the prompt coupling on a fine-tuned small model, frozen, reading several layers of
the large model; and the decisive facts suite, which trains its receiver first and splits the steps between them."""
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_modules import LLMModules, LLMModulesConfig
from llm_modules import experiment, features
from llm_modules.errors import UserError
from llm_modules.experiment import ARMS, SUITES, arm_config
from llm_modules.vocab import byte_level_tokenizer
from test_tasks import needs_data
from tiny import SMALL

REPO = Path(__file__).resolve().parent.parent
PROMPT = REPO / "configs" / "tiny-prompt.yaml"
CHAT = str(REPO / "tests" / "fixtures" / "tiny_chat.jsonl")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 'pretrained' small causal LM directory with its own (byte-level) tokenizer, 300 embedding rows."""
    d = tmp_path_factory.mktemp("pretrained")
    byte_level_tokenizer().save_pretrained(d)
    spec = {**SMALL["llama"], "vocab_size": 300, "tie_word_embeddings": True, "eos_token_id": 258,
            "pad_token_id": 256, "bos_token_id": None}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, pretrained) -> Path:
    """That model fine-tuned whole for a few steps (finetune.py): its best/, the receiver the fusion starts from."""
    from llm_modules import finetune as ft

    out = tmp_path_factory.mktemp("receiver") / "ft"
    cfg = LLMModulesConfig.from_yaml(PROMPT).replace(
        coupling="none", small_tokenizer=None, small={"name_or_path": str(pretrained), "pretrained": True,
                                                      "config": None},
        data={"path": CHAT}, train={"max_steps": 3, "eval_every": 3, "warmup_steps": 1, "patience": None,
                                    "lr_small": 3e-3, "output_dir": str(out)})
    ft.train_finetune(cfg, method="full", base="small", output_dir=out, log=lambda *a: None)
    return out / "best"


def fusion_cfg(receiver: Path, tmp_path: Path = Path("runs/fusion"), layers=(1, -1), **train) -> LLMModulesConfig:
    """tiny-prompt.yaml with the receiver as its small model (frozen) and `layers` of the large model read."""
    return LLMModulesConfig.from_yaml(PROMPT).replace(
        large={"layers": list(layers)}, small={"name_or_path": str(receiver), "pretrained": True, "config": None},
        small_tokenizer=None, bridge={"dropout": 0.0},
        train={"lr_small": 0.0, "lr_gate": 1.0e-2, "output_dir": str(tmp_path / "run"), "warmup_steps": 0, **train})


def test_at_step_0_the_fusion_answers_exactly_as_its_fine_tuned_receiver(receiver):
    model = LLMModules.from_config(fusion_cfg(receiver)).eval()
    alone = AutoModelForCausalLM.from_pretrained(receiver).eval()
    assert model.bridge.pre_proj.in_features == 2 * 64  # two layers of the 64-wide large model, side by side
    torch.manual_seed(1)
    ids, memory = torch.randint(0, 259, (2, 5)), torch.randint(0, 259, (2, 7))
    ours = theirs = ids
    for _ in range(6):  # greedy decoding, each step recomputed from scratch by both models
        a = model(ours, memory_ids=memory).logits[:, -1]
        T = theirs.shape[1]
        b = alone(theirs, attention_mask=torch.ones_like(theirs), position_ids=torch.arange(T).expand(2, T),
                  use_cache=False).logits[:, -1]
        assert torch.equal(a, b)  # exactly: tanh(0) == 0 closes every memory layer
        ours = torch.cat([ours, a.argmax(-1, keepdim=True)], 1)
        theirs = torch.cat([theirs, b.argmax(-1, keepdim=True)], 1)
    assert torch.equal(ours, theirs)


def test_once_open_the_fusion_reads_every_layer_it_names(receiver):
    model = LLMModules.from_config(fusion_cfg(receiver)).eval()
    with torch.no_grad():
        for g in model.bridge.layers:
            g.alpha.fill_(0.7)
    ids, states = torch.randint(0, 259, (1, 6)), torch.randn(1, 4, 2 * 64)  # memory states of layers 1 and -1
    base = model(ids, source_states=states).logits
    for half in (slice(0, 64), slice(64, 128)):  # each layer's states alone moved
        moved = states.clone()
        moved[..., half] += 1.0 + torch.randn(1, 4, 64)
        assert not torch.allclose(model(ids, source_states=moved).logits, base)


def test_a_training_step_changes_the_memory_attention_only(receiver, tmp_path):
    from llm_modules.train import fit, setup

    run = setup(fusion_cfg(receiver, tmp_path, max_steps=1, eval_every=1, save_every=1), resume=False,
                log=lambda *a: None)
    model = run.unwrapped
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(run)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    trained = {n for n, _ in model.trained_named_parameters(run.cfg.train.lr_head, run.cfg.train.lr_small)}
    assert trained == {n for n in before if n.startswith("bridge.")}  # the receiver and its head are frozen
    assert changed and changed <= trained
    assert {n for n in trained if n.endswith(".alpha")} <= changed  # the gates moved off 0


def test_the_feature_cache_key_differs_with_the_layer_set():
    cfg = LLMModulesConfig.from_yaml(PROMPT)
    one = features.model_identity(cfg)
    assert set(one) == {"large", "layer", "dtype"}  # one layer: the key it always had, so built caches stay valid
    keys = [features.fingerprint(c, [], "float16") for c in (
        cfg, cfg.replace(large={"layers": [1, -1]}), cfg.replace(large={"layers": [0, -1]}),
        cfg.replace(large={"layers": [-1, 1]}), cfg.replace(large={"layer": 1}))]
    assert len(set(keys)) == len(keys)


def test_the_fusion_trains_the_same_from_the_feature_cache_as_live(receiver, tmp_path):
    """The cache stores the layers side by side (2 x 64 wide) and the model reads them as the live large model
    gives them."""
    from llm_modules.__main__ import main

    cfg = tmp_path / "fusion.yaml"
    fusion_cfg(receiver, tmp_path, eval_every=3).save_yaml(cfg)
    args = ["train", "--config", str(cfg), "--max-steps", "3", "--train.feature_cache_dir", str(tmp_path / "fc")]
    assert main(args + ["--output-dir", str(tmp_path / "live")]) == 0
    assert main(args + ["--output-dir", str(tmp_path / "cached"), "--train.feature_cache", "auto"]) == 0
    meta = [json.loads(p.read_text()) for p in (tmp_path / "fc").glob("*/meta.json")]
    assert meta and {m["width"] for m in meta} == {128} and meta[0]["identity"]["layers"] == [1, -1]
    last = lambda d: json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert abs(last("live")["val_loss"] - last("cached")["val_loss"]) < 1e-4


@pytest.mark.parametrize("over,message", [
    ({"large": {"layers": [-1]}}, "large.layers: [-1] must list two or more layer indices"),
    ({"large": {"layers": [1, "x"]}}, "large.layers: [1, 'x'] must list two or more layer indices"),
    ({"large": {"layers": [1, 1]}}, "large.layers: [1, 1] names a layer twice"),
    ({"large": {"layer": 1, "layers": [0, -1]}}, "large.layer: 1 and large.layers: [0, -1] both given"),
    ({"coupling": "stream", "large": {"layers": [0, -1]}}, "large.layers: only coupling 'prompt' reads several"),
])
def test_bad_layer_settings_are_clear_user_errors(over, message):
    d = LLMModulesConfig.from_yaml(PROMPT).to_dict()
    d = {**d, **{k: {**d[k], **v} if isinstance(v, dict) else v for k, v in over.items()}}
    with pytest.raises(UserError, match="invalid config") as e:
        LLMModulesConfig.from_dict(d)
    assert message in str(e.value)


def test_a_layer_the_large_model_does_not_have_is_a_clear_user_error():
    cfg = LLMModulesConfig.from_yaml(PROMPT).replace(large={"layers": [5, -1]})
    with pytest.raises(UserError, match=r"large.layers: \[5, -1\] is out of range; the large model has hidden "
                                        r"states 0..2"):
        LLMModules.from_config(cfg)


# ---- the decisive suite -------------------------------------------------------------------------------------------
@needs_data
def test_the_decisive_suite_asks_every_held_out_question_and_its_pass_covers_every_train_fact():
    from llm_modules.benchmark_data import facts_split
    from llm_modules.config import DataConfig
    from llm_modules.data import _dedupe, _training_records, split_indices

    suite = SUITES["facts-decisive"]
    assert suite.tests == {"facts": len(facts_split(None)[1])} == {"facts": 2912}
    data = DataConfig(**{**suite.data, "facts_answer": "sentence"})
    records, _ = _dedupe(_training_records(data, [], False))
    train, _ = split_indices(len(records), data.val_fraction, data.seed)
    assert len(train) == experiment.FACTS_TRAIN == 6607
    assert experiment.PASS == math.ceil(len(train) / suite.batch_size) == 413
    assert suite.steps == experiment.PASS + suite.memory_steps and suite.named_only


def test_the_decisive_arms_split_the_steps_and_start_from_their_receiver(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    suite = SUITES["facts-decisive"]
    assert set(suite.arms) <= set(ARMS) and set(experiment.DECISIVE_BASELINES) <= set(suite.arms)
    cfg = {n: arm_config(base, suite, ARMS[n], tmp_path / n) for n in (*suite.arms, "smollm-ft-receiver")
           if ARMS[n].kind != "large"}
    steps = {n: c.train.max_steps for n, c in cfg.items()}
    receiver = steps["smollm-ft-receiver"]
    assert receiver == experiment.PASS  # the receiver: one full pass
    for n in ("fusion-smollm-ft-1.5b", "smollm-ft-matched"):  # the same total: the receiver's steps and theirs
        assert receiver + steps[n] == suite.steps and ARMS[n].starts_from == "smollm-ft-receiver"
        assert cfg[n].small.name_or_path == str((tmp_path / "smollm-ft-receiver" / "best").resolve())
    two = cfg["prompt-smollm-sentence-2stage-every3-1.5b-matched"].train
    assert (two.max_steps, two.small_from_step) == (suite.steps, suite.memory_steps)
    assert steps["combined-large-wide-sentence-1.5b"] == suite.steps and cfg["smollm-ft-matched"].train.lr_small > 0
    fusion = cfg["fusion-smollm-ft-1.5b"]
    assert (fusion.coupling, fusion.large.layers, fusion.bridge.every, fusion.train.lr_small) == (
        "prompt", [14, -1], 2, 0.0)
    assert fusion.large.name_or_path == "qwen2.5-coder-1.5b-instruct" and fusion.data.facts_answer == "sentence"
    assert steps["lora-sentence-1.5b"] == suite.steps
    for n, c in ((a.name, cfg[a.name]) for a in experiment.DECISIVE):  # seeds 1, 2: only seeds and receiver differ
        for seed in (1, 2):
            twin = arm_config(base, suite, ARMS[f"{n}-seed{seed}"], tmp_path / f"{n}-seed{seed}").to_dict()
            assert (twin["bridge"].pop("seed"), twin["train"].pop("seed")) == (seed, seed)
            if ARMS[n].starts_from:
                assert twin["small"].pop("name_or_path").endswith(f"smollm-ft-receiver-seed{seed}/best")
            mine = c.to_dict()
            for k in ("bridge", "train", "small"):
                mine[k] = {f: v for f, v in mine[k].items() if f in twin[k]}
            twin["train"]["output_dir"] = mine["train"]["output_dir"]
            assert twin == mine, n


def test_an_arm_with_a_share_of_split_steps_is_refused_by_a_suite_that_does_not_split_them(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    with pytest.raises(UserError, match="suite facts does not split them"):
        arm_config(base, SUITES["facts"], ARMS["fusion-smollm-ft-1.5b"], tmp_path)


@needs_data
def test_the_experiment_trains_the_receiver_first_and_counts_its_steps(tmp_path, monkeypatch, pretrained):
    """The fusion arm named alone: its receiver is trained first (not evaluated), its best/ is the fusion's small
    model, the fusion's total counts both; a rerun redoes nothing."""
    small = {"name_or_path": str(pretrained), "pretrained": True, "config": None}
    arms = [experiment.Arm("tiny-receiver", "finetune", {"small": small}, method="full", base="small",
                           share="receiver", followup=True),
            experiment.Arm("tiny-fusion", "train", {"small": small, "large": {"layers": [1, -1]},
                                                    "train": {"lr_small": 0.0}},
                           share="memory", starts_from="tiny-receiver", followup=True)]
    for a in arms:
        monkeypatch.setitem(ARMS, a.name, a)
    quick = replace(experiment.QUICK["facts-decisive"], data={**experiment.QUICK["facts"].data, "max_examples": 40},
                    steps=3, memory_steps=1, batch_size=4, tests={"facts": 2}, arms=("tiny-fusion",))
    monkeypatch.setitem(experiment.QUICK, "facts-decisive", quick)
    base = LLMModulesConfig.from_yaml(PROMPT).replace(small_tokenizer="byte-level", train={
        "num_threads": 1, "feature_cache_dir": str(tmp_path / "fc")})
    out = tmp_path / "exp"
    experiment.run_experiment(base, out, suites=["facts-decisive"], arms=None, quick=True, log=lambda *a: None)
    r = json.loads((out / "results.json").read_text())["suites"]["facts-decisive"]
    assert set(r) == {"tiny-fusion"} and r["tiny-fusion"]["eval"]["facts"]["n"] == 2
    assert (r["tiny-fusion"]["steps"], r["tiny-fusion"]["starts_from"]["steps"], r["tiny-fusion"]["total_steps"]) == (
        1, 2, 3)
    d = out / "facts-decisive"
    assert (d / "tiny-receiver" / "train.json").is_file() and not (d / "tiny-receiver" / "eval").exists()
    saved = LLMModulesConfig.from_yaml(d / "tiny-fusion" / "arm.yaml")
    assert saved.small.name_or_path == str((d / "tiny-receiver" / "best").resolve())
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("*.log")}
    experiment.run_experiment(base, out, suites=["facts-decisive"], arms=None, quick=True, log=lambda *a: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.log")} == logs  # found trained: nothing run again


def test_an_arm_starting_from_an_arm_that_is_no_full_fine_tune_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(ARMS, "bad", replace(ARMS["fusion-smollm-ft-1.5b"], name="bad", starts_from="lora"))
    with pytest.raises(UserError, match="arm bad starts from 'lora', which is not an arm fine-tuning the small model"):
        experiment.train_receiver(LLMModulesConfig.from_yaml(PROMPT), SUITES["facts-decisive"], ARMS["bad"],
                                  tmp_path)
