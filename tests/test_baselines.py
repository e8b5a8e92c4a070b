"""The baselines of issue 48: the large model few-shot, the text hint (the large model's answer in the small model's
prompt) and LoRA on the 1.5B model; their prompts, their data and their arms."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_modules import benchmark_data, facts, tasks
from llm_modules.__main__ import main
from test_tasks import DATA, needs_data


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from llm_modules import LLMModules, LLMModulesConfig

    d = tmp_path_factory.mktemp("ckpt")
    LLMModules.from_config(LLMModulesConfig.from_yaml("configs/tiny-random.yaml")).save_pretrained(d)
    return d


def asked(monkeypatch) -> list:
    """The conversations every generator is given, in order."""
    seen = []
    for cls in (tasks.ArmGenerator, tasks.HFGenerator):
        def spy(self, conversations, *a, real=cls.generate, **k):
            seen.extend(conversations)
            return real(self, conversations, *a, **k)
        monkeypatch.setattr(cls, "generate", spy)
    return seen


# ---- few-shot ----------------------------------------------------------------------------------------------------
@needs_data
def test_few_shot_examples_are_train_facts_of_the_questions_relation_the_same_every_run():
    train, test = benchmark_data.facts_split(DATA)
    train_subjects = {facts.normalize(f.subject) for f in train}
    plain = {i.id: i for i in tasks._facts_items(DATA)}
    items = tasks._facts_items(DATA, shots=5)
    assert [i.id for i in items] == list(plain) and len(items) == len(test)
    for item in items[:200]:
        fact = item.fact
        assert item.question == plain[item.id].question == fact.question()  # the question itself unchanged
        turns = item.context
        assert [t["role"] for t in turns] == ["user", "assistant"] * 5
        shown = [f for f in train if f.subject in item.meta["shots"] and f.relation == fact.relation]
        assert len(shown) == 5 and all(facts.normalize(f.subject) in train_subjects for f in shown)
        assert turns == [m for s in item.meta["shots"] for m in
                         next(f for f in shown if f.subject == s).messages("object")]  # answered with the object
        assert item.conversation()[-1] == {"role": "user", "content": fact.question()}
    again = tasks._facts_items(DATA, shots=5)
    assert [i.conversation() for i in again] == [i.conversation() for i in items]  # deterministic
    assert len({tuple(i.meta["shots"]) for i in items[:50]}) > 40  # chosen per question, not one fixed set


def test_few_shot_never_shows_the_questions_own_subject_and_gives_what_a_small_relation_has():
    train = [facts.Fact("r", f"s{i}", (f"o{i}",), ("{} is",)) for i in range(3)]
    pick = facts.shots(train, 5)
    assert sorted(f.subject for f in pick(train[0])) == ["s1", "s2"]  # its own subject never, the rest all
    assert [f.subject for f in facts.shots(train, 1)(train[0])] == [pick(train[0])[0].subject]  # a prefix of k
    assert pick(facts.Fact("other", "x", ("y",), ("{} is",))) == []


@needs_data
def test_zero_shots_ask_exactly_what_every_arm_is_asked(checkpoint, monkeypatch):
    seen = asked(monkeypatch)
    args = dict(large_only=True, limit=3, batch_size=3, max_new_tokens=2, log=lambda *a: None)
    plain, _ = tasks.evaluate_tasks(str(checkpoint), ["facts"], **args)
    zero, _ = tasks.evaluate_tasks(str(checkpoint), ["facts"], shots=0, **args)
    assert seen[:3] == seen[3:] and plain == zero
    test = benchmark_data.facts_split(DATA)[1][:3]
    assert sorted(json.dumps(c) for c in seen[:3]) == sorted(
        json.dumps([{"role": "user", "content": f"{facts.INSTRUCTION}\n{f.sentence()}"}]) for f in test)


@needs_data
def test_eval_num_fewshot_asks_with_examples_and_writes_its_own_answers_file(checkpoint, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    seen = asked(monkeypatch)
    assert main(["eval", "--checkpoint", str(checkpoint), "--large-only", "--task", "facts", "--limit", "2",
                 "--max-new-tokens", "2", "--num-fewshot", "3"]) == 0
    assert all(len(c) == 7 for c in seen)  # 3 examples (user, assistant) and the question
    (out,) = (tmp_path / "runs" / "eval").glob("*.jsonl")
    assert out.name.endswith("-large-only-3shot.jsonl")
    assert [len(json.loads(ln)["shots"]) for ln in out.read_text().splitlines()] == [3, 3]
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "facts,gsm8k", "--num-fewshot", "2"]) == 2
    assert "--num-fewshot and hints are for --task facts alone" in capsys.readouterr().err


# ---- the text hint -----------------------------------------------------------------------------------------------
def test_a_hint_is_the_larger_models_answer_on_a_line_after_the_question_in_training_and_test():
    fact = facts.Fact("country_capital_city", "Peru", ("Lima",), ("The capital city of {} is",))
    hinted = fact.question("The capital city of Peru is Lima.")
    assert hinted == (f"{fact.question()}\nA larger model answered: The capital city of Peru is Lima.")
    assert fact.messages("sentence", "The capital city of Peru is Lima.")[0]["content"] == hinted
    assert fact.messages("sentence")[0]["content"] == fact.question()  # no hint: unchanged
    assert fact.question("") == f"{fact.question()}\nA larger model answered: (nothing)"


@needs_data
def test_hinted_questions_come_from_an_answers_file_and_a_missing_one_is_a_clear_error(checkpoint, tmp_path,
                                                                                       monkeypatch, capsys):
    answers = tmp_path / "large.jsonl"
    assert main(["eval", "--checkpoint", str(checkpoint), "--large-only", "--task", "facts", "--limit", "3",
                 "--max-new-tokens", "3", "--out", str(answers)]) == 0
    said = {r["id"]: r["output"] for r in map(json.loads, answers.read_text().splitlines())}
    seen = asked(monkeypatch)
    out = tmp_path / "hinted.jsonl"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "facts", "--limit", "3", "--max-new-tokens",
                 "2", "--hints", str(answers), "--out", str(out)]) == 0
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    for r in rows:
        fact = next(f for f in benchmark_data.facts_split(DATA)[1] if f"facts/{f.relation}/{f.subject}" == r["id"])
        assert r["question"] == fact.question(said[r["id"]])
    assert sorted(c[-1]["content"] for c in seen) == sorted(r["question"] for r in rows)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "facts", "--hints", str(tmp_path / "none")]) == 2
    assert f"facts hints: {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "facts", "--limit", "4", "--hints",
                 str(answers)]) == 2  # the file answers 3 questions
    assert "facts hints: no answer for facts/" in capsys.readouterr().err


# ---- the arms ----------------------------------------------------------------------------------------------------
def test_the_baseline_arms_differ_from_their_twins_in_their_lever_only(tmp_path):
    from llm_modules import LLMModulesConfig
    from llm_modules.experiment import ARMS, SUITES, arm_config

    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    cfg = {n: arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict() for n in (
        "lora-sentence", "lora-sentence-1.5b", "smollm-ft-sentence", "smollm-ft-sentence-hint-1.5b",
        "large-alone-1.5b", "large-alone-1.5b-5shot")}
    names = cfg["lora-sentence-1.5b"]["large"].pop("name_or_path"), cfg["lora-sentence"]["large"].pop("name_or_path")
    assert names == ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert cfg["lora-sentence-1.5b"] == cfg["lora-sentence"]
    lora = ARMS["lora-sentence-1.5b"]
    assert (lora.kind, lora.method, lora.base) == ("finetune", "lora", "large")
    assert cfg["smollm-ft-sentence-hint-1.5b"] == cfg["smollm-ft-sentence"]  # the hints are in the data, not the config
    hint = ARMS["smollm-ft-sentence-hint-1.5b"]
    assert (hint.method, hint.base, hint.hints_from, hint.shots) == ("full", "small", "large-alone-1.5b", 0)
    assert cfg["large-alone-1.5b-5shot"] == cfg["large-alone-1.5b"] and ARMS["large-alone-1.5b-5shot"].shots == 5
    for name in ("smollm-ft-sentence-hint-1.5b-seed1", "lora-sentence-1.5b-seed2"):
        assert ARMS[name].hints_from == ARMS[name.rsplit("-seed", 1)[0]].hints_from


def test_every_summary_comparison_names_two_arms():
    from llm_modules.experiment import ARMS
    from llm_modules.report import SUMMARY, UNIONS

    assert [p for p in (*SUMMARY, *UNIONS) if not set(p) <= set(ARMS)] == []


def test_a_hint_arm_whose_answers_are_missing_or_whose_source_is_trained_is_a_clear_error(tmp_path):
    from dataclasses import replace

    from llm_modules.errors import UserError
    from llm_modules.experiment import ARMS, facts_prompt

    with pytest.raises(UserError, match="large-alone-1.5b/eval/facts.jsonl does not exist; write it with"):
        facts_prompt(ARMS["smollm-ft-sentence-hint-1.5b"], tmp_path)
    with pytest.raises(UserError, match="takes its hints from 'lora', which is not an arm of the large model alone"):
        facts_prompt(replace(ARMS["smollm-ft-sentence-hint-1.5b"], hints_from="lora"), tmp_path)
    assert facts_prompt(ARMS["smollm-ft-sentence"], tmp_path) is None
    assert facts_prompt(ARMS["large-alone-1.5b-5shot"], tmp_path) == {"shots": 5, "hints": None}


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """A tiny 'pretrained' small causal LM with its own tokenizer (SmolLM2's place in the hint arm)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_modules.vocab import byte_level_tokenizer
    from tiny import SMALL

    d = tmp_path_factory.mktemp("small")
    tok = byte_level_tokenizer()
    tok.add_tokens(["Assistant:"])
    tok.save_pretrained(d)
    spec = {**SMALL["llama"], "vocab_size": 300, "bos_token_id": None, "eos_token_id": 258, "pad_token_id": 256,
            "tie_word_embeddings": True, "max_position_embeddings": 512}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec)).save_pretrained(d)
    return d


