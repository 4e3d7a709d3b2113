"""Build dvc_templates/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

Why: `dvc plots show` writes a page that loads Vega from a CDN, so offline (or behind a proxy)
it shows nothing. DVC accepts an HTML template (`plots.html_template` in .dvc/config); this
script makes one that carries the vendored libraries inline, so the page needs no request at
all and survives being copied or mailed as a single file.

    python dvc_templates/build_offline_html.py            # rebuild offline.html from vendor/
    python dvc_templates/build_offline_html.py --check    # exit 1 if offline.html is stale
    python dvc_templates/build_offline_html.py --fetch    # re-vendor VENDORED from npm first
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = HERE / "page.html"
OUTPUT = HERE / "offline.html"
VENDOR = HERE / "vendor"
MARKER = "<!-- @VENDORED_SCRIPTS@ -->"
# Placeholders dvc-render substitutes with str.replace; a vendored library containing one of
# them, or a closing script tag, would corrupt the page, so the build refuses it.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")


@dataclass(frozen=True)
class Library:
    """One vendored npm package: which build we inline and the hash we vendored."""

    name: str
    version: str
    build: str  # path of the minified UMD build inside the npm package
    sha256: str

    @property
    def path(self) -> Path:
        return VENDOR / self.name / Path(self.build).name


# The v5 line of vega/vega-lite matches the vega-lite v5 specs dvc-render generates; the order
# is load order (vega-embed needs both globals).
VENDORED = (
    Library("vega", "5.33.1", "build/vega.min.js",
            "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8"),
    Library("vega-lite", "5.23.0", "build/vega-lite.min.js",
            "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f"),
    Library("vega-embed", "6.29.0", "build/vega-embed.min.js",
            "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da"),
)


class BuildError(Exception):
    """The vendored files or the page skeleton cannot make a correct template."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _script_block(lib: Library) -> str:
    if not lib.path.is_file():
        raise BuildError(f"{lib.path}: missing; run with --fetch to vendor {lib.name}@{lib.version}")
    digest = _sha256(lib.path)
    if digest != lib.sha256:
        raise BuildError(f"{lib.path}: sha256 {digest} is not the vendored {lib.sha256} "
                         f"({lib.name}@{lib.version}); update VENDORED if this is intended")
    code = lib.path.read_text(encoding="utf-8")
    found = [bad for bad in DVC_PLACEHOLDERS if bad in code]
    found += ["</script"] if "</script" in code.lower() else []
    if found:
        raise BuildError(f"{lib.path}: contains {found[0]!r}, which cannot be inlined in a DVC template")
    licence = f"dvc_templates/vendor/{lib.name}/LICENSE"
    return (f'<script type="text/javascript">/*! {lib.name}@{lib.version} (npm: {lib.build}) '
            f"| BSD-3-Clause, see {licence} */\n{code}\n</script>")


def render() -> str:
    """The template text: page.html with every vendored library inlined at the marker."""
    page = PAGE.read_text(encoding="utf-8")
    if page.count(MARKER) != 1:
        raise BuildError(f"{PAGE}: needs the marker {MARKER} exactly once")
    if page.count("{plot_divs}") != 1:
        raise BuildError(f"{PAGE}: needs DVC's {{plot_divs}} placeholder exactly once")
    if "{scripts}" in page:
        raise BuildError(f"{PAGE}: must not contain {{scripts}}: DVC fills it with CDN <script> tags")
    return page.replace(MARKER, "\n".join(_script_block(lib) for lib in VENDORED))


def fetch(npm: str = "npm") -> None:
    """Re-vendor each library's minified build (and LICENSE, where the package ships one) via npm pack."""
    with tempfile.TemporaryDirectory() as tmp:
        for lib in VENDORED:
            spec = f"{lib.name}@{lib.version}"
            out = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, check=True,
                                 capture_output=True, text=True).stdout.split()[-1]
            with tarfile.open(Path(tmp) / out) as tar:
                tar.extractall(Path(tmp) / lib.name, filter="data")
            package = Path(tmp) / lib.name / "package"
            lib.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / lib.build, lib.path)
            if (package / "LICENSE").is_file():  # the vega package ships none: ours is the repo's
                shutil.copyfile(package / "LICENSE", lib.path.parent / "LICENSE")
            print(f"vendored {spec}: {lib.path.relative_to(HERE.parent)} sha256 {_sha256(lib.path)}")


def write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file, so a killed build never leaves half a template."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if offline.html is not up to date")
    parser.add_argument("--fetch", action="store_true", help="re-vendor the libraries from npm first")
    args = parser.parse_args(argv)
    try:
        if args.fetch:
            fetch()
        text = render()
    except (BuildError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python {Path(__file__).relative_to(HERE.parent)}",
                  file=sys.stderr)
            return 1
        print(f"{OUTPUT.name} is up to date")
        return 0
    write_atomic(OUTPUT, text)
    print(f"wrote {OUTPUT} ({len(text.encode()) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
