"""Fixtures of the store contract suite: one store per backend kind, records and a clock.

The ``store`` fixture runs each test once per kind in ``STORE_FACTORIES``; select kinds
with ``-k``, for example ``pytest tests/stores -k "memory or sqlite"``. The postgres and
redis kinds use the shared servers on 127.0.0.1 (see ``tests/servers.py``): each test
session gets its own PostgreSQL database, and each Redis test its own key prefix.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from servers import POSTGRES, REDIS, require_server

from app_taskflow.models import TaskRecord, TaskStatus, new_task_id
from app_taskflow.stores.base import TaskStore

if TYPE_CHECKING:
    import psycopg
    import redis

BASE_TIME = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""Time zero of the test clock. ``clock(seconds)`` returns this time plus ``seconds``."""

POSTGRES_ADMIN_URL = f"postgresql://postgres@{POSTGRES.address}/test"
"""The existing database that the suite connects to when it creates its own database."""

REDIS_URL = f"redis://{REDIS.address}/0"

KEPT_POSTGRES_TABLES = ("taskflow_schema_version",)
"""Tables left alone between tests: emptying them would make ``open()`` migrate again."""


@dataclass
class PostgresDatabase:
    """A database created for one test session, with a connection that empties it."""

    url: str
    connection: psycopg.Connection[Any]

    def empty_tables(self) -> None:
        """Delete every row of the app-taskflow tables, except ``KEPT_POSTGRES_TABLES``.

        Before the first ``open()`` of the session no table exists, and nothing is done.
        """
        from psycopg import sql

        rows = self.connection.execute(
            "SELECT tablename FROM pg_tables"
            " WHERE schemaname = current_schema() AND tablename LIKE 'taskflow\\_%%'"
            " AND NOT tablename = ANY(%s)",
            [list(KEPT_POSTGRES_TABLES)],
        ).fetchall()
        # DELETE empties these small tables in well under a millisecond, where TRUNCATE took
        # about 28 ms per test on PostgreSQL 15. The replica role skips foreign key checks and
        # triggers, as TRUNCATE does, so the tables can be emptied in any order.
        with self.connection.transaction():
            self.connection.execute("SET LOCAL session_replication_role = replica")
            for (table,) in rows:
                self.connection.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(table)))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[PostgresDatabase]:
    """Yield a fresh PostgreSQL database named ``taskflow_test_<random>``; drop it at the end.

    Skips when the server is unreachable, and fails instead when ``CI`` is set.
    """
    import psycopg
    from psycopg import sql

    admin: list[psycopg.Connection[Any]] = []

    def connect_admin() -> None:
        admin.append(psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3))

    require_server(POSTGRES, connect_admin, (psycopg.OperationalError,))
    [admin_connection] = admin
    name = f"taskflow_test_{secrets.token_hex(6)}"
    with admin_connection:
        admin_connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            connection = psycopg.connect(
                f"postgresql://postgres@{POSTGRES.address}/{name}", autocommit=True
            )
            # A store that a failed test left open could make the cleanup wait for its row locks.
            # The lock timeout turns that wait into a clear error before the test timeout.
            connection.execute("SET lock_timeout = '5s'")
            with connection:
                yield PostgresDatabase(
                    url=f"postgresql+psycopg://postgres@{POSTGRES.address}/{name}",
                    connection=connection,
                )
        finally:
            admin_connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    """Yield a client of the shared Redis server, for cleaning up keys the tests wrote.

    Skips when the server is unreachable, and fails instead when ``CI`` is set.
    """
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    with client:
        require_server(REDIS, client.ping, (redis.ConnectionError, redis.TimeoutError))
        yield client


StoreMaker = Callable[[], TaskStore]
"""A function that returns a new, unopened store on one test's data, as each app instance has."""

# Each factory imports its backend only when a test requests that kind, so that a missing
# driver or backend module fails that kind's tests instead of stopping collection. A factory
# yields a StoreMaker and cleans up the test's data after every store it made is closed.


