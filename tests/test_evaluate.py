"""Answer extraction, held-out loss, distillation loss, the bridge probe and a miniature experiment."""
import json

import pytest
import torch
import torch.nn.functional as F

from llm_modules.evaluate import extract_answer, is_correct, normalize


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("so the total is \\boxed{\\frac{1}{2}} here", "\\frac{1}{2}"),
    ("<|begin_of_solution|> The answer is 12. <|end_of_solution|>", "The answer is 12."),
    ("<|begin_of_solution|> so \\boxed{7} <|end_of_solution|>", "7"),
    ("first 3 then 1,250 apples", "1,250"),
    ("no digits", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_numbers_compare_by_value():
    assert is_correct("1,000", "1000") and is_correct("$5.00", "5") and is_correct("2/4", "1/2")
    assert is_correct("-7", "-7.0") and not is_correct("7", "-7") and not is_correct(None, "1")
    assert normalize("Paris.") == "paris"


def test_kd_loss_is_forward_kl_over_the_student_vocabulary():
    from llm_modules.distill import kd_loss_sum

    torch.manual_seed(0)
    head = torch.randn(12, 5)  # teacher vocabulary 12, student vocabulary 10
    states, student = torch.randn(4, 5), torch.randn(4, 10)
    p_t = F.softmax(states @ head[:10].T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(student, -1))).sum()
    torch.testing.assert_close(kd_loss_sum(student, states, head, 1.0), expected)
    assert float(kd_loss_sum(states @ head[:10].T, states, head, 2.0)) == pytest.approx(0.0, abs=1e-5)


def test_kd_weight_falls_linearly_after_its_step(tmp_path):
    """A falling KL weight (train.distill_weight_end): constant up to distill_decay_from, then linear to the end
    value at the last step; the loss mixes the weight of the current step, and metrics.jsonl records it."""
    from types import SimpleNamespace

    from llm_modules.__main__ import main
    from llm_modules.distill import Distill

    d = Distill(torch.zeros(3, 2), 0.9, 1.0, weight_end=0.1, decay_from=60, max_steps=120)
    assert [d.weight_at(s) for s in (0, 60)] == [0.9, 0.9]
    assert d.weight_at(90) == pytest.approx(0.5) and d.weight_at(120) == pytest.approx(0.1)
    assert d.weight_at(500) == pytest.approx(0.1) and Distill(torch.zeros(3, 2), 0.7, 1.0).weight_at(99) == 0.7
    # The mix: the KL of identical distributions is 0, so the loss is (1 - w) * CE.
    states, labels = torch.randn(1, 3, 2), torch.tensor([[-100, 1, 2]])
    out = SimpleNamespace(target_logits=states[0, :2] @ d.head.T, loss_sum=torch.tensor(2.0))
    assert float(d(out, states, labels, step=90)) == pytest.approx(1.0, abs=1e-5)

    run = tmp_path / "run"
    assert main(["train", "--config", "configs/tiny-random.yaml", "--output-dir", str(run), "--max-steps", "3",
                 "--train.feature_cache", "auto", "--train.feature_cache_dir", str(tmp_path / "fc"),
                 "--train.distill_weight", "0.9", "--train.distill_weight_end", "0.1",
                 "--train.distill_decay_from", "1"]) == 0
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["distill_weight"] for r in records if "train_loss" in r] == pytest.approx([0.9, 0.9, 0.5])


def test_miniature_ablations_end_to_end(tmp_path):
    from llm_modules.__main__ import main
    from llm_modules.ablations import ARMS

    out = tmp_path / "exp"
    assert main(["ablations", "--config", "configs/tiny-random.yaml", "--budget", "3", "--output-dir", str(out),
                 "--eval-examples", "2", "--max-new-tokens", "4",
                 "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0
    results = json.loads((out / "results.json").read_text())
    table = (out / "results.md").read_text().splitlines()
    assert len([ln for ln in table if ln.startswith("| ") and "held-out" not in ln and "representation" not in ln
                and "|---" not in ln]) >= len(ARMS) + 1
    for arm in ARMS:
        r = results[arm]
        assert r["steps"] == 3 and r["val_loss"] > 0 and r["answered"] == 2, arm
        rows = [json.loads(ln) for ln in (out / arm / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows if "train_loss" in x] == [1, 2, 3], arm  # each arm really trained
    probe = {p["representation"]: p for p in results["probe"]}
    assert probe["source"]["top1_agreement"] == 1.0  # the read-out of the large state itself is exact
    assert set(probe) >= {"proj", "ffn", "cross_attn_1", "cross_attn_2", "bridge_output"}
    assert results["large-alone"]["val_loss"] > 0
    assert (out / "loss.png").stat().st_size > 1000


def test_reasoning_gym_own_scorer_judges_the_item_a_record_came_from():
    pytest.importorskip("reasoning_gym")
    from llm_modules.reasoning_tasks import reasoning_gym_items, reasoning_gym_score

    for source, n, messages in reasoning_gym_items(["chain_sum", "gcd"], 4, 3):
        gold = extract_answer(messages[-1]["content"])
        assert reasoning_gym_score(source, n, gold, 4, 3) == 1.0
        assert reasoning_gym_score(source, n, str(int(gold) + 1), 4, 3) == 0.0
