"""Benchmarks (`eval --task`): the facts split, the scorers, the shipped lm-eval tasks, one path for every model.

Reads small slices of the shared data (../shared/data, or $LLM_MODULES_DATA); skipped with the reason when absent.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_modules import benchmark_data, facts, tasks
from llm_modules.__main__ import main

try:
    DATA = benchmark_data.find_data_dir()
except Exception:  # noqa: BLE001  (UserError: no data dir here)
    DATA = None
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found (../shared/data or $LLM_MODULES_DATA)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from llm_modules import LLMModules, LLMModulesConfig

    d = tmp_path_factory.mktemp("ckpt")
    LLMModules.from_config(LLMModulesConfig.from_yaml("configs/tiny-random.yaml")).save_pretrained(d)
    return d


# ---- facts -----------------------------------------------------------------------------------------------------
def _fact(relation="country_capital_city", subject="France", objects=("Paris",)):
    return facts.Fact(relation, subject, objects, ("The capital city of {} is",))


def test_facts_split_is_by_subject_and_stable_under_a_seed():
    many = [_fact(rel, f"subject {i}", (f"object {i}",)) for rel in ("r1", "r2") for i in range(400)]
    train, test = facts.split(many, seed=3)
    assert {f.subject for f in train}.isdisjoint({f.subject for f in test})  # across relations too
    assert 0.2 < len(test) / len(many) < 0.4  # TEST_FRACTION = 0.3
    again_train, again_test = facts.split(list(reversed(many)), seed=3)
    assert sorted(map(str, test)) == sorted(map(str, again_test))  # the order of the input does not matter
    sides = {f.subject for f in facts.split(many[:100], seed=3)[1]}
    assert sides == {f.subject for f in test if f in many[:100]}  # nor do the other facts
    assert {f.subject for f in facts.split(many, seed=4)[1]} != {f.subject for f in test}


@needs_data
def test_facts_from_the_shared_data_keep_held_out_subjects_out_of_training():
    train, test = benchmark_data.facts_split(DATA)
    assert len({f.relation for f in test}) == 27  # 26 relations + the country -> capital table
    held_out = {facts.normalize(f.subject) for f in test}
    assert held_out and held_out.isdisjoint(facts.normalize(f.subject) for f in train)
    records = benchmark_data.train_records(["facts"], str(DATA))
    assert len(records) == len(train)
    asked = {r[2][0]["content"] for r in records}
    assert not any(f.question() in asked for f in test)
    assert [t.relation for t in test[:3]] == sorted({f.relation for f in test})[:3]  # a prefix mixes relations


def test_facts_training_answer_forms_are_both_read_back_by_the_scorer():
    """data.facts_answer: the missing words alone, or the sentence completed (the large model's own form); the
    scorer's extract reads the object out of either, so both train toward answers it marks right."""
    fact = _fact()
    q, a = fact.messages()
    assert q == {"role": "user", "content": fact.question()} and a["content"] == "Paris"
    q2, s = fact.messages("sentence")
    assert q2 == q and s["content"] == "The capital city of France is Paris."
    assert all(facts.is_correct(facts.extract(r["content"], fact), fact) for r in (a, s))
    dotted = _fact(objects=("Washington, D.C.",)).messages("sentence")[1]["content"]
    assert dotted == "The capital city of France is Washington, D.C."  # no second full stop


@needs_data
def test_facts_answer_form_reaches_training_records():
    from llm_modules.config import DataConfig
    from llm_modules.data import _training_records

    for form in ("object", "sentence"):
        cfg = DataConfig(benchmarks=["facts"], benchmark_dir=str(DATA), facts_answer=form)
        pairs = [(r.messages[0]["content"].split("\n")[1], r.messages[1]["content"])
                 for r in _training_records(cfg, [], False)]
        assert len(pairs) > 1000
        starts = [a.startswith(q + " ") and a.endswith(".") for q, a in pairs]
        assert all(starts) if form == "sentence" else not any(starts)


def test_facts_summary_separates_knowledge_from_the_relations_prior():
    train = [_fact("continent", s, (o,)) for s, o in [("a", "Asia"), ("b", "Asia"), ("c", "Europe")]]
    priors = facts.answer_priors(train)
    assert priors["continent"] == ({"asia", "europe"}, "asia")
    asia, africa = _fact("continent", "d", ("Asia",)), _fact("continent", "e", ("Africa",))
    assert facts.prior_flags(asia, priors) == {"answer_in_train": True, "prior_correct": True}
    assert facts.prior_flags(africa, priors) == {"answer_in_train": False, "prior_correct": False}
    assert facts.prior_flags(_fact("unknown relation"), priors) == {"answer_in_train": False, "prior_correct": False}
    rows = [{"relation": "continent", "correct": c, **facts.prior_flags(f, priors)}
            for f, c in [(asia, True), (africa, False), (africa, True), (asia, False)]]
    extra = tasks.facts_extra(rows)
    assert extra["unseen_answers"]["n"] == 2 and extra["unseen_answers"]["correct"] == 1
    assert extra["prior_baseline"]["correct"] == 2 and extra["prior_baseline"]["accuracy"] == 0.5
    assert extra["per_relation"]["continent"]["accuracy"] == 0.5 and extra["macro_accuracy"] == 0.5


def test_facts_scorer_normalizes_and_accepts_aliases_and_a_restated_sentence():
    dc = _fact("country_capital_city", "United States", ("Washington D.C.",))
    assert facts.is_correct(facts.extract("The Washington, D.C.\nmore text", dc), dc)
    assert facts.is_correct(facts.extract("the capital city of united states is Washington DC.", dc), dc)
    assert not facts.is_correct(facts.extract("New York", dc), dc)
    assert not facts.is_correct(facts.extract("", dc), dc)
    alias = _fact("r", "Spider-Man", ("Peter Parker", "Miles Morales"))
    assert facts.is_correct("Miles Morales", alias) and not facts.is_correct("Peter", alias)
    assert facts.normalize("São Paulo") == "sao paulo"


def test_gsm8k_and_math500_scorers():
    item = tasks.Item("g", "q", "1000")
    assert tasks._gsm8k_judge("so she pays 1,000 dollars.\n#### 1,000", item) == ("1,000", True)
    assert tasks._gsm8k_judge("The answer is 999.", item)[1] is False
    m = tasks.Item("m", "q", "\\frac{14}{3}")
    assert tasks._math500_judge("Thus the answer is $\\boxed{\\dfrac{14}{3}}$.", m)[1] is True
    assert tasks._math500_judge("Thus the answer is $\\boxed{5}$.", m)[1] is False
    assert tasks._math500_judge("no answer here", m)[1] is False


def test_wilson_interval():
    lo, hi = tasks.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = tasks.wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-3), pytest.approx(0.5962, abs=1e-3))


