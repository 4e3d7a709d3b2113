"""The project's own source files that a module runs, and their digests: the identity of the
code a training run computes with, so that a killed run resumes only under the same code.

The files are found statically, from the `import` statements of the module and of every `fcn`
module it imports in turn (function-level imports included), as tests/test_stage_deps.py finds
a stage's dvc.yaml dependencies; so the answer does not depend on what else the running
process happens to have imported. A digest covers the file's bytes: any edit, a comment
included, is a change, as it is for DVC, which reruns the stage after it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding the `fcn` package."""


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """The file of module `fcn.a.b` (a module or a package's __init__), or None."""
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(path: Path, root: Path) -> set[str]:
    """The `fcn` modules one file imports (`from fcn.x import y`: fcn.x.y if that is a
    module, else fcn.x), and the packages above them (importing fcn.a.b runs fcn/a too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if module_file(f"{node.module}.{a.name}", root)
                     else node.module for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fcn":
                found.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
    return found


def files(module: str, root: Path = PACKAGE_ROOT) -> list[Path]:
    """Every `fcn` file `module` runs when imported, itself included, sorted."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        file = module_file(todo.pop(), root)
        if file is None or file in seen:
            continue
        seen.add(file)
        todo.extend(_imports(file, root))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def fingerprint(module: str, root: Path = PACKAGE_ROOT) -> dict[str, str]:
    """{relative path: sha256 of its bytes (16 hex digits)} of every file `module` runs."""
    return {file.relative_to(root).as_posix(): hashlib.sha256(file.read_bytes()).hexdigest()[:16]
            for file in files(module, root)}
