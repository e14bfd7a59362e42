"""Helpers of the end-to-end suite: uvicorn servers on loopback, their configuration, the API."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from servers import POSTGRES, REDIS, require_server

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 30.0
"""Seconds a server gets to respond to its first request."""
STOP_TIMEOUT = 15.0
"""Seconds a server gets to exit after SIGTERM before it is killed."""

STORE_KINDS = ("sqlite", "redis", "postgres")
"""Store kinds that ``every_store`` runs a test on. Redis and PostgreSQL are the shared servers."""

every_store = pytest.mark.parametrize("store_kind", STORE_KINDS, indirect=True)
"""Run a test once per kind in ``STORE_KINDS``. Tests without this mark run on SQLite only."""

T = TypeVar("T")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no socket is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Call ``check`` until it returns a truthy value and return that value.

    Raises:
        AssertionError: ``timeout`` seconds passed first. The message names ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout} s waiting for {what}.")
        time.sleep(interval)


@dataclass
class Server:
    """One ``uvicorn tests.e2e.app:app`` process, with its output in ``log_path``."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    exit_seconds: float | None = field(default=None)

    @property
    def url(self) -> str:
        """The base URL of the server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The process id of the uvicorn process."""
        return self.process.pid

    def client(self, **options: Any) -> httpx.Client:
        """Return a new client for this server, which the caller closes."""
        options.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, **options)

    def log(self) -> str:
        """Return everything the process printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """Send SIGKILL, as a crash would end the process, and wait for it to exit.

        The signal goes to the process group that the server leads, so the worker processes
        of ``uvicorn --workers`` die with it.
        """
        os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> float:
        """Send SIGTERM and return the seconds until the process exited.

        Raises:
            AssertionError: the process did not exit within ``timeout``, so it was killed.
        """
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"Server {self.name} (pid {self.pid}) did not exit within {timeout} s of "
                "SIGTERM and was killed."
            ) from None
        self.exit_seconds = time.monotonic() - started
        return self.exit_seconds

    def stop(self) -> None:
        """Stop the process if it still runs: SIGTERM, then SIGKILL after a bound."""
        if self.process.poll() is not None:
            return
        # terminate() kills a process that outlives the bound, and teardown only needs it gone.
        with contextlib.suppress(AssertionError):
            self.terminate()


def write_config(folder: Path, environment: str, store: dict[str, Any], **sections: Any) -> None:
    """Write ``<folder>/<environment>.yaml`` with the ``store`` section given and fast timings.

    Keyword arguments replace whole sections (runner, leases, retry, outage).
    """
    config: dict[str, Any] = {
        "store": store,
        "runner": {"max_concurrency": 20, "sync_workers": 8, "shutdown_grace": 2.0},
        "leases": {"heartbeat_interval": 0.5, "expiry": 2.0, "poll_interval": 0.2},
        "retry": {"retries": 0, "delay": 0.05, "jitter": 0.0},
    }
    config.update(sections)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{environment}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


@contextlib.contextmanager
def shared_store(kind: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Yield the ``store`` section of a fresh store of ``kind``, and delete its data afterwards.

    SQLite gets a file in ``tmp_path``. Redis gets a key prefix of its own on the shared
    server, whose keys are deleted after the test. PostgreSQL gets a database of its own on
    the shared server, dropped after the test. A shared server that is not reachable skips
    the test, or fails it when ``CI`` is set.
    """
    if kind == "sqlite":
        yield {"kind": "sqlite", "path": str(tmp_path / "tasks.db")}
    elif kind == "redis":
        with _redis_prefix() as prefix:
            yield {"kind": "redis", "url": f"redis://{REDIS.address}/0", "prefix": prefix}
    elif kind == "postgres":
        with _postgres_database() as name:
            yield {"kind": "postgres", "url": f"postgresql://postgres@{POSTGRES.address}/{name}"}
    else:
        raise ValueError(f"Unknown store kind {kind!r}. Use one of {STORE_KINDS}.")


@contextlib.contextmanager
def _redis_prefix() -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(f"redis://{REDIS.address}/0", socket_connect_timeout=3)
    with client:
        require_server(REDIS, client.ping, (redis.ConnectionError, redis.TimeoutError))
        prefix = f"taskflow-e2e-{secrets.token_hex(6)}"
        try:
            yield prefix
        finally:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)


