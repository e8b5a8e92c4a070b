"""The demo's code path end to end on tiny-random (the real run uses configs/default.yaml and real weights), as on a
user's machine: from a working directory with no shared data folder reachable, on the facts shipped in the package."""
import json
from pathlib import Path

import pytest

from llm_modules import benchmark_data, tasks
from llm_modules.__main__ import main
from llm_modules.errors import UserError
from test_tasks import DATA, needs_data

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-random.yaml")


@pytest.fixture
def no_shared_data(tmp_path, monkeypatch):
    """A working directory whose ../shared/data does not exist, no $LLM_MODULES_DATA, no shared/ beside the
    checkout: what a user who cloned the repository has."""
    work = tmp_path / "user" / "clone"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.delenv(benchmark_data.DATA_ENV, raising=False)
    monkeypatch.setattr(benchmark_data, "REPO_DATA", tmp_path / "nowhere" / "shared" / "data")
    return work


def test_demo_data_is_prepared_with_no_shared_data(no_shared_data):
    records = benchmark_data.train_records(["facts"], None, "sentence")
    root = benchmark_data.find_data_dir(None, ["facts"])
    items = tasks.GENERATION_TASKS["facts"].load(root)
    assert root == benchmark_data.PACKAGE_DATA
    assert benchmark_data.find_data_dir(None, ["facts_train"]) == root  # the text hint's train answers, likewise
    assert len(records) > 6000 and len(items) > 2800
    train_questions = {r[2][0]["content"] for r in records}
    assert not train_questions & {i.question for i in items}  # held-out questions never asked in training
    assert records[0][2][1]["content"].endswith(".")  # the sentence form the demo trains on


@needs_data
def test_the_shipped_facts_are_the_shared_ones():
    assert benchmark_data.facts_split(benchmark_data.PACKAGE_DATA) == benchmark_data.facts_split(DATA)


def test_no_data_for_other_benchmarks_names_each_place_once(no_shared_data):
    with pytest.raises(UserError) as e:
        benchmark_data.find_data_dir(None, ["facts", "gsm8k"])
    message = str(e.value)
    assert message.count(str(no_shared_data.parent / "shared" / "data")) == 1
    assert message.count(str(benchmark_data.REPO_DATA)) == 1
    assert "--data-dir hub" in message and "openai/gsm8k" in message


def test_demo_on_tiny_random(tmp_path, capsys, no_shared_data):
    out = tmp_path / "demo"
    assert main(["demo", "--config", TINY, "--output-dir", str(out), "--questions", "3",
                 "--steps", "2", "--train.num_threads", "1", "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"combined", "small-alone", "large-alone", "wall_seconds"}
    for arm in ("combined", "small-alone"):
        assert results[arm]["steps"] == 2 and results[arm]["trainable_params"] > 0
    for arm in ("combined", "small-alone", "large-alone"):
        assert results[arm]["facts"]["n"] == 3
    printed = capsys.readouterr().out
    assert "| combined (" in printed and "| small-alone (" in printed and "| large-alone (" in printed
    assert "Q1." in printed and "Q3." in printed and printed.count("reference:") == 3
    assert (out / "loss.png").stat().st_size > 1000
    assert main(["demo", "--config", TINY, "--output-dir", str(out), "--questions", "3",
                 "--steps", "2", "--train.num_threads", "1",
                 "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0  # a rerun finds everything done


@pytest.mark.slow
def test_demo_on_the_default_config(tmp_path):
    """The real main job (fetches Qwen2.5-Coder-0.5B, ~500 MB; about 15 minutes on 2 cores)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["combined"]["facts"]["accuracy"] > results["small-alone"]["facts"]["accuracy"]
