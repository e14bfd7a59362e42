"""Private Redis and PostgreSQL servers on free loopback ports, for outage tests to stop.

The shared servers on the standard ports must never go down, so the outage tests start
their own: ``redis-server`` as a child process, and a PostgreSQL cluster made by
``initdb`` in a temporary folder and run by ``pg_ctl``. ``initdb`` rejects root, so as
root the PostgreSQL commands run as the ``postgres`` OS user through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import pytest

from .support import STOP_TIMEOUT, free_port, wait_until

SERVER_START_TIMEOUT = 30.0
"""Seconds a private server gets to accept connections after it was started."""
POSTGRES_OS_USER = "postgres"


def require_program(*names: str) -> None:
    """Skip the test unless every program in ``names`` is on ``PATH``, or fail it in CI."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        _skip_or_fail(
            f"Outage tests need {', '.join(missing)} on PATH to start a private server; "
            "install the Redis and PostgreSQL server packages."
        )


def require_postgres_user() -> None:
    """As root, skip the test unless the ``postgres`` OS user exists, or fail it in CI."""
    if os.geteuid() != 0:
        return
    try:
        pwd.getpwnam(POSTGRES_OS_USER)
    except KeyError:
        _skip_or_fail(
            f"initdb rejects root, and no OS user {POSTGRES_OS_USER!r} exists to run it as; "
            "create one, or run the tests as a user other than root."
        )
    require_program("runuser")


def _skip_or_fail(message: str) -> None:
    # The same rule as for the shared servers: a laptop may lack them, CI must not.
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


class RedisServer:
    """A ``redis-server`` child process on a free port, which a test may pause or kill.

    With ``persistent``, every write is appended and synced to an AOF file in ``folder``
    before Redis replies, so a restart after SIGKILL keeps every write that a client saw.
    """

    def __init__(self, folder: Path, persistent: bool) -> None:
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.log_path = folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """The redis-py URL of database 0 on this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start the server and wait until it replies to PING (after loading its AOF file)."""
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port)]
        command += ["--save", "", "--dir", str(self.folder), "--daemonize", "no"]
        if self.persistent:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        with self.log_path.open("ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        wait_until(self._replies_to_ping, SERVER_START_TIMEOUT, f"redis-server on port {self.port}")

    def pause(self) -> None:
        """Stop the process with SIGSTOP: connections stay open, but no command gets a reply."""
        os.kill(self._pid(), signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """Let a paused process continue with SIGCONT."""
        os.kill(self._pid(), signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """End the process with SIGKILL, as a crash would, and wait for it to exit."""
        process = self._require_process()
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        self.process = None
        self.paused = False

    def stop(self) -> None:
        """Stop the process if it runs: SIGTERM, then SIGKILL after a bound."""
        process = self.process
        if process is None:
            return
        if self.paused:
            self.resume()
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
        self.process = None

    def log(self) -> str:
        """Return everything the server printed so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _replies_to_ping(self) -> bool:
        import redis

        process = self._require_process()
        if process.poll() is not None:
            raise AssertionError(
                f"redis-server exited with code {process.returncode}:\n{self.log()}"
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        with client:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.TimeoutError):
                # BusyLoadingError, raised while the AOF file loads, is a ConnectionError.
                return False

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise AssertionError(f"redis-server on port {self.port} is not running.")
        return self.process

    def _pid(self) -> int:
        return self._require_process().pid


class PostgresCluster:
    """A PostgreSQL cluster in a temporary folder, served on a free port by ``pg_ctl``.

    ``fsync`` is off, which loses data only when the operating system stops, not when the
    server is stopped in immediate mode (a crash of PostgreSQL alone).
    """

    def __init__(self) -> None:
        self.as_owner: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            owner = pwd.getpwnam(POSTGRES_OS_USER)
            self.as_owner = ["runuser", "-u", POSTGRES_OS_USER, "--"]
        # Not under pytest's tmp_path: its folders are private to root, and initdb runs as
        # the postgres user, which must reach this folder.
        self.folder = Path(tempfile.mkdtemp(prefix="taskflow-outage-postgres-"))
        if owner is not None:
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        self.data = self.folder / "data"
        self.log_path = self.folder / "postgres.log"
        self.port = free_port()
        self.running = False

    def url(self, database: str) -> str:
        """Return the URL of ``database`` as the superuser ``postgres``, with trust auth."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def initialize(self) -> None:
        """Create the cluster with ``initdb``: superuser ``postgres``, trust authentication."""
        self._run(
            "initdb",
            "--pgdata",
            str(self.data),
            "--username",
            "postgres",
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server on ``port`` and wait until it accepts connections."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.folder} -c fsync=off"
        )
        self._run(
            "pg_ctl",
            "start",
            "--pgdata",
            str(self.data),
            "--log",
            str(self.log_path),
            "--options",
            options,
            "--wait",
            "--timeout",
            str(int(SERVER_START_TIMEOUT)),
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. Mode ``immediate`` ends it at once, as a crash would."""
        self._run(
            "pg_ctl",
            "stop",
            "--pgdata",
            str(self.data),
            "--mode",
            mode,
            "--wait",
            "--timeout",
            str(int(STOP_TIMEOUT)),
        )
        self.running = False

    def create_database(self, name: str) -> None:
        """Create the database ``name``."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def remove(self) -> None:
        """Stop the server if it runs and delete the cluster's folder."""
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def log(self) -> str:
        """Return the server log written so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self.as_owner, *command],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=SERVER_START_TIMEOUT + 10,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed with code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n{self.log()}"
            )


class Outage(ABC):
    """A way to make a private store server unreachable for a while, then bring it back."""

    store: dict[str, Any]
    """The ``store`` section of an app configuration that uses this server."""

    @abstractmethod
    def begin(self) -> None:
        """Make the store unreachable."""

    @abstractmethod
    def end(self) -> None:
        """Make the store reachable again, with every write it acknowledged."""

    @abstractmethod
    def log(self) -> str:
        """Return the server's output, for the report of a failed test."""


class RedisPause(Outage):
    """A hung Redis: the process is stopped with SIGSTOP, then continued with SIGCONT.

    The URL sets a 1 s socket timeout, so that a call fails after 1 s and not after
    redis-py's default of 5 s.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.store = {
            "kind": "redis",
            "url": f"{server.url}?socket_timeout=1",
            "prefix": "taskflow-outage",
        }

    def begin(self) -> None:
        self.server.pause()

    def end(self) -> None:
        self.server.resume()

    def log(self) -> str:
        return self.server.log()


class RedisRestart(Outage):
    """A Redis crash: SIGKILL, then a restart on the same port that loads the AOF file."""

    def __init__(self, server: RedisServer) -> None:
        assert server.persistent, "a restart without persistence loses every task"
        self.server = server
        self.store = {"kind": "redis", "url": server.url, "prefix": "taskflow-outage"}

    def begin(self) -> None:
        self.server.kill()

    def end(self) -> None:
        self.server.start()

    def log(self) -> str:
        return self.server.log()


class PostgresRestart(Outage):
    """A PostgreSQL crash: ``pg_ctl stop -m immediate``, then a start on the same port."""

    def __init__(self, cluster: PostgresCluster, database: str) -> None:
        self.cluster = cluster
        self.store = {"kind": "postgres", "url": cluster.url(database)}

    def begin(self) -> None:
        self.cluster.stop("immediate")

    def end(self) -> None:
        self.cluster.start()

    def log(self) -> str:
        return self.cluster.log()
