"""Fixtures of the browser tests: a uvicorn server on loopback and Debian's Chromium.

Playwright drives ``/usr/bin/chromium`` (Debian's package, installed by ``.ci/run``), so no
browser is downloaded. A missing Playwright or Chromium skips these tests on a laptop and
fails them in CI (``CI`` set to a non-empty value), as a missing test server does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Playwright

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STARTUP_TIMEOUT = 30.0
"""Seconds the server gets to respond to its first request."""
STOP_TIMEOUT = 10.0
"""Seconds the server gets to exit after SIGTERM before it is killed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_config(folder: Path, store: dict[str, Any]) -> None:
    """Write ``browser.yaml``: the given store, one task at a time, no retry delays."""
    config = {
        "store": store,
        "runner": {"max_concurrency": 1, "sync_workers": 2, "shutdown_grace": 1.0},
        "leases": {"heartbeat_interval": 0.5, "expiry": 3.0, "poll_interval": 0.2},
        "retry": {"retries": 0, "delay": 0.0, "jitter": 0.0},
        "auth": {"kind": "none"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "browser.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


@dataclass
class Server:
    """One ``uvicorn tests.browser.app:app`` process on loopback."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """The base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The URL of the dashboard page."""
        return f"{self.url}/tasks/dashboard"

    def post(self, path: str, **params: Any) -> dict[str, Any]:
        """Send ``POST path`` with query parameters and return the JSON response."""
        response = httpx.post(f"{self.url}{path}", params=params, timeout=10.0, trust_env=False)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def get(self, path: str, **params: Any) -> Any:
        """Send ``GET path`` and return the JSON response."""
        response = httpx.get(f"{self.url}{path}", params=params, timeout=10.0, trust_env=False)
        response.raise_for_status()
        return response.json()

    def wait_for_status(self, task_id: str, *statuses: str, within: float = 10.0) -> None:
        """Poll the REST API until the task has one of ``statuses``."""
        deadline = time.monotonic() + within
        while self.get(f"/tasks/{task_id}")["status"] not in statuses:
            if time.monotonic() > deadline:
                raise AssertionError(f"Task {task_id} did not reach {statuses} in {within} s.")
            time.sleep(0.05)

    def kill(self) -> None:
        """Send SIGKILL, as a crash or a dropped network would end every stream."""
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Send SIGTERM, then SIGKILL after ``STOP_TIMEOUT``."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)


def start_server(folder: Path, store: dict[str, Any] | None = None) -> Server:
    """Start the browser tests' app on a free port and wait until it responds."""
    write_config(folder / "containers", store or {"kind": "memory"})
    port = free_port()
    log_path = folder / "server.log"
    environment = {
        **os.environ,
        "APP_TASKFLOW_ENV": "browser",
        "APP_TASKFLOW_CONTAINERS": str(folder / "containers"),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "uvicorn", "tests.browser.app:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(port, process, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise AssertionError(f"The server exited at startup:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{server.url}/tasks", timeout=1.0, trust_env=False).is_success:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"The server did not respond within {STARTUP_TIMEOUT} s.")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Yield one server on a SQLite file, shared by the tests of a module, stopped after them."""
    folder = tmp_path_factory.mktemp("browser-server")
    running = start_server(folder, {"kind": "sqlite", "path": str(folder / "tasks.db")})
    try:
        yield running
    finally:
        running.stop()


def _missing(reason: str) -> None:
    message = f"{reason} Run .ci/run, or: apt-get install -y chromium; pip install playwright"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Yield a started Playwright; skip locally, fail in CI when it is not installed.

    Module scope: Playwright's sync API runs an event loop of its own in this thread, which
    must be gone before the async tests of other modules run.
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("The playwright package is not installed.")
    if not CHROMIUM.exists():
        _missing(f"Chromium is not installed at {CHROMIUM}.")
    with sync_playwright() as started:
        yield started


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Yield headless Chromium; a failure to launch fails the tests."""
    launched = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
    )
    try:
        yield launched
    finally:
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """Yield a fresh page of a laptop-sized window, with clipboard access granted."""
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    try:
        yield page
    finally:
        context.close()
    # A script error or a CSP violation shows up here; the dashboard must have none.
    assert errors == []