# ---- running tasks ----------------------------------------------------------------------------------------------
@needs_data
def test_large_only_and_an_arm_answer_through_the_same_function(checkpoint, monkeypatch):
    seen = []
    run = tasks.run_generation

    def spy(task, generator, *args, **kwargs):
        seen.append(type(generator).__name__)
        return run(task, generator, *args, **kwargs)

    monkeypatch.setattr(tasks, "run_generation", spy)
    for large_only in (False, True):
        rows, (summary,) = tasks.evaluate_tasks(str(checkpoint), ["facts"], large_only=large_only, limit=3,
                                                batch_size=2, max_new_tokens=4, log=lambda *a: None)
        assert [r["id"] for r in rows] == [f"facts/{f.relation}/{f.subject}" for f in benchmark_data.facts_split(DATA)[1][:3]]
        assert summary["n"] == 3 and summary["large_only"] is large_only and 0 <= summary["accuracy"] <= 1
        assert set(summary["per_relation"]) == {r["relation"] for r in rows}
    assert seen == ["ArmGenerator", "HFGenerator"]


@needs_data
def test_prompt_coupling_and_small_alone_arms_answer_too(tmp_path):
    from llm_modules import LLMModules, LLMModulesConfig

    for name, cfg in (("prompt", LLMModulesConfig.from_yaml("configs/tiny-prompt.yaml")),
                      ("none", LLMModulesConfig.from_yaml("configs/tiny-random.yaml").replace(coupling="none"))):
        LLMModules.from_config(cfg).save_pretrained(tmp_path / name)
        rows, (summary,) = tasks.evaluate_tasks(str(tmp_path / name), ["facts"], limit=2, batch_size=2,
                                                max_new_tokens=3, log=lambda *a: None)
        assert summary["n"] == 2 and all(isinstance(r["output"], str) for r in rows), name


