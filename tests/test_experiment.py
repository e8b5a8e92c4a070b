"""`llm-modules experiment`: arms trained in their own processes, evaluated once, reported, resumed without redoing."""
import json
from dataclasses import replace

import pytest

from llm_modules import LLMModulesConfig
from llm_modules.__main__ import main
from llm_modules.experiment import ARMS, DEFAULT_ARMS, SUITES, arm_config
from test_tasks import needs_data


@needs_data
def test_miniature_experiment_trains_evaluates_reports_and_does_not_redo_work(tmp_path, monkeypatch):
    from llm_modules import experiment

    tiny = replace(experiment.QUICK["facts"], data={**experiment.QUICK["facts"].data, "max_examples": 60}, steps=2,
                   batch_size=4, tests={"facts": 4}, curve_task=("facts", 3), curve_points=2)
    monkeypatch.setitem(experiment.QUICK, "facts", tiny)
    out = tmp_path / "exp"
    argv = ["experiment", "--quick", "--config", "configs/tiny-random.yaml", "--suites", "facts",
            "--arms", "large-alone,combined-large,lora", "--output-dir", str(out), "--train.num_threads", "1",
            "--train.feature_cache_dir", str(tmp_path / "fc")]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["suites"]["facts"]
    assert set(results) == {"large-alone", "combined-large", "lora"}
    for name, r in results.items():
        assert r["eval"]["facts"]["n"] == 4 and set(r["speed"]) == {"batch_1", "batch_16"}, name
    assert results["large-alone"]["trainable_params"] == 0
    assert results["combined-large"]["steps"] == 2 and results["lora"]["steps"] == 2
    lora, combined = results["lora"]["trainable_params"], results["combined-large"]["trainable_params"]
    assert abs(lora - combined) / combined < 0.5  # the rank is chosen for the combined model's count
    assert [p["step"] for p in results["combined-large"]["curve"]] == [0, 1, 2]
    assert not (out / "facts" / "combined-large" / "checkpoints").exists()  # best/ only: the curve has read them
    assert "peak_memory_gib" in results["combined-large"] and results["combined-large"]["wall_seconds"] > 0
    table = (out / "results.md").read_text()
    assert "| combined-large |" in table and "| lora |" in table and "Known relations" in table
    train = sum(r["wall_seconds"] for r in results.values() if "wall_seconds" in r) / 60
    assert f"Time: training {train:.1f} min and test evaluations" in table
    assert (out / "curves-facts.png").stat().st_size > 1000 and (out / "frontier-facts.png").stat().st_size > 1000
    logs = {p: p.stat().st_mtime_ns for p in out.rglob("*.log")}
    assert main(argv) == 0  # a rerun finds every arm trained and every evaluation written
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.log")} == logs
    rerun = json.loads((out / "results.json").read_text())["suites"]["facts"]
    assert rerun["combined-large"]["curve"] == results["combined-large"]["curve"]  # read back, checkpoints gone
    one = argv[:argv.index("--arms") + 1] + ["large-alone"] + argv[argv.index("--arms") + 2:]
    assert main(one) == 0  # one arm run again: the report still has the others
    assert set(json.loads((out / "results.json").read_text())["suites"]["facts"]) == set(results)
    assert "| lora |" in (out / "results.md").read_text()


def test_an_arm_with_a_frozen_head_counts_only_what_trains(tmp_path):
    from llm_modules import experiment

    base = LLMModulesConfig.from_yaml("configs/tiny-random.yaml")
    wide, head0 = (experiment.trainable_count(experiment.arm_config(base, experiment.QUICK["facts"], ARMS[a], tmp_path))
                   for a in ("combined-large-wide", "combined-large-wide-head0"))
    assert wide - head0 == 768 * 259  # the 768-wide head over the byte-level vocabulary


