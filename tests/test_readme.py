"""The README's Python example runs as printed (tiny random models, offline), in a scratch directory."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S)
    assert len(blocks) == 1, "the README has one Python example"
    for name in ("configs", "tests"):  # the config and its data, as seen from the repository root
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["out"].logits.shape[:2] == scope["ids"].shape
    assert (tmp_path / "runs" / "readme-copy" / "config.yaml").is_file()