@contextmanager
def _memory_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    from app_taskflow.stores.memory import MemoryStore

    # Each MemoryStore has its own tasks; a second one shares nothing with the first.
    yield MemoryStore


@contextmanager
def _sqlite_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    from app_taskflow.stores.sql import SqlStore

    url = f"sqlite:///{request.getfixturevalue('tmp_path')}/tasks.db"
    yield lambda: SqlStore(url)


@contextmanager
def _postgres_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    from app_taskflow.stores.sql import SqlStore

    database: PostgresDatabase = request.getfixturevalue("postgres_database")
    # Emptied before the stores open, so that no open store has rows deleted under it.
    database.empty_tables()
    yield lambda: SqlStore(database.url)


@contextmanager
def _redis_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    from app_taskflow.stores.redis import RedisStore

    client: redis.Redis = request.getfixturevalue("redis_client")
    prefix = f"taskflow-test-{secrets.token_hex(6)}"
    try:
        yield lambda: RedisStore(REDIS_URL, prefix=prefix)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@contextmanager
def _example_json_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    # The custom store of examples/custom_store, so that the example that docs/custom-store.md
    # quotes keeps passing the contract.
    from examples.custom_store import JsonFileStore

    path = request.getfixturevalue("tmp_path") / "tasks.json"
    yield lambda: JsonFileStore(path)


STORE_FACTORIES: dict[str, Callable[[pytest.FixtureRequest], AbstractContextManager[StoreMaker]]]
STORE_FACTORIES = {
    "memory": _memory_store,
    "sqlite": _sqlite_store,
    "postgres": _postgres_store,
    "redis": _redis_store,
    "example-json": _example_json_store,
}


@pytest.fixture(params=list(STORE_FACTORIES))
def store_maker(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    """Yield a maker of stores of each kind in ``STORE_FACTORIES``, all on the same data."""
    with STORE_FACTORIES[request.param](request) as make:
        yield make


@pytest.fixture
async def store(store_maker: StoreMaker) -> AsyncIterator[TaskStore]:
    """Yield an opened store of the kind ``store_maker`` makes, closed after the test."""
    task_store = store_maker()
    await task_store.open()
    try:
        yield task_store
    finally:
        await task_store.close()


@pytest.fixture
async def second_store(store: TaskStore, store_maker: StoreMaker) -> AsyncIterator[TaskStore]:
    """Yield another opened store on the data of ``store``, as a second app instance has.

    Skips for stores that cannot be shared between instances, such as ``MemoryStore``.
    """
    if not store.supports_multiple_instances:
        pytest.skip(f"{type(store).__name__} cannot be shared between instances.")
    task_store = store_maker()
    await task_store.open()
    try:
        yield task_store
    finally:
        await task_store.close()


@pytest.fixture
def clock() -> Callable[[float], datetime]:
    """Return a function that maps seconds after ``BASE_TIME`` to an aware UTC datetime."""

    def at(seconds: float) -> datetime:
        return BASE_TIME + timedelta(seconds=seconds)

    return at


@pytest.fixture
def make_record(clock: Callable[[float], datetime]) -> Callable[..., TaskRecord]:
    """Return a factory of valid PENDING task records, with fields overridden by keyword.

    Each record gets a fresh id and is created one second after the previous one, in the
    hour before ``BASE_TIME``, so creation order is also age order. It has no owner, one
    attempt allowed and no schedule.
    """
    seconds_before_base = itertools.count(-3600)

    def make(**overrides: Any) -> TaskRecord:
        fields: dict[str, Any] = {
            "id": new_task_id(),
            "name": "send_email",
            "status": TaskStatus.PENDING,
            "args": ["user@example.com"],
            "kwargs": {"subject": "Welcome"},
            "max_attempts": 1,
            "created_at": clock(next(seconds_before_base)),
        }
        fields.update(overrides)
        return TaskRecord(**fields)

    return make
