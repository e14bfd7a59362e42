"""Test servers that suites need: a missing one skips on a laptop and fails the run in CI."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Server:
    """A server that some tests need, and the command that starts it on this address."""

    name: str
    address: str
    start_command: str


POSTGRES = Server(
    name="PostgreSQL",
    address="127.0.0.1:5432",
    start_command='pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start',
)
REDIS = Server(
    name="Redis",
    address="127.0.0.1:6379",
    start_command='redis-server --bind 127.0.0.1 --port 6379 --save ""',
)


def require_server(
    server: Server, check: Callable[[], object], errors: tuple[type[Exception], ...]
) -> None:
    """Call ``check``; when it raises one of ``errors``, skip the test, or fail it in CI.

    CI is recognised by the environment variable ``CI`` being set to anything but an empty
    string, as GitHub Actions, GitLab CI and ``.ci/run`` set it.
    """
    try:
        check()
    except errors as error:
        message = (
            f"{server.name} is not reachable at {server.address} ({error}). "
            f"Start it with `{server.start_command}` (or run .ci/run, which starts it)."
        )
    else:
        return

    # Outside the except block, so that the report does not chain the driver's traceback.
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
