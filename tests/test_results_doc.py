"""docs/results.md, docs/warm-start.md and README.md: their generated blocks are what docs/results/measured.json
renders now (a hand edit or a stale file fails), and the data file is consistent with itself and the arm table."""
import copy
import re

import pytest

from llm_modules import results_doc
from llm_modules.experiment import ARMS
from llm_modules.tasks import wilson

DATA = results_doc.load()
WITH_BLOCKS = [p for p in results_doc.FILES if results_doc.BLOCK.search(p.read_text(encoding="utf-8"))]


def proportions(value):
    """Every {"k", "n", "ci95"} in the data, wherever it sits."""
    if isinstance(value, dict):
        if {"k", "n"} <= value.keys():
            yield value
        for v in value.values():
            yield from proportions(v)
    elif isinstance(value, list):
        for v in value:
            yield from proportions(v)


def test_results_and_warm_start_docs_have_blocks():
    names = {p.name for p in WITH_BLOCKS}
    assert {"results.md", "warm-start.md"} <= names


@pytest.mark.parametrize("path", WITH_BLOCKS, ids=lambda p: p.name)
def test_generated_blocks_are_what_the_data_renders(path):
    text = path.read_text(encoding="utf-8")
    assert results_doc.render(text, DATA) == text, (
        f"{path.name} is stale or hand-edited inside a generated block; run python -m llm_modules.results_doc")


def test_the_check_catches_one_changed_number():
    text = results_doc.FILES[0].read_text(encoding="utf-8")
    # a number edited by hand inside a block is rendered back
    edited = text.replace("119/600 = 0.198", "120/600 = 0.200", 1)
    assert edited != text and results_doc.render(edited, DATA) != edited
    # one count changed in the data changes what renders
    data = copy.deepcopy(DATA)
    data["suites"]["facts"]["rows"][0]["all"]["k"] += 1
    assert results_doc.render(text, data) != text


def test_check_mode_exits_1_on_a_stale_file(tmp_path, monkeypatch):
    stale = tmp_path / "stale.md"
    stale.write_text("prose\n<!-- generated: cost -->\nold\n<!-- /generated -->\nmore prose\n")
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    monkeypatch.setattr(results_doc, "FILES", (stale, plain))
    monkeypatch.setattr(results_doc, "ROOT", tmp_path)
    assert results_doc.main(["--check"]) == 1
    assert results_doc.main([]) == 0 and results_doc.main(["--check"]) == 0
    text = stale.read_text()
    assert text.startswith("prose\n<!-- generated: cost -->\n") and text.endswith("<!-- /generated -->\nmore prose\n")
    assert plain.read_text() == "no markers\n"


def test_every_count_reproduces_its_recorded_interval():
    found = list(proportions(DATA))
    assert len(found) > 200
    for p in found:
        if "ci95" in p:
            assert [f"{x:.3f}" for x in wilson(p["k"], p["n"])] == [f"{x:.3f}" for x in p["ci95"]], p
        assert 0 <= p["k"] <= p["n"]


def test_paired_counts_fit_their_items():
    for p in DATA["paired"]:
        assert p["a_only"] + p["b_only"] <= p["n"], p


def test_every_arm_is_an_experiment_arm_or_mapped():
    for name in results_doc.shown(DATA):
        assert name in ARMS or DATA["outside_arms"][name]["base"] in ARMS, name
    for suite in DATA["suites"].values():
        for r in suite["rows"]:
            if r["seed"]:
                assert f"{r['arm']}-seed{r['seed']}" in ARMS, r["arm"]


def test_the_glossary_lists_every_arm_the_tables_show():
    glossary = results_doc.glossary(DATA)
    listed = set(re.findall(r"^\| `([^`]+)` \|", glossary, re.M))
    assert results_doc.shown(DATA) <= listed
    assert not any(re.search(r"\d{4}-\d{2}-\d{2}|-seed\d", name) for name in listed)  # no dates, seeds are rows


def test_each_cited_comparison_is_in_the_data_and_in_the_prose():
    prose = results_doc.BLOCK.sub("", results_doc.FILES[0].read_text(encoding="utf-8"))
    cited = set(re.findall(r"\[(P\d+)\]", prose))
    assert cited == set(results_doc.CITED)
    for key in results_doc.CITED.values():
        assert results_doc._pairs(DATA, key), key


def test_the_summary_table_has_at_most_8_rows_one_family_each():
    rows = [ln for ln in results_doc.summary_table(DATA).splitlines()[2:]]
    assert len(rows) <= 8
    assert {ln.split(" | ")[0].strip("| ") for ln in rows} == set(results_doc.FAMILIES)
