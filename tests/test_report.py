"""The report's statistics: Holm's adjustment, the paired interval, pooling over seeds, the union ceiling."""
import json

import pytest

from llm_modules.report import (ceiling_line, holm, paired_difference, pooled_pairs, questions_interval, summary_stats,
                                summary_table, union_line)


def test_holm_adjusts_a_known_example_and_keeps_the_input_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([0.02]) == [0.02] and holm([]) == []


def test_the_paired_interval_matches_newcombes_published_example():
    # Cavo et al. (2012), complete response before / after consolidation therapy: 59 both, 6 first only, 16 second
    # only, 80 neither; Fagerland, Lydersen & Laake (2013), ch. 8: -0.0621 (95% CI -0.1186 to -0.0046).
    d, (lo, hi) = paired_difference(a_only=6, b_only=16, both=59, neither=80)
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)
    d2, ci2 = paired_difference(a_only=16, b_only=6, both=59, neither=80)  # the arms swapped: the mirror image
    assert d2 == pytest.approx(-d) and ci2 == pytest.approx([-hi, -lo])
    assert paired_difference(0, 0, 10, 10)[0] == 0.0 and paired_difference(0, 0, 0, 0) == (0.0, [-1.0, 1.0])


def write(out, arm, flags, suite="facts", unseen=(0,)):
    d = out / suite / arm / "eval"
    d.mkdir(parents=True)
    if not arm.startswith("large-alone"):  # a trained arm (the large model alone is not)
        (d.parent / "train.json").write_text("{}")
    (d / "facts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "correct": c, "answer_in_train": i not in unseen})
                                           + "\n" for i, c in enumerate(flags)))


def test_pooling_pairs_seed_s_with_seed_s_and_an_untrained_arm_with_every_seed(tmp_path):
    write(tmp_path, "lora-sentence-1.5b", [1, 1, 0, 0])  # seed 0
    write(tmp_path, "lora-sentence-1.5b-seed1", [0, 0, 0, 0])
    write(tmp_path, "lora-sentence-1.5b-seed2", [1, 1, 1, 1])  # no seed 2 of the other arm: left out
    write(tmp_path, "smollm-ft-sentence", [1, 0, 0, 0])
    write(tmp_path, "smollm-ft-sentence-seed1", [1, 1, 1, 1])
    c = pooled_pairs(tmp_path, "facts", "facts", "lora-sentence-1.5b", "smollm-ft-sentence")
    # seed 0: q0 both, q1 A only, q2-3 neither; seed 1: all four B only. Per question over the seeds: q0 -1/2, q1 0,
    # q2 -1/2, q3 -1/2.
    means = [-0.5, 0.0, -0.5, -0.5]
    assert c == {"seeds": [0, 1], "n": 8, "both": 1, "a_only": 1, "b_only": 4, "neither": 2, "a_correct": 2,
                 "b_correct": 5, "questions": 4, "a_better": 0, "b_better": 3, "cluster_ci": questions_interval(means)}
    write(tmp_path, "large-alone-1.5b", [0, 1, 1, 0])  # the large model alone: one run, the same for every seed
    c = pooled_pairs(tmp_path, "facts", "facts", "lora-sentence-1.5b", "large-alone-1.5b")
    assert c["seeds"] == [0, 1, 2] and c["n"] == 12
    write(tmp_path, "lora-sentence", [1, 0, 0, 0])  # a trained arm of one seed: paired with seed 0 only
    assert pooled_pairs(tmp_path, "facts", "facts", "lora-sentence-1.5b", "lora-sentence")["seeds"] == [0]
    assert (c["both"], c["a_only"], c["b_only"], c["neither"]) == (1 + 0 + 2, 1 + 0 + 2, 1 + 2 + 0, 1 + 2 + 0)
    unseen = pooled_pairs(tmp_path, "facts", "facts", "lora-sentence-1.5b", "smollm-ft-sentence",
                          lambda r: not r["answer_in_train"])
    assert unseen["n"] == 2 and unseen["both"] == 1 and unseen["b_only"] == 1  # q0 of seeds 0 and 1


