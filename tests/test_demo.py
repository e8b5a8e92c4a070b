"""The demo's code path end to end on tiny-random (the real run uses configs/default.yaml and real weights)."""
import json

import pytest

from llm_modules.__main__ import main


def test_demo_on_tiny_random(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--config", "configs/tiny-random.yaml", "--output-dir", str(out), "--eval-examples", "3",
                 "--train.max_steps", "4", "--train.feature_cache", "auto",
                 "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"combined", "small-alone", "wall_seconds"}
    for arm in ("combined", "small-alone"):
        assert results[arm]["steps"] == 4 and results[arm]["answered"] == 3
    printed = capsys.readouterr().out
    assert "| combined |" in printed and "| small-alone |" in printed and "held-out question" in printed
    assert (out / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_on_the_default_config(tmp_path):
    """The real main job (fetches Qwen2.5-Coder-0.5B, ~500 MB; about 15 minutes on 2 cores)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["combined"]["val_loss"] < results["small-alone"]["val_loss"]
