"""The docs' figures and parameter reference are generated from committed files and current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generate():
    """docs/generate.py, imported (what `python docs/generate.py --check` runs)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    return generate


def test_generated_docs_are_current():
    assert _generate().stale_docs(check=True) == []


def test_every_generated_block_is_filled_and_known():
    generate = _generate()
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = [m.group("name") for page in pages
             for m in generate.BLOCK.finditer(page.read_text(encoding="utf-8"))]
    assert set(names) == set(generate.BLOCKS), "every block is used, and only known ones"
    for page in pages:
        for match in generate.BLOCK.finditer(page.read_text(encoding="utf-8")):
            assert match.group("body").strip(), f"{page}: block {match.group('name')} is empty"


def test_a_repro_that_rewrites_the_timings_leaves_the_docs_check_green(tmp_path):
    """`make repro && make test`: the repro rewrites metrics/benchmark.json and deploy_latency.json
    with this machine's timings; the docs still match the committed figures, so the check
    passes. A doc matching neither is still stale."""
    import json

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    check = [sys.executable, str(clone / "docs" / "generate.py"), "--check"]
    for name in ("benchmark.json", "deploy_latency.json"):  # a repro on another machine
        path = clone / "metrics" / name
        metrics = json.loads(path.read_text())
        for key, value in list(metrics.items()):
            if isinstance(value, float):
                metrics[key] = value * 1.37
        path.write_text(json.dumps(metrics))
    done = subprocess.run(check, capture_output=True, text=True, cwd=clone)
    assert done.returncode == 0, done.stderr
    readme = clone / "README.md"
    readme.write_text(readme.read_text().replace("| val mIoU (training's validation) | 0.",
                                                 "| val mIoU (training's validation) | 9."))
    done = subprocess.run(check, capture_output=True, text=True, cwd=clone)
    assert done.returncode == 1 and "README.md" in done.stderr