@needs_data
def test_quick_experiment_runs_the_baselines_and_reports_them(tmp_path, monkeypatch, small_dir, capsys):
    """The baseline arms through `experiment --quick` on tiny models (the 1.5B model and SmolLM2 replaced by tiny
    random ones): the few-shot arm asks with examples, the hint arm trains and is tested on questions carrying the
    large model's answers, LoRA trains; the report has their rows and the summary table."""
    from dataclasses import replace

    from llm_modules import experiment
    from llm_modules.experiment import ARMS, _merge

    tiny = replace(experiment.QUICK["facts"], data={**experiment.QUICK["facts"].data, "max_examples": 24}, steps=2,
                   batch_size=4, tests={"facts": 4}, curve_task=("facts", 3), curve_points=1)
    monkeypatch.setitem(experiment.QUICK, "facts", tiny)
    for name in ("large-alone-1.5b", "large-alone-1.5b-5shot"):
        monkeypatch.setitem(ARMS, name, replace(ARMS[name], over={}))
    lora = replace(ARMS["lora-sentence-1.5b"], over=ARMS["lora-sentence"].over)  # the 0.5B model's LoRA arm's
    monkeypatch.setitem(ARMS, "lora-sentence-1.5b", lora)
    small = {"small": {"name_or_path": str(small_dir), "pretrained": True, "config": None}}
    hint = "smollm-ft-sentence-hint-1.5b"
    monkeypatch.setitem(ARMS, hint, replace(ARMS[hint], over=_merge(ARMS[hint].over, small)))
    out = tmp_path / "exp"
    argv = ["experiment", "--quick", "--config", "configs/tiny-random.yaml", "--suites", "facts", "--arms",
            f"{hint},large-alone-1.5b-5shot,lora-sentence-1.5b,large-alone-1.5b", "--output-dir", str(out),
            "--train.num_threads", "1", "--train.feature_cache_dir", str(tmp_path / "fc")]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["suites"]["facts"]
    assert set(results) == {hint, "large-alone-1.5b-5shot", "lora-sentence-1.5b", "large-alone-1.5b"}
    rows = {a: [json.loads(ln) for ln in (out / "facts" / a / "eval" / "facts.jsonl").read_text().splitlines()]
            for a in results}
    assert all(len(r["shots"]) == 5 for r in rows["large-alone-1.5b-5shot"])
    assert all("shots" not in r for r in rows["large-alone-1.5b"])
    said = {r["id"]: r["output"] for r in rows["large-alone-1.5b"]}
    test = {f"facts/{f.relation}/{f.subject}": f for f in benchmark_data.facts_split(DATA)[1]}
    assert [r["question"] for r in rows[hint]] == [test[r["id"]].question(said[r["id"]]) for r in rows[hint]]
    source = out / "facts" / "large-alone-1.5b"
    answered = {r["id"]: r["output"] for r in map(json.loads, (source / "eval" / "facts_train.jsonl").open())}
    (records,) = source.glob("facts_train.hinted-sentence-24.jsonl")
    train = benchmark_data.facts_split(DATA)[0][:24]
    assert [json.loads(ln)["messages"] for ln in records.read_text().splitlines()] == [
        f.messages("sentence", answered[f"facts_train/{f.relation}/{f.subject}"]) for f in train]
    import yaml

    assert yaml.safe_load((out / "facts" / hint / "arm.yaml").read_text())["data"]["path"] == str(records)
    assert results[hint]["steps"] == 2 and results["lora-sentence-1.5b"]["trainable_params"] > 0
    report = (out / "results.md").read_text()
    assert "| lora-sentence-1.5b | large-alone-1.5b | all (4) | 0 |" in report
    assert "| large-alone-1.5b-5shot | large-alone-1.5b | all (4) | 0 |" in report
    assert "eval min" in report
    minutes = json.loads((source / "eval" / "facts_train.summary.json").read_text())[0]["seconds"] / 60
    assert (f"The text hint's training hints (not in the hint arms' train minutes): large-alone-1.5b answered 24 "
            f"train facts in {minutes:.1f} min.") in report
    capsys.readouterr()
    assert main(["experiment", "--quick", "--config", "configs/tiny-random.yaml", "--suites", "gsm8k", "--arms",
                 f"{hint},large-alone-1.5b-5shot", "--output-dir", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"gsm8k / {hint}: skipped (its few-shot examples or hints are for facts questions" in said
    assert "gsm8k / large-alone-1.5b-5shot: skipped" in said