@contextlib.contextmanager
def _postgres_database() -> Iterator[str]:
    import psycopg
    from psycopg import sql

    admin: list[psycopg.Connection[Any]] = []

    def connect() -> None:
        url = f"postgresql://postgres@{POSTGRES.address}/test"
        admin.append(psycopg.connect(url, autocommit=True, connect_timeout=3))

    require_server(POSTGRES, connect, (psycopg.OperationalError,))
    name = f"taskflow_e2e_{secrets.token_hex(6)}"
    with admin[0] as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            # FORCE ends the connections of servers that a failed test left behind.
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class ServerFactory:
    """Starts servers for one test and stops those still running when it ends."""

    def __init__(self, tmp_path: Path, store: dict[str, Any]) -> None:
        self.tmp_path = tmp_path
        self.containers = tmp_path / "containers"
        self.store = store
        self.servers: list[Server] = []

    def configure(self, environment: str = "e2e", **sections: Any) -> str:
        """Write ``<environment>.yaml`` and return ``environment``.

        The store is this test's store unless ``sections`` has a ``store`` of its own.
        """
        store = sections.pop("store", self.store)
        write_config(self.containers, environment, store, **sections)
        return environment

    def start(self, environment: str = "e2e", wait: bool = True, workers: int = 1) -> Server:
        """Start a server on a free port with the configuration of ``environment``.

        With ``wait``, return once it responds to ``GET /tasks``. With ``workers`` above 1,
        uvicorn runs that many worker processes on the port, each an instance of its own.
        """
        name = f"server-{len(self.servers) + 1}"
        log_path = self.tmp_path / f"{name}.log"
        port = free_port()
        environ = {
            **os.environ,
            "APP_TASKFLOW_ENV": environment,
            "APP_TASKFLOW_CONTAINERS": str(self.containers),
            "PYTHONUNBUFFERED": "1",
        }
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.e2e.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        if workers > 1:
            command += ["--workers", str(workers)]
        with log_path.open("wb") as output:
            # A session of its own makes the server lead a process group that kill() ends.
            process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=environ,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(name=name, port=port, log_path=log_path, process=process)
        self.servers.append(server)
        if wait:
            self.wait_ready(server)
        return server

    def wait_ready(self, server: Server) -> None:
        """Wait until ``server`` responds to ``GET /tasks``.

        Raises:
            AssertionError: the process exited, or did not respond within the startup timeout.
        """
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with server.client(timeout=2.0) as client:
            while True:
                if server.process.poll() is not None:
                    raise AssertionError(
                        f"Server {server.name} exited with code {server.process.returncode} "
                        f"before it responded:\n{server.log()}"
                    )
                try:
                    if client.get("/tasks", params={"limit": 1}).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"Server {server.name} did not respond within {STARTUP_TIMEOUT} s:\n"
                        f"{server.log()}"
                    )
                time.sleep(0.05)

    def stop_all(self) -> None:
        """Stop every server that still runs."""
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        """Return the output of every server started, one section each."""
        return "\n".join(
            f"----- {server.name} (pid {server.pid}, port {server.port}) -----\n{server.log()}"
            for server in self.servers
        )


def get_task(client: httpx.Client, task_id: str) -> dict[str, Any]:
    """Return ``GET /tasks/{task_id}`` as a dict."""
    response = client.get(f"/tasks/{task_id}")
    response.raise_for_status()
    task: dict[str, Any] = response.json()
    return task


def list_tasks(
    client: httpx.Client, *statuses: str, name: str | None = None
) -> list[dict[str, Any]]:
    """Return every task from ``GET /tasks`` with one of ``statuses`` (all when none)."""
    params: dict[str, Any] = {"limit": 1000, "status": list(statuses)}
    if name is not None:
        params["name"] = name
    response = client.get("/tasks", params=params)
    response.raise_for_status()
    page = response.json()
    assert not page["has_more"], "more than 1000 tasks: list_tasks reads one page only"
    items: list[dict[str, Any]] = page["items"]
    return items


def add(client: httpx.Client, path: str, **params: Any) -> str:
    """Send ``POST path`` to a route that adds one task and return the task id."""
    response = client.post(path, params=params)
    response.raise_for_status()
    task_id: str = response.json()["task_id"]
    return task_id


def add_records(client: httpx.Client, run_file: Path, count: int) -> list[str]:
    """Add ``count`` record tasks in one request and return their ids."""
    response = client.post("/record", params={"run_file": str(run_file), "count": count})
    response.raise_for_status()
    task_ids: list[str] = response.json()["task_ids"]
    return task_ids


def wait_for_status(
    client: httpx.Client, task_id: str, status: str, timeout: float = 15.0
) -> dict[str, Any]:
    """Wait until the task has ``status`` and return it."""

    def check() -> dict[str, Any] | None:
        task = get_task(client, task_id)
        return task if task["status"] == status else None

    return wait_until(check, timeout, f"task {task_id} to be {status}")


def wait_until_settled(client: httpx.Client, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Wait until no task is PENDING or RUNNING and return every task."""
    wait_until(
        lambda: not list_tasks(client, "PENDING", "RUNNING"),
        timeout,
        "every task to reach a terminal status",
        interval=0.1,
    )
    return list_tasks(client)


def read_lines(path: Path) -> list[str]:
    """Return the lines of a run file, or none when the file does not exist yet."""
    if not path.exists():
        return []
    return path.read_text(encoding="utf-8").splitlines()
