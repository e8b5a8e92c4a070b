"""The package reads top to bottom: the layout in docs/architecture.md lists every module, and no module imports (even
lazily, inside a function) one listed below it, so there is no import cycle and nothing in the library imports the
CLI."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_modules"


def package_imports(path: Path) -> set[str]:
    """The package modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llm_modules."):
            found.add(node.module.split(".")[1])
    return found - {path.stem}


def layout_order() -> list[str]:
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Layout"):]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    order = []
    for name in re.findall(r"\b([a-z_]+)\.py\b", section):
        if name not in order and (PACKAGE / f"{name}.py").is_file():
            order.append(name)
    return order


def test_layout_lists_every_module_and_no_import_runs_back_up():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    order = layout_order()
    assert set(order) == modules, f"docs/architecture.md layout misses {sorted(modules - set(order))}"
    rank = {m: i for i, m in enumerate(order)}
    upward = [f"{m} imports {d}" for m in order for d in sorted(package_imports(PACKAGE / f"{m}.py"))
              if d in rank and rank[d] > rank[m]]
    assert upward == []
