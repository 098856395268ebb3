"""The documentation against the code: the README's configuration table lists exactly the
flags `dovetail serve` accepts, the README stays short, the docs pages exist, and every
relative link in README.md and docs/*.md points to a file that exists. Fast, no model."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from server.settings import add_arguments

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_PAGES = ["results.md", "how-it-works.md", "training.md", "api.md", "development.md"]
MAX_LINES = 200
MAX_BYTES = 16000


def serve_flags() -> tuple[set[str], set[str]]:
    """(the flags the README must list, every option string `dovetail serve` accepts).
    An on/off option must be listed in its positive form (`--x`); `--no-x` may be listed too."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    required: set[str] = set()
    accepted: set[str] = set()
    for action in parser._actions:
        long_options = [o for o in action.option_strings if o.startswith("--")]
        accepted.update(action.option_strings)
        if isinstance(action, argparse.BooleanOptionalAction):
            required.update(o for o in long_options if not o.startswith("--no-"))
        else:
            required.update(long_options)
    return required - {"--help"}, accepted - {"-h", "--help"}


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next heading of level 1 or 2)."""
    match = re.search(rf"^##[ \t]+{re.escape(heading)}[ \t]*$(.*?)(?=^#{{1,2}}[ \t]|\Z)",
                      text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def table_flags(section_text: str) -> list[str]:
    """The flags in the first column of the section's table rows (header and rule skipped)."""
    flags = []
    for line in section_text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        first = line.strip("|").split("|")[0]
        if set(first.strip()) <= set("-: "):
            continue  # the |---|---| rule
        for code in re.findall(r"`([^`]+)`", first):
            flags += re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", code)
    return flags


def readme_table_flags() -> list[str]:
    return table_flags(section(README.read_text(encoding="utf-8"), "Configuration"))


def test_the_configuration_table_lists_every_flag():
    required, _ = serve_flags()
    assert required, "add_arguments defined no flags"
    missing = sorted(required - set(readme_table_flags()))
    assert not missing, f"flags of `dovetail serve` missing from README's Configuration: {missing}"


def test_the_configuration_table_lists_only_real_flags():
    _, accepted = serve_flags()
    listed = readme_table_flags()
    assert listed, "README's Configuration section has no table of backticked flags"
    unknown = sorted(set(listed) - accepted)
    assert not unknown, f"README's Configuration lists flags `dovetail serve` lacks: {unknown}"
    repeated = sorted({flag for flag in listed if listed.count(flag) > 1})
    assert not repeated, f"flags listed twice in README's Configuration: {repeated}"


def test_table_parsing():
    text = """
## Configuration

| flag | default | meaning |
|---|---|---|
| `--draft-tokens` | `8` | see `--draft` |
| `--flash-attn` / `--no-flash-attn` | off | x |
| `--model PATH` | none | y |

## Results

| `--not-here` | 1 | z |
"""
    assert table_flags(section(text, "Configuration")) == [
        "--draft-tokens", "--flash-attn", "--no-flash-attn", "--model"]


def test_the_readme_is_short():
    data = README.read_bytes()
    lines = data.decode("utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES})"
    assert len(data) <= MAX_BYTES, f"README.md has {len(data)} bytes (at most {MAX_BYTES})"


@pytest.mark.parametrize("page", DOC_PAGES)
def test_the_docs_pages_exist(page):
    assert (DOCS / page).is_file(), f"docs/{page} is missing"


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.MULTILINE | re.DOTALL)


def relative_links(path: Path) -> list[str]:
    """The targets of the page's markdown links and images that are not URLs or anchors
    (code blocks and inline code skipped)."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http(s):, mailto: and the like; anchors within the page
        targets.append(target)
    return targets


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(page):
    broken = []
    for target in relative_links(page):
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not (page.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"


def test_link_extraction(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/api.md#errors) ![b](x.png) [c](https://x.org/y) [d](#top)\n"
                    "`[e](not-a-link.md)`\n```\n[f](in-code.md)\n```\n"
                    "[g](<angled.md>) [h](y.md \"title\")\n", encoding="utf-8")
    assert relative_links(page) == ["docs/api.md#errors", "x.png", "angled.md", "y.md"]