@needs_data
def test_sigterm_stops_the_arm_being_trained_and_a_rerun_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text(open("configs/tiny-random.yaml").read())
    argv = [sys.executable, "-m", "llm_modules", "experiment", "--quick", "--config", str(cfg), "--suites", "facts",
            "--arms", "small-alone", "--output-dir", str(tmp_path / "exp"), "--train.num_threads", "1",
            "--train.feature_cache_dir", str(tmp_path / "fc"), "--data.max_examples", "200"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "exp" / "facts" / "small-alone" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and '"train_loss"' in metrics.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 143, out
    assert "saved what it had" in out and not (metrics.parent / "train.json").exists()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resumed from" in (metrics.parent / "train.log").read_text()
    steps = [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()]
    from llm_modules.experiment import QUICK

    assert steps[-1] == QUICK["facts"].steps and steps == sorted(set(steps))  # every step once, to the end
    runs = [json.loads(ln) for ln in (metrics.parent / "train.runs.jsonl").read_text().splitlines()]
    cost = json.loads((metrics.parent / "train.json").read_text())
    assert [r["exit"] for r in runs] == [143, 0] and cost["runs"] == 2  # the interrupted run's time counts too
    assert cost["wall_seconds"] == sum(r["wall_seconds"] for r in runs)


def test_unknown_arm_or_suite_is_a_clear_error(capsys):
    assert main(["experiment", "--arms", "combined-paper,gpt5"]) == 2
    assert "--arms: unknown gpt5; choose from large-alone, combined-paper" in capsys.readouterr().err
    assert main(["experiment", "--suites", "mmlu"]) == 2
    assert "--suites: unknown mmlu; choose from facts, gsm8k" in capsys.readouterr().err


def test_every_paired_comparison_names_two_arms_and_the_sentence_arms_train_on_sentences():
    """paired_table (and carried_table) skip a pair whose answers are missing, so a misspelt arm in PAIRS (CARRIED)
    would silently drop a row of docs/results.md; and each -sentence arm must differ from its twin only in the
    answer form."""
    from llm_modules.report import CARRIED, PAIRS

    assert [p for p in PAIRS + CARRIED if not set(p) <= set(ARMS)] == []
    for name in [n for n in ARMS if n.endswith("-sentence")]:
        twin = ARMS[name.removesuffix("-sentence")].over
        assert ARMS[name].over == {**twin, "data": {**twin.get("data", {}), "facts_answer": "sentence"}}, name


def test_a_seeded_arm_differs_from_its_twin_only_in_its_seeds(tmp_path):
    """A -seedN arm measures run-to-run spread: the same data, held-out split and steps, other random draws."""
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    seeded = [n for n in ARMS if n.endswith("-seed1") and not ARMS[n].share]  # the split suite's: test_fusion.py
    assert seeded and all(ARMS[n].followup for n in seeded)
    for name in seeded:
        twin, arm = (arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict()
                     for n in (name.removesuffix("-seed1"), name))
        assert (arm["bridge"].pop("seed"), arm["train"].pop("seed")) == (1, 1)
        twin["bridge"].pop("seed"), twin["train"].pop("seed")
        assert arm == twin and arm["data"]["seed"] == 0, name


def test_a_longer_arm_differs_from_its_twin_only_in_its_steps(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    longer = [n for n in ARMS if n.endswith("-240steps")]
    assert longer and all(ARMS[n].followup for n in longer)
    for name in longer:
        twin, arm = (arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict()
                     for n in (name.removesuffix("-240steps"), name))
        assert (arm["train"].pop("max_steps"), twin["train"].pop("max_steps")) == (240, SUITES["facts"].steps)
        assert arm == twin, name


def test_the_two_stage_prompt_variants_differ_from_the_two_stage_arm_only_in_their_lever(tmp_path):
    """Each variant of the two-stage prompt arm changes one thing: how many memory layers, or how long the first
    stage is."""
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    twin = arm_config(base, SUITES["facts"], ARMS["prompt-smollm-sentence-2stage-1.5b"], tmp_path).to_dict()
    assert (twin["bridge"]["every"], twin["train"]["max_steps"], twin["train"]["small_from_step"]) == (6, 240, 120)
    levers = {"prompt-smollm-sentence-2stage-every3-1.5b": {"bridge": {"every": 3}},
              "prompt-smollm-sentence-2stage-every2-1.5b": {"bridge": {"every": 2}},
              "prompt-smollm-sentence-2stage240-1.5b": {"train": {"max_steps": 360, "small_from_step": 240}}}
    for name, lever in levers.items():
        arm = arm_config(base, SUITES["facts"], ARMS[name], tmp_path).to_dict()
        assert arm == {k: {**v, **lever.get(k, {})} if isinstance(v, dict) else v for k, v in twin.items()}, name


def test_the_open_gate_prompt_arm_differs_from_the_prompt_arm_in_its_gates_and_answer_form_only(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    twin, arm = (arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict()
                 for n in ("prompt-smollm", "prompt-smollm-sentence-lrgate"))
    assert (arm["train"].pop("lr_gate"), twin["train"].pop("lr_gate")) == (1.0e-2, None)
    assert (arm["data"].pop("facts_answer"), twin["data"].pop("facts_answer")) == ("sentence", "object")
    assert arm == twin


def test_the_open_gate_prompt_arm_reading_the_1_5b_model_differs_from_its_twin_in_the_large_model_only(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    twin, arm = (arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict()
                 for n in ("prompt-smollm-sentence-lrgate", "prompt-smollm-sentence-lrgate-1.5b"))
    names = arm["large"].pop("name_or_path"), twin["large"].pop("name_or_path")
    assert names == ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert arm == twin


def test_the_frozen_and_two_stage_prompt_arms_differ_from_their_open_gate_twin_in_how_smollm2_trains_only(tmp_path):
    base = LLMModulesConfig.from_yaml("configs/default.yaml")
    twin, arm = (arm_config(base, SUITES["facts"], ARMS[n], tmp_path).to_dict()
                 for n in ("prompt-smollm-sentence-lrgate-1.5b", "prompt-smollm-sentence-frozen-1.5b"))
    assert (arm["train"].pop("lr_small"), twin["train"].pop("lr_small")) == (0.0, 5.0e-5)
    assert arm == twin and arm["train"]["lr_head"] is None  # the head (tied to the embedding) freezes with SmolLM2
    two = arm_config(base, SUITES["facts"], ARMS["prompt-smollm-sentence-2stage-1.5b"], tmp_path).to_dict()
    assert (two["train"].pop("small_from_step"), two["train"].pop("max_steps"), two["train"].pop("lr_small")) == (
        120, 240, 5.0e-5)  # the frozen arm's 120 steps, then SmolLM2 at its rate for 120 more
    assert (twin["train"].pop("small_from_step"), twin["train"].pop("max_steps")) == (0, 120)
    assert two == twin


def test_follow_up_arms_run_when_named_or_with_all(tmp_path, monkeypatch):
    from llm_modules import experiment

    chosen = []
    monkeypatch.setattr(experiment, "run_experiment",
                        lambda cfg, out, *, suites, arms, quick: chosen.append((suites, arms)))
    base = ["experiment", "--config", "configs/tiny-random.yaml", "--output-dir", str(tmp_path)]
    for extra in ([], ["--arms", "all"], ["--arms", "combined-large-wide-head0"]):
        assert main(base + extra) == 0
    assert chosen[0] == (["facts", "gsm8k"], None)  # not given: each suite's own arms, DEFAULT_ARMS for these two
    assert not SUITES["facts"].arms and not SUITES["gsm8k"].arms and "combined-large-wide-kd" in DEFAULT_ARMS
    assert not {"combined-large-wide-lr1e-5", "combined-large-wide-head0", "combined-large-wide-kd0.9",
                 "combined-large-wide-kd0.7", "combined-large-wide-kd0.9to0"} & set(DEFAULT_ARMS)
    assert chosen[1][1] == list(ARMS) and chosen[2][1] == ["combined-large-wide-head0"]


@needs_data
def test_own_solutions_keep_the_large_models_right_answers_as_the_arms_training_data(tmp_path, monkeypatch, capsys):
    """combined-large-wide-own: the large model answers GSM8K train problems (task gsm8k_train); the answers judged
    right become the arm's training conversations, in place of the data set's solutions; a suite without own
    solutions (facts) skips the arm."""
    from llm_modules import experiment, tasks
    from llm_modules.data import load_data

    train = [json.loads(ln) for ln in open("../shared/data/gsm8k/train.jsonl")][:16]
    items = tasks.GENERATION_TASKS["gsm8k_train"].load(tasks.find_data_dir(None))
    assert [i.question for i in items[:16]] == [r["question"] for r in train] and items[0].id == "gsm8k_train/0"
    right = {"gsm8k_train/1", "gsm8k_train/4"}  # the tiny random model answers nothing right: say these were
    monkeypatch.setitem(tasks.GENERATION_TASKS, "gsm8k_train", replace(
        tasks.GENERATION_TASKS["gsm8k_train"], judge=lambda output, item: (None, item.id in right)))
    base = LLMModulesConfig.from_yaml("configs/tiny-random.yaml")
    suite = experiment.QUICK["gsm8k"]
    path = experiment.own_solutions(base, suite, tmp_path)
    answers = {r["id"]: r for r in map(json.loads, (tmp_path / "large-alone" / "eval" / "gsm8k_train.jsonl").open())}
    assert len(answers) == suite.data["max_examples"] == 16
    kept = [json.loads(ln)["messages"] for ln in path.read_text().splitlines()]
    assert kept == [[{"role": "user", "content": answers[i]["question"]},
                     {"role": "assistant", "content": answers[i]["output"]}] for i in sorted(right)]
    cfg = experiment.arm_config(base, suite, ARMS["combined-large-wide-own"], tmp_path / "own", path)
    assert cfg.data.path == str(path) and cfg.data.benchmarks == []
    bundle, _ = load_data(cfg, log=lambda _: None)
    assert len(bundle.train) + len(bundle.val) == 2
    assert main(["experiment", "--quick", "--config", "configs/tiny-random.yaml", "--suites", "facts", "--arms",
                 "combined-large-wide-own", "--output-dir", str(tmp_path / "exp")]) == 0
    assert "facts / combined-large-wide-own: skipped" in capsys.readouterr().out


@pytest.mark.slow
@needs_data
def test_quick_experiment_on_real_weights(tmp_path):
    """Every arm of the issue (the default: the follow-up arms run when named) on small slices (about 18 minutes on 2
    cores; fetches SmolLM2-135M)."""
    out = tmp_path / "exp"
    assert main(["experiment", "--quick", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["suites"]
    assert set(results) == {"facts", "gsm8k"}
    for suite in results.values():
        assert set(suite) == set(DEFAULT_ARMS) and "combined-large-wide-head0" not in suite


def test_paired_comparison_counts_discordant_items_and_gives_the_exact_sign_test(tmp_path):
    from llm_modules.report import paired_table, sign_test

    assert sign_test(11, 2) == 2 * (1 + 13 + 78) / 2**13  # P(X <= 2 | 13 fair coins), both tails
    assert sign_test(0, 0) == 1.0 and sign_test(4, 4) == 1.0 and sign_test(0, 6) == 2 / 2**6
    rows = {"combined-large-wide-kd": [True, True, False, True], "combined-large-wide": [False, True, True, False]}
    for arm, flags in rows.items():
        d = tmp_path / "facts" / arm / "eval"
        d.mkdir(parents=True)
        (d / "facts.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "correct": c, "answer_in_train": i < 2}) + "\n" for i, c in enumerate(flags)))
    table = paired_table(tmp_path, "facts", "facts").splitlines()
    assert table[2] == "| combined-large-wide-kd | combined-large-wide | all (4) | 2 | 1 | 1.0000 |"
    assert table[3] == ("| combined-large-wide-kd | combined-large-wide | answers never seen in training (2) | 1 | 1 "
                        "| 1.0000 |")
    assert len(table) == 4  # pairs with an arm not evaluated are left out


def test_carried_counts_what_only_the_large_model_knows_and_how_much_of_it_the_arm_gets(tmp_path):
    from llm_modules.report import carried_table

    flags = {"large-alone-1.5b": [True, True, True, False, True],
             "smollm-ft-sentence": [False, False, True, False, True],
             "prompt-smollm-sentence-frozen-1.5b": [True, False, False, True, True]}
    for arm, correct in flags.items():
        d = tmp_path / "facts" / arm / "eval"
        d.mkdir(parents=True)
        (d / "facts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "correct": c, "answer_in_train": i == 1})
                                               + "\n" for i, c in enumerate(correct)))
    table = carried_table(tmp_path).splitlines()
    assert table[2:] == [  # q0 and q1 only the large model gets; the arm gets q0, which was never seen in training
        "| prompt-smollm-sentence-frozen-1.5b | large-alone-1.5b | smollm-ft-sentence: 2 (all) | 1 |",
        "| prompt-smollm-sentence-frozen-1.5b | large-alone-1.5b | smollm-ft-sentence: 1 "
        "(answers never seen in training) | 1 |"]


def test_paired_comparisons_cover_every_task_of_the_suite_its_own_first(tmp_path):
    from llm_modules.report import paired_sections

    for arm, (gsm8k, hellaswag) in {"combined-large": ([True, False], [True, True, False]),
                                    "combined-paper": ([False, False], [False, True, True])}.items():
        d = tmp_path / "gsm8k" / arm / "eval"
        d.mkdir(parents=True)
        for task, flags in (("gsm8k", gsm8k), ("hellaswag", hellaswag)):
            (d / f"{task}.jsonl").write_text("".join(json.dumps({"id": f"{task}/{i}", "correct": c}) + "\n"
                                                     for i, c in enumerate(flags)))
    results = {"suites": {"gsm8k": {a: {"eval": {"hellaswag": {}, "gsm8k": {}}} for a in ("combined-large",
                                                                                         "combined-paper")}}}
    sections = paired_sections(results, tmp_path, "gsm8k")
    assert [s.splitlines()[0] for s in sections] == ["Paired comparisons on the same gsm8k items:",
                                                     "Paired comparisons on the same hellaswag items:"]
    assert sections[0].splitlines()[-1] == "| combined-large | combined-paper | all (2) | 1 | 0 | 1.0000 |"
    assert sections[1].splitlines()[-1] == "| combined-large | combined-paper | all (3) | 1 | 1 | 1.0000 |"


def test_facts_curves_get_a_panel_for_answers_never_seen_in_training(tmp_path):
    import struct

    from llm_modules.report import plot_curves

    def acc(a, unseen=None):
        s = {"accuracy": a, "ci95": [a - 0.1, a + 0.1], "n": 10}
        return s if unseen is None else {**s, "unseen_answers": acc(unseen)}

    for suite, extra in (("facts", 0.05), ("gsm8k", None)):
        results = {"suites": {suite: {"large-alone": {"eval": {suite: acc(0.2, extra)}},
                                      "combined-large": {"eval": {}, "curve": [{"step": k, **acc(0.1 * k, extra)}
                                                                               for k in (0, 1)]}}}}
        plot_curves(results, tmp_path, suite, tmp_path / f"{suite}.png")
        width = struct.unpack(">I", (tmp_path / f"{suite}.png").read_bytes()[16:20])[0]  # the PNG header's width
        assert width == (1400 if extra else 700), suite


def test_curve_points_reuse_the_loaded_model_with_each_checkpoints_weights(tmp_path):
    """with_weights: the trained tensors of a step checkpoint copied into the arm's loaded model give the logits a
    separate load of that checkpoint gives (the large model is not loaded again per curve point)."""
    import torch

    from llm_modules.experiment import load_once, with_weights
    from llm_modules.loading import load_for_eval

    out = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny-random.yaml", "--output-dir", str(out), "--max-steps", "2",
                 "--save-every", "1", "--train.keep_every", "1", "--train.num_threads", "1"]) == 0
    load = load_once(out, False)  # best/ (or the latest): the arm's model as its evaluations load it
    ids = torch.randint(0, 8, (1, 12), generator=torch.Generator().manual_seed(0))
    for step in (0, 2):
        checkpoint = out / "checkpoints" / f"step-{step:08d}"
        swapped, own = with_weights(load, checkpoint)()[0], load_for_eval(checkpoint)[0]
        assert swapped is load()[0]  # the same model object, not a new load
        with torch.no_grad():
            assert torch.equal(swapped(ids).logits, own(ids).logits), step
    with torch.no_grad():  # and the two points differ: the weights were really swapped
        first = with_weights(load, out / "checkpoints" / "step-00000000")()[0](ids).logits
        assert not torch.equal(first, with_weights(load, out / "checkpoints" / "step-00000002")()[0](ids).logits)


def test_an_arms_peak_memory_is_its_own_not_the_experiment_process_s(tmp_path):
    """The kernel carries a process's ru_maxrss across exec into the program it starts: an arm trained from an
    experiment process holding 2 GiB used to report at least 2 GiB whatever it used itself."""
    import subprocess
    import sys

    from llm_modules.experiment import SEGMENTS, run_process

    held = bytearray(2 * 2 ** 30)  # resident: bytearray zero-fills every page
    run_process(["--help"], tmp_path / "arm" / "train.log")
    (row,) = [json.loads(ln) for ln in (tmp_path / "arm" / SEGMENTS).read_text().splitlines()]
    probe = "from llm_modules.finetune import peak_memory_gib; print(peak_memory_gib())"
    own = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    del held
    assert row["exit"] == 0 and 0 < row["peak_memory_gib"] < 1.5
    assert 0 < own < 1.5  # finetune.json's figure, measured inside the process: its own too