def test_the_interval_with_questions_as_units_is_the_mean_plus_minus_z_standard_errors():
    # means 1, 1, 0, -1: mean 0.25, sample variance 2.75 / 3, standard error sqrt(0.9167 / 4) = 0.4787
    lo, hi = questions_interval([1.0, 1.0, 0.0, -1.0])
    assert (round(lo, 4), hi) == (round(0.25 - 1.96 * 0.478714, 4), 1.0)  # capped at 1
    lo, hi = questions_interval([0.5, 0.0, 0.5, 0.0])
    assert (lo + hi) / 2 == pytest.approx(0.25) and hi - lo == pytest.approx(2 * 1.96 * (1 / 12) ** 0.5 / 2)
    # one seed: the paired Wald interval (with the sample variance): 10 of 20 A only, the rest level
    d = [1.0] * 10 + [0.0] * 10
    assert questions_interval(d) == pytest.approx([0.5 - 1.96 * (0.25 * 20 / 19 / 20) ** 0.5,
                                                   0.5 + 1.96 * (0.25 * 20 / 19 / 20) ** 0.5])


def test_the_summary_table_has_a_row_per_comparison_and_subset_with_holm_over_all_rows(tmp_path):
    write(tmp_path, "lora-sentence-1.5b", [1] * 12 + [0] * 8)
    write(tmp_path, "large-alone-1.5b", [1] * 2 + [0] * 18)
    write(tmp_path, "smollm-ft-sentence", [1] * 10 + [0] * 10)
    rows = summary_stats(tmp_path, "facts", "facts")
    assert [(r["arm"], r["compared_with"], r["subset"]) for r in rows] == [
        ("lora-sentence-1.5b", "large-alone-1.5b", "all"),
        ("lora-sentence-1.5b", "large-alone-1.5b", "answers never seen in training"),
        ("lora-sentence-1.5b", "smollm-ft-sentence", "all"),
        ("lora-sentence-1.5b", "smollm-ft-sentence", "answers never seen in training")]
    assert rows[0]["difference"] == pytest.approx(0.5) and rows[0]["p"] == pytest.approx(2 / 2 ** 10)
    assert [r["p_holm"] for r in rows] == pytest.approx(holm([r["p"] for r in rows]))
    table = summary_table(tmp_path, "facts").splitlines()
    assert table[2].startswith("| lora-sentence-1.5b | large-alone-1.5b | all (20) | 0 | 0.600 | 0.100 | +50.0 [")
    assert rows[0]["a_better"] == rows[0]["a_only"] == 10 and rows[0]["b_better"] == 0  # one seed: the same counts
    assert table[2].endswith(f"| 10 | 0 | 0.0020 | {rows[0]['p_holm']:.4f} |") and len(table) == 6


def test_the_union_ceiling_counts_items_right_with_either_model(tmp_path):
    write(tmp_path, "smollm-ft-sentence", [1, 1, 0, 0])
    write(tmp_path, "large-alone-1.5b", [0, 1, 1, 0])
    assert union_line(tmp_path, "facts") == (
        "The union ceiling (right with smollm-ft-sentence or with large-alone-1.5b, item by item): all: 3/4 = 0.750 "
        "[0.301, 0.954]; answers never seen in training: 1/1 = 1.000 [0.207, 1.000].")


def test_an_arm_against_the_union_ceiling_is_paired_item_by_item(tmp_path):
    write(tmp_path, "smollm-ft-sentence", [1, 1, 0, 0, 0])
    write(tmp_path, "large-alone-1.5b", [0, 1, 1, 0, 0])
    write(tmp_path, "lora-sentence-1.5b", [1, 0, 0, 1, 0])  # the ceiling: q0-q2; LoRA q0 and q3
    d, (lo, hi) = paired_difference(a_only=1, b_only=2, both=1, neither=1)
    assert ceiling_line(tmp_path, "facts", "lora-sentence-1.5b").startswith(
        f"lora-sentence-1.5b against that ceiling (smollm-ft-sentence or large-alone-1.5b): all (5): {100 * d:+.1f} "
        f"points [{100 * lo:+.1f}, {100 * hi:+.1f}], right only with it 1, only in the ceiling 2, p = 1.0000; ")
    assert ceiling_line(tmp_path, "facts", "fusion-smollm-ft-1.5b") == ""  # not evaluated
