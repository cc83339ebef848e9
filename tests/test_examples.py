"""The gallery's scripts: each is valid sphinx-gallery input and is either executed when the
documentation is built (``bash .ci/run docs`` runs every ``plot_*`` script and fails on an
error) or listed here as shown-only, with the reason."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SHOWN_ONLY = {"paper_food101.py": "needs the open_clip ViT-B/32 weights and Food-101"}


def _gallery_pattern() -> str:
    match = re.search(r'"filename_pattern":\s*r"([^"]+)"', (ROOT / "docs" / "conf.py").read_text())
    assert match, "docs/conf.py sets no sphinx-gallery filename_pattern"
    return match.group(1)


def test_there_are_examples():
    assert len(EXAMPLES) >= 5 and (ROOT / "examples" / "README.rst").is_file()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_gallery_input(path):
    tree = ast.parse(path.read_text(), filename=str(path))  # a syntax error fails here
    doc = ast.get_docstring(tree, clean=False)
    assert doc, f"{path.name} has no module docstring"
    title, underline = doc.strip("\n").splitlines()[:2]
    assert set(underline) == {"="} and len(underline) >= len(title), (
        f"{path.name}: the docstring must open with a reST title (sphinx-gallery's page title)"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_executed_by_the_docs_build_or_says_why_not(path):
    executed = re.search(_gallery_pattern(), f"/{path.name}") is not None
    assert executed != (path.name in SHOWN_ONLY), (
        f"{path.name}: executed={executed}; only {sorted(SHOWN_ONLY)} may be shown without a run"
    )
