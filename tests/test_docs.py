"""The docs' figures and parameter reference are generated from committed files and current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_docs_are_current():
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_every_generated_block_is_filled_and_known():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = [m.group("name") for page in pages
             for m in generate.BLOCK.finditer(page.read_text(encoding="utf-8"))]
    assert set(names) == set(generate.BLOCKS), "every block is used, and only known ones"
    for page in pages:
        for match in generate.BLOCK.finditer(page.read_text(encoding="utf-8")):
            assert match.group("body").strip(), f"{page}: block {match.group('name')} is empty"
