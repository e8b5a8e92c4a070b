"""The demo's code path end to end on tiny-random (the real run uses configs/default.yaml and real weights)."""
import json

import pytest

from llm_modules.__main__ import main
from test_tasks import needs_data


@needs_data
def test_demo_on_tiny_random(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--config", "configs/tiny-random.yaml", "--output-dir", str(out), "--questions", "3",
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
    assert main(["demo", "--config", "configs/tiny-random.yaml", "--output-dir", str(out), "--questions", "3",
                 "--steps", "2", "--train.num_threads", "1",
                 "--train.feature_cache_dir", str(tmp_path / "fc")]) == 0  # a rerun finds everything done


@pytest.mark.slow
@needs_data
def test_demo_on_the_default_config(tmp_path):
    """The real main job (fetches Qwen2.5-Coder-0.5B, ~500 MB; about 15 minutes on 2 cores)."""
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["combined"]["facts"]["accuracy"] > results["small-alone"]["facts"]["accuracy"]
