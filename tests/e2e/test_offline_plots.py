"""`dvc plots show` pages render in a real browser with no network.

DVC's default page loads vega from a CDN, so offline it shows nothing. The repo configures
dvc_templates/offline.html (vendored vega inlined) as `plots.html_template`; these tests check
the template is what the vendored files build, that DVC picks it up, and, in headless
Chromium with every host name unresolvable, that the charts draw and no request leaves.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from helpers.cdp import Chromium, find_chromium, render_plots_page
from helpers.dvc_repo import PROJECT, commit_all, dvc, git

TEMPLATE = PROJECT / "dvc_templates" / "offline.html"


def _build_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_offline_html", PROJECT / "dvc_templates" / "build_offline_html.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def require_chromium() -> str:
    """The Chromium executable, or skip saying how to get one."""
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH: install the Debian package `chromium` "
                    "(make test tries `apt-get install -y chromium` when run as root)")
    return path


def test_committed_template_is_built_from_the_vendored_libraries() -> None:
    build = _build_module()
    assert build.render() == TEMPLATE.read_text(encoding="utf-8"), \
        "dvc_templates/offline.html is stale: run python dvc_templates/build_offline_html.py"
    for lib in build.VENDORED:
        assert (lib.path.parent / "LICENSE").is_file(), f"{lib.name}: licence missing"
        assert f"{lib.name}@{lib.version}" in TEMPLATE.read_text(encoding="utf-8")


def test_build_refuses_a_tampered_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = _build_module()
    lib = build.VENDORED[0]
    copy = tmp_path / lib.path.name
    copy.write_text(lib.path.read_text(encoding="utf-8") + "\n// changed", encoding="utf-8")
    monkeypatch.setattr(type(lib), "path", property(lambda self: copy))
    with pytest.raises(build.BuildError, match="sha256"):
        build.render()


def test_template_loads_nothing_from_the_network() -> None:
    html = TEMPLATE.read_text(encoding="utf-8")
    assert html.count("{plot_divs}") == 1
    # DVC fills {scripts} with CDN <script src="https://..."> tags: the template must not ask.
    assert "{scripts}" not in html
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", html, flags=re.I)
    remote = [t for t in tags if re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", t, re.I)]
    assert remote == []
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"/*! {name}@" in html, f"{name} is not inlined"


def test_repo_config_points_dvc_at_the_template() -> None:
    config = configparser.ConfigParser()
    config.read(PROJECT / ".dvc" / "config")
    configured = config.get("plots", "html_template")
    # DVC resolves a relative html_template against the .dvc folder.
    assert (PROJECT / ".dvc" / configured).resolve() == TEMPLATE.resolve()


def _plots_repo(root: Path) -> Path:
    """A small DVC repo with this project's plots config and a curve, bars and an image."""
    repo = root / "plots-repo"
    for rel in (".dvc/config", "dvc_templates/offline.html"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, repo / rel)
    git(repo, "init", "-q")
    git(repo, "config", "user.name", "t")
    git(repo, "config", "user.email", "t@localhost")
    (repo / "curves").mkdir()
    rows = "\n".join(f"{step}\t{1 / (step + 1):.4f}" for step in range(12))
    (repo / "curves" / "loss.tsv").write_text(f"step\tloss\n{rows}\n", encoding="utf-8")
    classes = ["road", "sidewalk", "building", "car", "person"]
    (repo / "iou.csv").write_text(
        "class,iou\n" + "".join(f"{c},{0.9 - 0.1 * i:.2f}\n" for i, c in enumerate(classes)),
        encoding="utf-8")
    Image.new("RGB", (40, 20), (200, 30, 30)).save(repo / "sample.png")
    (repo / "dvc.yaml").write_text(
        "plots:\n"
        "  - curves/loss.tsv:\n      x: step\n      y: loss\n"
        "  - iou.csv:\n      template: bar_horizontal\n      x: iou\n      y: class\n"
        "  - sample.png\n", encoding="utf-8")
    commit_all(repo, "plots")
    return repo


@pytest.mark.slow
def test_plots_render_offline_in_chromium(tmp_path: Path) -> None:
    executable = require_chromium()
    repo = _plots_repo(tmp_path)
    dvc(repo, "plots", "show")  # no --html-template: the repo's config must choose ours
    page = repo / "dvc_plots" / "index.html"
    assert "/*! vega@" in page.read_text(encoding="utf-8")
    with Chromium(executable) as chromium:
        shown = render_plots_page(chromium, page, screenshot=tmp_path / "plots.png")
    assert shown.report.exceptions == [] and shown.report.console_errors == []
    assert shown.remote_requests() == []
    assert sorted(shown.charts) == sorted(shown.chart_ids) and len(shown.chart_ids) == 2
    curve = next(c for i, c in shown.charts.items() if "loss" in i)
    assert max(curve["line_points"]) == 12, curve  # one vertex per logged step
    bars = next(c for i, c in shown.charts.items() if "iou" in i)
    assert bars["rects"] == 5, bars  # one bar per class
    # the value axis starts at 0 although the IoUs are 0.5-0.9 (DVC's template says zero: false,
    # but vega-lite stacks bars, which includes 0), so bar lengths compare classes honestly
    ticks = [float(t) for t in bars["axis_labels"] if re.fullmatch(r"-?\d+(\.\d+)?", t)]
    assert ticks and min(ticks) == 0.0, bars["axis_labels"]
    assert [i["loaded"] for i in shown.images] == [True]


@pytest.mark.slow
def test_dvc_default_page_needs_the_network(tmp_path: Path) -> None:
    """Control: the same plots on DVC's own page try a CDN and draw nothing offline.

    It shows the detector above can fail, and why the project ships its own template.
    """
    executable = require_chromium()
    repo = _plots_repo(tmp_path)
    from dvc_render.html import PAGE_HTML  # DVC's built-in page

    default = tmp_path / "dvc_default.html"
    default.write_text(PAGE_HTML, encoding="utf-8")
    dvc(repo, "plots", "show", "--html-template", str(default))
    with Chromium(executable) as chromium:
        shown = render_plots_page(chromium, repo / "dvc_plots" / "index.html", wait=3)
    assert any("vega" in url for url in shown.remote_requests()), shown.report.requests
    assert shown.charts == {}

