"""Every relative Markdown link and image in README.md and docs/*.md points at a file that exists, and a `#anchor`
points at a heading of its target (GitHub's slugs). External links (http, https, mailto) are not checked."""
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a link there is an example, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def definitions(body: str) -> list[str]:
    """Targets of reference definitions (`[name]: target`); one cannot interrupt a paragraph, so it follows a blank
    line or another definition."""
    out, previous = [], ""
    for line in body.splitlines():
        m = REFERENCE.match(line)
        if m and (not previous.strip() or REFERENCE.match(previous)):
            out.append(m.group(1))
        previous = line
    return out


def links(text: str) -> list[str]:
    body = prose(text)
    return [t.strip("<>") for t in INLINE.findall(body) + definitions(body)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def problems(page: Path) -> list[str]:
    """Each broken relative link of `page`, as `page: target (why)`."""
    found = []
    for target in links(page.read_text()):
        if EXTERNAL.match(target):
            continue
        where, _, anchor = target.partition("#")
        dest = (page.parent / unquote(where)).resolve() if where else page
        name = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
        if not dest.exists():
            found.append(f"{page.relative_to(ROOT)}: {target} ({name} does not exist)")
        elif anchor and dest.suffix == ".md" and unquote(anchor).lower() not in anchors(dest):
            found.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor} in {name})")
    return found


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    assert problems(page) == []


def test_the_check_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Two words, `code`: here\n\n## Two words, `code`: here\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/b.md) [ok](docs/b.md#two-words-code-here) [ok](docs/b.md#two-words-code-here-1) ![ok](pic.png)\n"
        "[ok](#a) [ext](https://example.org/missing.md) `[code](missing.md)`\n\n# A\n\n"
        "[gone](docs/missing.md) ![gone](missing.png) [bad anchor](docs/b.md#nope) [self](#nowhere)\n"
        "```\n[fenced](fenced.md)\n```\n\n[ref]: docs/also-missing.md\nnot a definition\n[0.05, 0.13]: in prose\n"
    )
    assert problems(page) == [
        "README.md: docs/missing.md (docs/missing.md does not exist)",
        "README.md: missing.png (missing.png does not exist)",
        "README.md: docs/b.md#nope (no heading #nope in docs/b.md)",
        "README.md: #nowhere (no heading #nowhere in README.md)",
        "README.md: docs/also-missing.md (docs/also-missing.md does not exist)",
    ]


def test_slugs_match_github():
    assert slug("Couplings (`couplings.py`)") == "couplings-couplingspy"
    assert slug("GPU: the paper-size benchmark") == "gpu-the-paper-size-benchmark"
    assert slug("`--max-steps` is the schedule's horizon") == "--max-steps-is-the-schedules-horizon"
    assert slug("Training: live features vs the frozen-feature cache") == \
        "training-live-features-vs-the-frozen-feature-cache"


def test_readme_maps_every_docs_page():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links((ROOT / "README.md").read_text())}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert missing == [], f"README.md's docs map does not link {missing}"
