"""A uvicorn process serving one of the apps under test on 127.0.0.1, and its controller.

The process runs ``python -m benchmarks.server --app plain|taskflow ...``; ``ServerProcess``
starts it on a free port, times how long it takes to respond, reads its memory and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

import httpx

from benchmarks.apps import PING_PATH
from benchmarks.load import HOST, fetch_status

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_READY_POLL_INTERVAL = 0.005
_IDLE_POLL_INTERVAL = 0.05
ACTIVE_TASKS_PATH = "/tasks?status=PENDING&status=RUNNING&limit=1"
_STOP_TIMEOUT = 30.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class ServerProcess:
    """One uvicorn process on a free port of 127.0.0.1, started and stopped by this process.

    Args:
        app: ``plain`` or ``taskflow``.
        log_path: file that receives the process's stdout and stderr.
        store: the ``store`` configuration section of the ``taskflow`` app.
        settings: other configuration sections of the ``taskflow`` app.
    """

    def __init__(
        self,
        app: str,
        log_path: Path,
        store: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.port = free_port()
        self._log_path = log_path
        self._store = store
        self._settings = settings
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The process id; only once started."""
        assert self._process is not None
        return self._process.pid

    async def start(self, ready_limit: float = 60.0) -> float:
        """Start the process and return the seconds until ``GET /ping`` responded with 200.

        Raises:
            RuntimeError: the process exited or did not respond within ``ready_limit``; the
                message quotes the end of its log.
        """
        command = [
            sys.executable,
            "-m",
            "benchmarks.server",
            "--app",
            self.app,
            "--port",
            str(self.port),
            "--store",
            json.dumps(self._store or {}),
            "--settings",
            json.dumps(self._settings or {}),
        ]
        # A local file opened once before the clock starts: no need for a thread.
        with open(self._log_path, "ab") as log:  # noqa: ASYNC230
            started = perf_counter()
            self._process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=log, cwd=_PROJECT_ROOT
            )
        deadline = started + ready_limit
        while perf_counter() < deadline:
            if self._process.returncode is not None:
                last_line = (self.log_tail(1) or "no output").strip()
                raise RuntimeError(
                    f"The {self.app} server exited with status {self._process.returncode} "
                    f"before responding ({last_line}). Its log: {self._log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                if await fetch_status(self.port, "GET", PING_PATH) == 200:
                    return perf_counter() - started
            except (OSError, asyncio.IncompleteReadError):
                pass
            await asyncio.sleep(_READY_POLL_INTERVAL)
        await self.stop()
        raise RuntimeError(
            f"The {self.app} server on port {self.port} did not respond within "
            f"{ready_limit:g} s. End of its log ({self._log_path}):\n{self.log_tail()}"
        )

    def rss_mb(self) -> float:
        """Return the resident memory of the process in MB (10^6 bytes), from ``/proc``."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
        raise RuntimeError(f"/proc/{self.pid}/status has no VmRSS line.")

    async def stop(self) -> None:
        """Send SIGTERM (a graceful shutdown) and wait; send SIGKILL after 30 s."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of the process's log."""
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def wait_until_idle(client: httpx.AsyncClient, limit: float) -> float | None:
    """Wait until ``GET /tasks`` lists no PENDING or RUNNING task.

    Returns:
        The seconds waited, or ``None`` when tasks were still active after ``limit``.
    """
    started = perf_counter()
    while perf_counter() - started < limit:
        response = await client.get(ACTIVE_TASKS_PATH)
        response.raise_for_status()
        if not response.json()["items"]:
            return perf_counter() - started
        await asyncio.sleep(_IDLE_POLL_INTERVAL)
    return None


def main() -> None:
    """Serve the app that the options name with uvicorn until SIGTERM."""
    parser = argparse.ArgumentParser(description="Serve an app under test on 127.0.0.1.")
    parser.add_argument("--app", choices=("plain", "taskflow"), required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", default="{}", help="store section as JSON (taskflow app)")
    parser.add_argument("--settings", default="{}", help="other sections as JSON (taskflow app)")
    options = parser.parse_args()

    import uvicorn

    from benchmarks.apps import build_plain_app, build_taskflow_app, send_library_logs_to_devnull

    send_library_logs_to_devnull()
    if options.app == "plain":
        app = build_plain_app()
    else:
        app, _ = build_taskflow_app(json.loads(options.store), json.loads(options.settings))
    print(f"pid {os.getpid()} serving {options.app} on {HOST}:{options.port}", flush=True)
    uvicorn.run(app, host=HOST, port=options.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
