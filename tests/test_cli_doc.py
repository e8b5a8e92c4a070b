"""docs/cli.md is what scripts/cli_doc.py renders from the CLI's parser now, so the page cannot drift from the flags."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("cli_doc", ROOT / "scripts" / "cli_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_what_the_parser_renders():
    rendered = load_script().render()
    assert (ROOT / "docs" / "cli.md").read_text() == rendered, (
        "docs/cli.md is out of date with llm_modules/__main__.py: run `python scripts/cli_doc.py`, commit docs/cli.md")


def test_every_subcommand_and_flag_is_on_the_page():
    from llm_modules.__main__ import build_parser, subcommands

    page = (ROOT / "docs" / "cli.md").read_text()
    for name, sub in subcommands(build_parser()).items():
        assert f"\n## {name}\n" in page
        for action in sub._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in page, f"{name} {option} missing from docs/cli.md"
