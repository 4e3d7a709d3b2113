"""A tiny Chrome DevTools Protocol client over `--remote-debugging-pipe`.

Why: the offline-plots test must see what a real browser renders and every request it makes.
Playwright would need a browser download and websocket CDP a websocket library; Chromium's pipe
transport (JSON messages separated by NUL on fds 3 and 4) needs neither.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio",
    # Nothing may leave the machine even when a page asks: every host name fails to resolve.
    # Requests are still announced to CDP first, so the test sees each attempt.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    """The Chromium executable on PATH (Debian: /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _high_fd(fd: int) -> int:
    """A duplicate of fd numbered 10 or more (the original is closed)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class CdpError(RuntimeError):
    """Chromium answered an error, died, or did not answer in time."""


@dataclass
class PageReport:
    """What one page load did: the requests it made and the errors it raised."""

    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)


class Chromium:
    """Headless Chromium on a private profile, driven over the CDP pipe; use as a context manager."""

    def __init__(self, executable: str, timeout: float = 60.0) -> None:
        self.executable = executable
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self._messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._events: list[dict[str, Any]] = []
        self._next_id = 0
        self._stderr = b""

    def __enter__(self) -> Chromium:
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # bash (dash takes single-digit fds only) puts the child's pipe ends on the fds 3 and 4 that --remote-debugging-pipe
        # expects; they are first moved to fds >= 10 so they cannot be 3 or 4 already.
        to_child_r, from_child_w = (_high_fd(to_child_r), _high_fd(from_child_w))
        script = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self._proc = subprocess.Popen(
            ["/bin/bash", "-c", script, self.executable, *FLAGS,
             f"--user-data-dir={self._profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(to_child_r)
        os.close(from_child_w)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except CdpError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _drain_stderr(self) -> None:
        assert self._proc.stderr is not None
        self._stderr = self._proc.stderr.read()

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for raw in complete:
                self._messages.put(json.loads(raw))

    def _pump(self, deadline: float) -> dict[str, Any]:
        try:
            message = self._messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise CdpError("Chromium did not answer in time") from None
        if message is None:
            raise CdpError(f"Chromium exited: {self._stderr.decode(errors='replace')[-2000:]}")
        if "method" in message:
            self._events.append(message)
        return message

    def call(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send one command and wait for its answer (events seen meanwhile are kept)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            answer = self._pump(deadline)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise CdpError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _wait_event(self, method: str, session: str, deadline: float) -> None:
        seen = 0
        while True:
            for event in self._events[seen:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return
            seen = len(self._events)
            self._pump(deadline)

    def open(self, url: str, ready: str, settle: float = 0.5, wait: float | None = None,
             screenshot: Path | None = None) -> tuple[Any, PageReport]:
        """Load url in a new tab; poll the JS expression `ready` until truthy; return its value.

        The value is taken again after `settle` seconds, so charts still drawing are counted;
        `wait` bounds the polling (default: the client's timeout); `screenshot` saves the whole page as PNG (for a person to look at when a test fails).
        """
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        first_event = len(self._events)
        for domain in ("Network", "Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        deadline = time.monotonic() + self.timeout
        self._wait_event("Page.loadEventFired", session, deadline)
        value: Any = None
        deadline = min(deadline, time.monotonic() + (wait if wait is not None else self.timeout))
        while time.monotonic() < deadline:
            value = self.evaluate(ready, session)
            if value:
                break
            time.sleep(0.2)
        time.sleep(settle)
        value = self.evaluate(ready, session)
        if screenshot is not None:
            shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                             session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return value, self._report(session, first_event)

    def evaluate(self, expression: str, session: str) -> Any:
        """The JSON value of a JS expression in the page."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=session)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def _report(self, session: str, first_event: int) -> PageReport:
        report = PageReport()
        for event in self._events[first_event:]:
            if event.get("sessionId") != session:
                continue
            params = event.get("params", {})
            method = event["method"]
            if method == "Network.requestWillBeSent":
                report.requests.append(params["request"]["url"])
            elif method == "Network.loadingFailed":
                report.failed.append(params.get("errorText", ""))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                report.exceptions.append(details.get("exception", {}).get("description")
                                         or details.get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                report.console_errors.append(" ".join(str(a.get("value", a.get("description")))
                                                      for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                report.console_errors.append(params["entry"].get("text", ""))
        return report


def file_url(path: Path) -> str:
    """A file:// URL for a local file."""
    return path.resolve().as_uri()


# What a `dvc plots show` page rendered, per vega chart (by div id) and per <img>. Null until
# every chart has drawn its SVG and every image has loaded, so `Chromium.open` polls it.
_PLOTS_JS = """(() => {
  const ids = %s;
  const charts = {};
  for (const id of ids) {
    const div = document.getElementById(id);
    const svg = div && div.querySelector('svg.marks');
    if (!svg) return null;
    const lines = [...svg.querySelectorAll('g.mark-line path')].map(p => p.getAttribute('d') || '');
    charts[id] = {
      title: [...svg.querySelectorAll('g.role-title text')].map(t => t.textContent).join(' '),
      line_points: lines.map(d => (d.match(/[ML]/g) || []).length),
      rects: svg.querySelectorAll('g.mark-rect path').length,
      marks: svg.querySelectorAll('g.role-mark > *').length,
      axis_labels: [...svg.querySelectorAll('g.role-axis-label text')].map(t => t.textContent),
    };
  }
  const images = [...document.querySelectorAll('img')].map(i => ({
    src: i.getAttribute('src'), loaded: i.complete && i.naturalWidth > 0}));
  if (images.some(i => !i.loaded)) return null;
  return {charts, images};
})()"""


@dataclass
class PlotsPage:
    """A `dvc plots show` page as Chromium rendered it."""

    chart_ids: list[str]
    charts: dict[str, dict[str, Any]]
    images: list[dict[str, Any]]
    report: PageReport

    def remote_requests(self) -> list[str]:
        """Requests that would leave the machine (anything but file:, data:, blob:, about:)."""
        local = ("file:", "data:", "blob:", "about:")
        return [url for url in self.report.requests if not url.startswith(local)]


def vega_div_ids(html: str) -> list[str]:
    """The ids of the divs DVC fills with `vegaEmbed('#id', spec)`."""
    return re.findall(r"vegaEmbed\('#([^']+)'", html)


def render_plots_page(chromium: Chromium, page: Path, wait: float | None = None,
                      screenshot: Path | None = None) -> PlotsPage:
    """Open a plots page and report what it drew; charts that never drew are left out."""
    ids = vega_div_ids(page.read_text(encoding="utf-8"))
    value, report = chromium.open(file_url(page), _PLOTS_JS % json.dumps(ids), wait=wait,
                                  screenshot=screenshot)
    value = value or {"charts": {}, "images": []}
    return PlotsPage(ids, value["charts"], value["images"], report)
