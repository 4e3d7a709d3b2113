"""dvc.yaml's code dependencies are exactly what each stage imports.

Each stage lists the `fcn` code its script imports, directly or through other `fcn` modules:
a subpackage as its folder (`fcn/<package>`) when every module in it is imported, else the
modules themselves (`fcn/cityscapes/labels.py`), and top-level modules as files. Too few, and a code change
does not rerun a stage it changes; too many, and editing, say, the benchmark report reruns
training (hours on real Cityscapes). The import graph is read from the source (every `import`
statement, function-level ones included), so the declared deps cannot silently rot.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fcn"


def _module_file(name: str) -> Path | None:
    """The file of module `fcn.a.b` (a module or a package), or None if there is none."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _imports(path: Path) -> set[str]:
    """The `fcn` modules one file imports (`from fcn.x import y` counts fcn.x.y if that is a
    module, else fcn.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fcn")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "fcn":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _module_file(sub) else node.module)
    return found


def imported_files(script: Path) -> set[Path]:
    """Every `fcn` file `script` imports, transitively (package `__init__` files included)."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        for name in _imports(path):
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing fcn.a.b runs fcn/, fcn/a/ too
                file = _module_file(".".join(parts[:depth]))
                assert file is not None, f"{path}: imports {name}, which does not exist"
                if file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def required_units(script: Path) -> set[str]:
    """What dvc.yaml must list for a script: a subpackage's folder when the script imports
    every module in it, else the modules it imports; top-level modules as files. Package
    `__init__.py` files hold only a docstring (tested below), so they count for nothing."""
    files = {f.relative_to(ROOT) for f in imported_files(script) if f.name != "__init__.py"}
    units = set()
    for file in files:
        if len(file.parts) == 2:
            units.add(file.as_posix())
            continue
        package = ROOT / file.parts[0] / file.parts[1]
        modules = {m.relative_to(ROOT) for m in package.rglob("*.py") if m.name != "__init__.py"}
        units.add(Path(*file.parts[:2]).as_posix() if modules <= files else file.as_posix())
    return units


PIPELINES = ("dvc.yaml", "recipes/coarse_to_fine.yaml", "recipes/staged.yaml")
"""The default pipeline, the coarse -> fine one `make coarse` activates, and the staged one
(`make staged`)."""


def stages(pipeline: str = "dvc.yaml") -> dict[str, dict]:
    return yaml.safe_load((ROOT / pipeline).read_text(encoding="utf-8"))["stages"]


def script_of(stage: dict) -> Path:
    words = stage["cmd"].split()
    scripts = [w for w in words if w.startswith("stages/") and w.endswith(".py")]
    assert len(scripts) == 1, f"cmd {stage['cmd']!r} names no single stages/*.py script"
    return ROOT / scripts[0]


def declared_units(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if isinstance(d, str)
            and (d == "fcn" or d.startswith("fcn/"))}


def problems(name: str, script: Path, declared: set[str]) -> list[str]:
    """What is wrong with one stage's fcn deps (empty when they match its imports)."""
    required = required_units(script)
    found = []
    if "fcn" in declared:
        found.append(f"{name}: lists all of fcn/ (list the subpackages and modules it imports)")
    missing = sorted(required - declared)
    extra = sorted(declared - required - {"fcn"})
    if missing:
        found.append(f"{name}: imports {missing} but dvc.yaml does not list them")
    if extra:
        found.append(f"{name}: dvc.yaml lists {extra}, which it does not import")
    return found


@pytest.mark.parametrize(("pipeline", "name"), [(p, n) for p in PIPELINES for n in sorted(stages(p))])
def test_each_stage_depends_on_exactly_the_fcn_code_it_imports(pipeline: str, name: str) -> None:
    stage = stages(pipeline)[name]
    script = script_of(stage)
    assert script.relative_to(ROOT).as_posix() in stage["deps"], f"{name}: its script is no dep"
    assert problems(name, script, declared_units(stage)) == []


def test_a_missing_or_extra_dependency_is_caught() -> None:
    """The check itself can fail: drop one declared unit, or add one the stage never imports."""
    stage = stages()["train"]
    script, declared = script_of(stage), declared_units(stage)
    dropped = sorted(declared)[0]
    assert any(dropped in p and "does not list" in p
               for p in problems("train", script, declared - {dropped}))
    assert any("fcn/benchmark" in p and "does not import" in p
               for p in problems("train", script, declared | {"fcn/benchmark"}))
    assert any("all of fcn/" in p for p in problems("train", script, declared | {"fcn"}))


def test_editing_the_benchmark_reruns_only_the_benchmark_stage() -> None:
    users = sorted(n for n, s in stages().items() if "fcn/benchmark" in declared_units(s))
    assert users == ["benchmark"]


@pytest.mark.parametrize("recipe", PIPELINES[1:])
def test_the_recipes_run_the_default_pipelines_scripts_with_the_same_code_deps(recipe: str
                                                                                ) -> None:
    """Their stages are the masks and train scripts with other arguments: their code deps are
    the default stages' (so one edit reruns every pipeline's stages alike)."""
    default = stages()
    for name, stage in stages(recipe).items():
        twin = {"coarse_masks": "masks"}.get(name, "train")
        assert script_of(stage) == script_of(default[twin]), name
        assert declared_units(stage) == declared_units(default[twin]), name


def test_the_package_init_holds_only_its_docstring() -> None:
    """Package `__init__` files are in no stage's deps, which is only sound while they run no
    code."""
    for init in [PACKAGE / "__init__.py", *PACKAGE.glob("*/__init__.py")]:
        body = ast.parse(init.read_text(encoding="utf-8")).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) \
            and isinstance(body[0].value, ast.Constant), f"{init}: only a docstring, please"


def test_every_third_party_module_the_tests_import_is_declared():
    """pyproject's dependencies and test extras name every package a test imports (psutil
    was used by three test files without being declared)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared_as = {"PIL": "pillow", "yaml": "pyyaml", "cityscapesscripts": "cityscapesscripts",
                   "dvc_render": "dvc-render"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in requirements}
    local = {"fcn", "helpers", "generate", "conftest"}  # the project, tests/helpers, docs/generate
    imported = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local
    missing = {m for m in third_party if declared_as.get(m, m).lower() not in names}
    assert not missing, f"imported by tests but not declared in pyproject.toml: {sorted(missing)}"