@needs_data
def test_shipped_lm_eval_tasks_load_offline_and_match_the_harness_command(checkpoint):
    from llm_modules.harness import evaluate_harness

    rows, summaries = tasks.evaluate_tasks(str(checkpoint), ["hellaswag", "arc_easy"], limit=4, batch_size=4,
                                           log=lambda *a: None)
    assert [s["n"] for s in summaries] == [4, 4] and len(rows) == 8
    again = tasks.evaluate_tasks(str(checkpoint), ["hellaswag", "arc_easy"], limit=4, batch_size=4,
                                 log=lambda *a: None)  # the TaskManager reused (built once a process), tasks fresh
    assert again[0] == rows and tasks.task_manager.cache_info().hits >= 1
    direct = evaluate_harness(checkpoint, "hellaswag_local,arc_easy_local", limit=4, batch_size=4,
                              include_path=tasks.LM_EVAL_TASKS, bootstrap_iters=0)["results"]
    for s in summaries:
        got = direct[f"{s['task']}_local"]
        assert (s["accuracy"], s["acc"]) == (got["acc_norm,none"], got["acc,none"])


@needs_data
def test_eval_task_command_writes_answers_and_a_summary(checkpoint, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    assert main(["eval", "--checkpoint", str(checkpoint), "--task", "gsm8k,math500", "--limit", "2",
                 "--max-new-tokens", "3", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["gsm8k", "gsm8k", "math500", "math500"]
    assert rows[0]["gold"] == "18"  # Janet's ducks
    summary = json.loads(tasks.summary_path(out).read_text())
    assert [(s["task"], s["n"]) for s in summary] == [("gsm8k", 2), ("math500", 2)]
    assert all(len(s["ci95"]) == 2 and "accuracy" in s for s in summary)
    assert "| gsm8k | 2 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl", "answers.summary.json"]  # no progress


@needs_data
def test_an_interrupted_generation_task_continues_after_its_last_finished_batch(checkpoint, tmp_path, monkeypatch):
    args = dict(limit=5, batch_size=2, max_new_tokens=4, log=lambda *a: None)
    whole, (summary,) = tasks.evaluate_tasks(str(checkpoint), ["facts"], **args)
    real, batches = tasks.ArmGenerator.generate, []

    def generate(self, conversations, *a, **k):
        batches.append(len(conversations))
        if len(batches) == 2 and stop:
            raise KeyboardInterrupt  # killed inside the second batch
        return real(self, conversations, *a, **k)

    monkeypatch.setattr(tasks.ArmGenerator, "generate", generate)
    stop = True
    with pytest.raises(KeyboardInterrupt):
        tasks.evaluate_tasks(str(checkpoint), ["facts"], resume_dir=tmp_path, **args)
    assert len(json.loads(tasks.progress_path(tmp_path, "facts").read_text())["batches"]) == 1
    stop, batches[:] = False, []
    rows, (resumed,) = tasks.evaluate_tasks(str(checkpoint), ["facts"], resume_dir=tmp_path, **args)
    assert batches == [2, 1]  # the first batch is not generated again
    assert rows == whole and resumed["correct"] == summary["correct"] and resumed["generated_tokens"] == summary[
        "generated_tokens"]
    batches[:] = []  # the recorded batches are another model's for a different checkpoint name: all are redone
    tasks.evaluate_tasks(str(checkpoint) + "/", ["facts"], resume_dir=tmp_path, **args)
    assert batches == [2, 2, 1]


@pytest.mark.parametrize("argv, message", [
    (["--task", "gsm8k", "--data-dir", "/nonexistent/data"], "benchmark data not found: looked in /nonexistent/data"),
    (["--task", "gsm8k,squad"], "--task: unknown squad; choose from facts, gsm8k"),
    (["--task", "gsm8k", "--limit", "0"], "--limit 0: give a positive number"),
])
def test_bad_task_arguments_are_one_line_errors(checkpoint, argv, message, capsys):
    assert main(["eval", "--checkpoint", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
