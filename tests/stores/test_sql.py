"""Tests of SqlStore on SQLite beyond the contract: schema, query plans, locks, change feed.

Helpers that do not depend on SQLite are shared with ``test_postgres.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from loguru import logger
from sqlalchemy import Connection, Engine, bindparam, create_engine, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel

from app_taskflow.errors import (
    ConfigurationError,
    MissingExtraError,
    SchemaVersionError,
    StoreError,
    TaskNotFoundError,
)
from app_taskflow.models import (
    TERMINAL_STATUSES,
    AttemptOutcome,
    LogEntry,
    TaskChange,
    TaskMetrics,
    TaskOrigin,
    TaskQuery,
    TaskRecord,
    TaskStatus,
    new_task_id,
)
from app_taskflow.stores import sql, sql_queries, sql_watch
from app_taskflow.stores.base import build_metrics
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_migrations import MIGRATIONS, SCHEMA_VERSION
from app_taskflow.stores.sql_schema import TaskflowTable, UtcDateTime

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]
StoreOpener = Callable[..., Awaitable[SqlStore]]

INSTANCE_A = "instance-a"


def database_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def database_path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


@pytest.fixture
async def open_store(database_path: Path) -> AsyncIterator[StoreOpener]:
    """Return a function that opens a SqlStore on ``database_path``, closed after the test."""
    stores: list[SqlStore] = []

    async def open_one(url: str | None = None, **options: Any) -> SqlStore:
        store = SqlStore(url or database_url(database_path), **options)
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


@contextmanager
def write_lock_held(path: Path, seconds: float) -> Iterator[None]:
    """Hold the write lock of the database at ``path`` from another connection for a while."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE")

    def release_later() -> None:
        time.sleep(seconds)
        connection.rollback()
        connection.close()

    releaser = threading.Thread(target=release_later)
    releaser.start()
    try:
        yield
    finally:
        releaser.join()


# helpers shared with test_postgres.py


def create_version_1_schema(connection: Connection) -> None:
    """Create the tables as migration 1 left them, and record schema version 1."""
    MIGRATIONS[0](connection)
    connection.execute(
        text(
            "CREATE TABLE taskflow_schema_version"
            " (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)"
        )
    )
    connection.execute(text("INSERT INTO taskflow_schema_version (id, version) VALUES (1, 1)"))


def insert_version_1_task(connection: Connection, task_id: str, created_at: datetime) -> None:
    """Insert a FAILED task with two log entries into a version-1 schema."""
    # Typed, so that the time is stored in the form that the store writes and reads.
    created_at_parameter = bindparam("created_at", type_=UtcDateTime())
    connection.execute(
        text(
            "INSERT INTO taskflow_tasks (id, name, status, args, kwargs, attempts, max_attempts,"
            " created_at, finished_at, duration, error_type, error_message, requeue_on_interrupt,"
            " cancel_requested) VALUES (:id, 'send_email', 'FAILED', '[\"a@example.com\"]',"
            " '{}', 1, 1, :created_at, :created_at, 2.5, 'ValueError', 'invalid address',"
            " false, false)"
        ).bindparams(created_at_parameter),
        {"id": task_id, "created_at": created_at},
    )
    for message in ("connecting", "refused"):
        connection.execute(
            text(
                "INSERT INTO taskflow_logs (task_id, timestamp, level, message, attempt, extra)"
                " VALUES (:id, :created_at, 'INFO', :message, 1, '{}')"
            ).bindparams(created_at_parameter),
            {"id": task_id, "created_at": created_at, "message": message},
        )


def schema_of(connection: Connection) -> dict[str, tuple[set[str], dict[str, list[str]]]]:
    """Return the columns and indexes (name to columns) of each app-taskflow table."""
    inspector = inspect(connection)
    return {
        table: (
            {column["name"] for column in inspector.get_columns(table)},
            {
                str(index["name"]): list(index["column_names"])
                for index in inspector.get_indexes(table)
            },
        )
        for table in inspector.get_table_names()
        if table.startswith("taskflow_")
    }


def schema_of_models(dialect: str) -> dict[str, tuple[set[str], dict[str, list[str]]]]:
    """Return ``schema_of`` as the models describe it for ``dialect``."""
    tables = dict(TaskflowTable.metadata.tables)
    if dialect == "sqlite":
        del tables["taskflow_count_deltas"]
    else:
        del tables["taskflow_changes"]
    return {
        name: (
            {column.name for column in table.columns},
            {str(index.name): [column.name for column in index.columns] for index in table.indexes},
        )
        for name, table in tables.items()
    }


def finished_records(make_record: RecordFactory, clock: Clock, seed: int) -> list[TaskRecord]:
    """Return finished tasks of three names with random durations, many of them equal."""
    generator = random.Random(seed)
    statuses = sorted(TERMINAL_STATUSES)
    records = []
    for name, count in (("send_email", 41), ("resize_image", 20), ("send_sms", 1)):
        for _ in range(count):
            status = generator.choice(statuses)
            records.append(
                make_record(
                    name=name,
                    status=status,
                    attempts=1,
                    finished_at=clock(10),
                    duration=generator.choice([None, 0.5, 1.0, generator.uniform(0, 100)]),
                )
            )
    return records


def metrics_of(records: Sequence[TaskRecord]) -> TaskMetrics:
    """Return the metrics of ``records`` as ``build_metrics`` computes them in Python."""
    counts: dict[str, dict[TaskStatus, int]] = defaultdict(lambda: defaultdict(int))
    durations: dict[str, list[float]] = defaultdict(list)
    for record in records:
        counts[record.name][record.status] += 1
        if record.duration is not None:
            durations[record.name].append(record.duration)
    return build_metrics(counts, durations)


def rounded_means(metrics: TaskMetrics) -> TaskMetrics:
    """Return ``metrics`` with means rounded, as SQL sums durations in another order."""
    rounded = metrics.model_copy(deep=True)
    for stats in [rounded.duration, *(name.duration for name in rounded.by_name.values())]:
        if stats.mean is not None:
            stats.mean = round(stats.mean, 9)
    return rounded


@contextmanager
def executed_statements() -> Iterator[list[tuple[str, Any]]]:
    """Collect the SQL statements that any engine executes, with their parameters."""
    statements: list[tuple[str, Any]] = []

    def collect(connection: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", collect)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", collect)


async def list_statement(store: SqlStore, query: TaskQuery) -> tuple[str, Any]:
    """Return the SELECT statement with which ``store.list(query)`` reads its page."""
    with executed_statements() as statements:
        await store.list(query)
    [page_statement] = [item for item in statements if item[0].lstrip().startswith("SELECT")]
    return page_statement


def page_queries(cursor: str) -> dict[str, TaskQuery]:
    """Return the page queries whose plans the tests check, by a readable name."""
    return {
        "first_page": TaskQuery(),
        "oldest_first": TaskQuery(order="oldest"),
        "status": TaskQuery(statuses=[TaskStatus.FAILED]),
        "name": TaskQuery(name="send_email"),
        "cursor": TaskQuery(cursor=cursor),
        "status_cursor": TaskQuery(statuses=[TaskStatus.FAILED], cursor=cursor),
        "statuses": TaskQuery(statuses=[TaskStatus.PENDING, TaskStatus.FAILED]),
    }


class Watcher:
    """Reads the changes of ``store.watch()`` with a timeout per read.

    A read that times out stays pending, because cancelling it would close the iterator.
    """

    def __init__(self, store: SqlStore) -> None:
        self.changes = store.watch()
        self._next: asyncio.Future[TaskChange] | None = None

    async def start(self, store: SqlStore, probe_id: str, clock: Clock) -> None:
        """Subscribe, then wait until a log entry appended to ``probe_id`` arrives."""
        self._next = asyncio.ensure_future(anext(self.changes))
        await asyncio.sleep(0)
        for number in range(5):
            message = f"probe {number}"
            await store.append_logs(probe_id, [LogEntry(timestamp=clock(0), message=message)])
            try:
                await self.read_until(partial(is_log, message=message), timeout=0.6)
                return
            except TimeoutError:
                continue
        raise AssertionError("The watcher received none of 5 probe log entries.")

    async def read(self, timeout: float = 5.0) -> TaskChange:  # noqa: ASYNC109
        """Return the next change, or raise ``TimeoutError`` when none came in time."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self.changes))
        done, _ = await asyncio.wait({self._next}, timeout=timeout)
        if not done:
            raise TimeoutError(f"No change arrived within {timeout} s.")
        change = self._next.result()
        self._next = None
        return change

    async def read_until(
        self,
        matches: Callable[[TaskChange], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> list[TaskChange]:
        """Read changes until one ``matches``; return the changes read, that one last."""
        seen = [await self.read(timeout)]
        while not matches(seen[-1]):
            seen.append(await self.read(timeout))
        return seen

    async def aclose(self) -> None:
        """Cancel a pending read and close the iterator."""
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        await self.changes.aclose()


def is_log(change: TaskChange, message: str) -> bool:
    """Return whether ``change`` is a new log entry with ``message``."""
    return change.log is not None and change.log.message == message


def describe(changes: Sequence[TaskChange], task_id: str) -> list[str]:
    """Return the status or log message of each change of one task, in order."""
    described = []
    for change in changes:
        if change.task_id != task_id:
            continue
        if change.summary is not None:
            described.append(change.summary.status.value)
        elif change.log is not None:
            described.append(f"log {change.log.message}")
    return described


# files and schema


async def test_open_enables_wal(open_store: StoreOpener, database_path: Path) -> None:
    await open_store()

    connection = sqlite3.connect(database_path)
    [journal_mode] = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()

    assert journal_mode == "wal"


async def test_tables_kept_out_of_sqlmodel_metadata() -> None:
    assert "taskflow_tasks" not in SQLModel.metadata.tables


async def test_records_survive_reopen(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    task_id = (await store.create([make_record(idempotency_key="order-42")]))[0]
    await store.claim(task_id, INSTANCE_A, clock(1))
    await store.append_logs(task_id, [LogEntry(timestamp=clock(2), message="sent", attempt=1)])
    outcome_fields = {"status": TaskStatus.SUCCESS, "finished_at": clock(3), "duration": 2.0}
    await store.finish(task_id, INSTANCE_A, 1, AttemptOutcome(**outcome_fields))
    before = await store.get(task_id)
    await store.close()

    reopened = await open_store()

    assert await reopened.get(task_id) == before
    page = await reopened.list(TaskQuery())
    assert [task.id for task in page.items] == [task_id]
    assert await reopened.create([make_record(idempotency_key="order-42")]) == [task_id]


async def test_open_rejects_newer_schema(open_store: StoreOpener, database_path: Path) -> None:
    store = await open_store()
    await store.close()
    connection = sqlite3.connect(database_path)
    with connection:
        connection.execute("UPDATE taskflow_schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    connection.close()

    message = rf"schema version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}\. Upgrade app-taskflow"
    with pytest.raises(SchemaVersionError, match=message):
        await open_store()


async def test_open_migrates_version_1(
    open_store: StoreOpener, database_path: Path, clock: Clock
) -> None:
    engine = create_engine(database_url(database_path))
    with engine.begin() as connection:
        create_version_1_schema(connection)
        insert_version_1_task(connection, "task-1", clock(0))
    engine.dispose()

    store = await open_store()

    task = await store.get("task-1")
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.created_at == clock(0)
    assert [entry.message for entry in task.logs] == ["connecting", "refused"]
    assert task.args == ["a@example.com"]
    assert task.tags == {}
    page = await store.list(TaskQuery(statuses=[TaskStatus.FAILED], search="REFUSED"))
    assert [item.id for item in page.items] == ["task-1"]
    connection = sqlite3.connect(database_path)
    [version] = connection.execute("SELECT version FROM taskflow_schema_version").fetchone()
    connection.close()
    assert version == SCHEMA_VERSION


async def test_migrated_schema_matches_models(
    open_store: StoreOpener, database_path: Path, clock: Clock
) -> None:
    engine = create_engine(database_url(database_path))
    with engine.begin() as connection:
        create_version_1_schema(connection)
    await open_store()

    with engine.connect() as connection:
        migrated = schema_of(connection)
    engine.dispose()

    assert migrated == schema_of_models("sqlite")


async def test_new_schema_matches_models(open_store: StoreOpener, database_path: Path) -> None:
    await open_store()
    engine = create_engine(database_url(database_path))

    with engine.connect() as connection:
        created = schema_of(connection)
    engine.dispose()

    assert created == schema_of_models("sqlite")


async def test_memory_url_shared_by_threads(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store("sqlite://")
    record = make_record()

    await asyncio.gather(*(store.create([make_record()]) for _ in range(5)))
    await store.create([record])

    assert await store.get(record.id) == record


def test_invalid_url_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="Invalid database URL"):
        SqlStore("not a url")


def test_unsupported_database_raises_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"Unsupported database URL mysql://.*SQLite"):
        SqlStore("mysql://taskflow@localhost/tasks")


def test_old_sqlite_raises_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")

    with pytest.raises(ConfigurationError, match=r"needs SQLite 3\.35\.0 or newer.*3\.31\.1"):
        SqlStore("sqlite://")


def test_missing_driver_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)

    with pytest.raises(MissingExtraError, match=r"pip install 'app-taskflow\[postgres\]'") as error:
        SqlStore("postgresql+psycopg://taskflow:secret@localhost/tasks")

    assert "secret" not in str(error.value)


# datetimes


async def test_get_converts_offset_to_utc(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    created_at = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(created_at=created_at)
    await store.create([record])

    stored = await store.get(record.id)

    assert stored is not None
    assert stored.created_at == created_at
    assert stored.created_at.utcoffset() == timedelta(0)


async def test_create_rejects_naive_datetime(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    record = make_record(created_at=datetime(2030, 1, 1, 12, 0))

    with pytest.raises(StoreError, match="Naive datetime"):
        await store.create([record])


# transactions and errors


async def test_create_batch_is_one_transaction(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    existing = make_record()
    await store.create([existing])
    first = make_record()
    duplicate_id = make_record(id=existing.id)

    with pytest.raises(StoreError):
        await store.create([first, duplicate_id])

    assert await store.get(first.id) is None


async def test_driver_error_raises_store_error(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    [task_id] = await store.create([make_record()])
    connection = sqlite3.connect(database_path)
    connection.execute("DROP TABLE taskflow_logs")
    connection.close()

    with pytest.raises(StoreError, match="no such table: taskflow_logs") as error:
        await store.append_logs(task_id, [LogEntry(timestamp=clock(1), message="lost")])

    assert isinstance(error.value.__cause__, SQLAlchemyError)


# locks


async def test_write_waits_for_locked_database(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store()
    record = make_record()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    with write_lock_held(database_path, seconds=0.5):
        task_ids = await store.create([record])
    elapsed = time.monotonic() - started
    ticker.cancel()

    assert task_ids == [record.id]
    assert await store.get(record.id) == record
    assert elapsed >= 0.4
    # The event loop kept running while the write waited in its thread.
    assert ticks >= 20


async def test_write_locked_past_busy_timeout_raises(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store(busy_timeout=0.1)
    record = make_record()

    with (
        write_lock_held(database_path, seconds=0.5),
        pytest.raises(
            StoreError, match=r"Timed out after 0\.1 s waiting for a lock .* during create"
        ),
    ):
        await store.create([record])

    assert await store.get(record.id) is None


async def test_busy_error_retried_until_write_lands(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    record = make_record()
    failures_left = 2

    # SQLite returns some busy errors without waiting in its busy handler. This listener
    # imitates them by failing the first two inserts of the task.
    def fail_with_busy(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal failures_left
        if statement.startswith("INSERT INTO taskflow_tasks") and failures_left > 0:
            failures_left -= 1
            busy = sqlite3.OperationalError("database is locked")
            busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]
            raise busy

    event.listen(Engine, "before_cursor_execute", fail_with_busy)
    try:
        task_ids = await store.create([record])
    finally:
        event.remove(Engine, "before_cursor_execute", fail_with_busy)

    assert failures_left == 0
    assert task_ids == [record.id]
    assert await store.get(record.id) == record


# group commit


async def test_writes_waiting_commit_together(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store()
    records = [make_record() for _ in range(5)]

    # The writes queue while another connection holds the lock.
    with executed_statements() as statements, write_lock_held(database_path, seconds=0.3):
        results = await asyncio.gather(*(store.create([record]) for record in records))

    assert results == [[record.id] for record in records]
    begins = [item for item in statements if item[0] == "BEGIN IMMEDIATE"]
    assert len(begins) <= 2


async def test_failed_write_spares_its_group(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    existing = make_record()
    await store.create([existing])
    first, duplicate, last = make_record(), make_record(id=existing.id), make_record()

    with write_lock_held(database_path, seconds=0.3):
        results = await asyncio.gather(
            store.create([first]),
            store.create([duplicate]),
            store.cancel(new_task_id(), clock(1)),
            store.create([last]),
            return_exceptions=True,
        )

    assert results[0] == [first.id]
    assert isinstance(results[1], StoreError)
    assert isinstance(results[2], TaskNotFoundError)
    assert results[3] == [last.id]
    assert await store.get(first.id) == first
    assert await store.get(last.id) == last


async def test_failed_write_left_out_of_journal(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store()
    existing = make_record()
    await store.create([existing])
    kept = make_record()
    # A batch whose second record fails after its first was inserted.
    lost, duplicate = make_record(), make_record(id=existing.id)

    with write_lock_held(database_path, seconds=0.3):
        await asyncio.gather(
            store.create([lost, duplicate]), store.create([kept]), return_exceptions=True
        )

    connection = sqlite3.connect(database_path)
    journaled = {row[0] for row in connection.execute("SELECT task_id FROM taskflow_changes")}
    connection.close()
    assert journaled == {existing.id, kept.id}


async def test_cancelled_write_still_lands(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store()
    record = make_record()

    with write_lock_held(database_path, seconds=0.3):
        writing = asyncio.create_task(store.create([record]))
        await asyncio.sleep(0.05)
        writing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await writing
    # Writes commit in order, so the cancelled one has landed once a later one returns.
    await store.create([make_record()])

    assert await store.get(record.id) == record


# list


async def test_list_plans_use_indexes(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory
) -> None:
    store = await open_store()
    records = [make_record(name=name) for name in ("send_email", "resize_image") * 20]
    await store.create(records)
    first_page = await store.list(TaskQuery(limit=5))
    assert first_page.next_cursor is not None
    connection = sqlite3.connect(database_path)
    connection.execute("ANALYZE")

    plans = {}
    for name, query in page_queries(first_page.next_cursor).items():
        statement, parameters = await list_statement(store, query)
        rows = connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
        plans[name] = [row[-1] for row in rows]
    connection.close()

    # Each page is read in index order, so SQLite stops after the rows of the page.
    expected_index = {
        "first_page": "ix_taskflow_tasks_created_at_id",
        "oldest_first": "ix_taskflow_tasks_created_at_id",
        "status": "ix_taskflow_tasks_status_created_at_id (status=?)",
        "name": "ix_taskflow_tasks_name_created_at_id (name=?)",
        "cursor": "ix_taskflow_tasks_created_at_id ((created_at,id)<(?,?))",
        "status_cursor": (
            "ix_taskflow_tasks_status_created_at_id (status=? AND (created_at,id)<(?,?))"
        ),
        "statuses": "ix_taskflow_tasks_status_created_at_id (status=?)",
    }
    for name, index in expected_index.items():
        assert any(line.endswith(f"USING INDEX {index}") for line in plans[name]), plans[name]
    for name in ("first_page", "oldest_first", "status", "name", "cursor", "status_cursor"):
        assert not any("TEMP B-TREE" in line for line in plans[name]), plans[name]
    # Several statuses: one index range per status, then a merge of the pages only.
    assert sum("USING INDEX ix_taskflow_tasks_status" in line for line in plans["statuses"]) == 2


async def create_tagged_tasks(store: SqlStore, make_record: RecordFactory) -> dict[str, str]:
    """Create tasks with tags, one with an origin and a trace parent; return ids by label."""
    labels = {
        "eu_premium": make_record(
            tags={"region": "eu", "plan": "premium", "team.name": "Zürich"},
            origin=TaskOrigin(method="POST", path="/signup", request_id="req-1"),
            trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        "eu_free": make_record(tags={"region": "eu", "plan": "free"}),
        "untagged": make_record(),
    }
    await store.create(list(labels.values()))
    return {label: record.id for label, record in labels.items()}


async def check_tags(store: SqlStore, make_record: RecordFactory) -> None:
    """Check that tags, origin and trace parent are stored, and that pages filter by tags."""
    ids = await create_tagged_tasks(store, make_record)

    stored = await store.get(ids["eu_premium"])
    assert stored is not None
    assert stored.tags == {"region": "eu", "plan": "premium", "team.name": "Zürich"}
    assert stored.origin == TaskOrigin(method="POST", path="/signup", request_id="req-1")
    assert stored.trace_parent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    pages = {
        "region": await store.list(TaskQuery(tags={"region": "eu"})),
        "two_tags": await store.list(TaskQuery(tags={"region": "eu", "plan": "premium"})),
        "dotted_key": await store.list(TaskQuery(tags={"team.name": "Zürich"})),
        "other_value": await store.list(TaskQuery(tags={"region": "us"})),
        "invalid_key": await store.list(TaskQuery(tags={'re"gion': "eu"})),
    }
    assert {item.id for item in pages["region"].items} == {ids["eu_premium"], ids["eu_free"]}
    assert [item.id for item in pages["two_tags"].items] == [ids["eu_premium"]]
    assert [item.id for item in pages["dotted_key"].items] == [ids["eu_premium"]]
    assert pages["other_value"].items == []
    assert pages["invalid_key"].items == []
    assert pages["region"].items[-1].tags == {
        "region": "eu",
        "plan": "premium",
        "team.name": "Zürich",
    }


async def test_tags_and_origin_stored(open_store: StoreOpener, make_record: RecordFactory) -> None:
    store = await open_store()

    await check_tags(store, make_record)


async def test_list_search_ignores_ascii_case_only(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    task_id = (await store.create([make_record(args=["Émile Zola"])]))[0]

    ascii_case = await store.list(TaskQuery(search="ÉMILE zola"))
    other_case = await store.list(TaskQuery(search="émile"))

    assert [item.id for item in ascii_case.items] == [task_id]
    # The NOTE in sql_queries.py: SQLite's LIKE folds the case of ASCII letters only.
    assert other_case.items == []


# metrics


async def test_metrics_match_python_reference(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    records = finished_records(make_record, clock, seed=7)
    await store.create(records)

    metrics = await store.metrics()

    assert rounded_means(metrics) == rounded_means(metrics_of(records))


async def test_metrics_plans_use_indexes(
    open_store: StoreOpener,
    database_path: Path,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_queries, "DURATION_SAMPLE", 5)
    store = await open_store()
    records = finished_records(make_record, clock, seed=3)
    # send_sms finished first, so its percentiles come from a read of its own.
    records.sort(key=lambda record: record.name != "send_sms")
    for position, record in enumerate(records):
        record.finished_at = clock(position)
    await store.create(records)

    with executed_statements() as statements:
        await store.metrics()

    connection = sqlite3.connect(database_path)
    plans = {
        (statement, tuple(parameters)): [
            row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]
        for statement, parameters in statements
    }
    connection.close()
    [sample] = [plan for (statement, _), plan in plans.items() if "finished_at DESC" in statement]
    [of_name] = [plan for (_, parameters), plan in plans.items() if "send_sms" in parameters]
    assert any("USING INDEX ix_taskflow_tasks_finished_at_id" in line for line in sample), sample
    assert any("USING INDEX ix_taskflow_tasks_name_created_at_id" in line for line in of_name)
    # Counts come from the counters: only reads of a sample touch the tasks table.
    readers = [key for key, plan in plans.items() if any("taskflow_tasks" in line for line in plan)]
    assert all("LIMIT" in statement for statement, _ in readers), readers


# prune


async def test_prune_plan_uses_finished_at_index(
    open_store: StoreOpener, database_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    await store.create(finished_records(make_record, clock, seed=1))

    with executed_statements() as statements:
        await store.prune(clock(1000), max_age=60.0, max_count=10)

    connection = sqlite3.connect(database_path)
    # The SELECTs that pick tasks by age and by count; a third one counts them.
    selects = [item for item in statements if "ORDER BY taskflow_tasks.finished_at" in item[0]]
    plans = [
        [row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)]
        for statement, parameters in selects
    ]
    connection.close()
    assert len(plans) == 2
    for plan in plans:
        assert any("USING INDEX ix_taskflow_tasks_finished_at_id" in line for line in plan), plan


# watch


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    """Yield a list to which a test adds its watchers; they are closed after the test."""
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        await watcher.aclose()


async def test_watch_other_store_same_file(
    open_store: StoreOpener, watchers: list[Watcher], make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    other = await open_store()
    probe_id = (await store.create([make_record(name="probe")]))[0]
    watcher = Watcher(store)
    watchers.append(watcher)
    await watcher.start(store, probe_id, clock)

    task_id = (await other.create([make_record()]))[0]
    await other.claim(task_id, INSTANCE_A, clock(1))
    await other.append_logs(task_id, [LogEntry(timestamp=clock(2), message="sent", attempt=1)])
    outcome = AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=clock(3), duration=2.0)
    await other.finish(task_id, INSTANCE_A, 1, outcome)
    changes = await watcher.read_until(
        lambda change: change.summary is not None and change.summary.status is TaskStatus.SUCCESS
    )

    assert describe(changes, task_id) == ["PENDING", "RUNNING", "log sent", "SUCCESS"]


async def test_watch_journal_trimmed_resyncs(
    open_store: StoreOpener,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_watch, "JOURNAL_KEEP", 5)
    monkeypatch.setattr(sql, "TRIM_EVERY", 1)
    store = await open_store()
    other = await open_store()
    probe_id = (await store.create([make_record(name="probe")]))[0]
    watcher = Watcher(store)
    watchers.append(watcher)
    await watcher.start(store, probe_id, clock)

    # One transaction writes 20 journal entries and trims all but the newest 5.
    records = [make_record() for _ in range(20)]
    await other.create(records)
    changes = await watcher.read_until(lambda change: change.task_id == records[-1].id)

    assert changes[0].resync
    assert [change.task_id for change in changes[1:]] == [record.id for record in records[-5:]]


async def test_watch_survives_failed_poll(
    open_store: StoreOpener,
    database_path: Path,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    other = await open_store()
    probe_id = (await store.create([make_record(name="probe")]))[0]
    watcher = Watcher(store)
    watchers.append(watcher)
    await watcher.start(store, probe_id, clock)
    errors: list[str] = []
    sink_id = logger.add(lambda message: errors.append(str(message)), level="ERROR")

    connection = sqlite3.connect(database_path, isolation_level=None)
    try:
        connection.execute("ALTER TABLE taskflow_changes RENAME TO taskflow_changes_away")
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.05)
        connection.execute("ALTER TABLE taskflow_changes_away RENAME TO taskflow_changes")
    finally:
        connection.close()
        logger.remove(sink_id)
    [task_id] = await other.create([make_record()])
    changes = await watcher.read_until(lambda change: change.task_id == task_id)

    assert len(errors) == 1
    assert "could not read the task store" in errors[0]
    assert describe(changes, task_id) == ["PENDING"]


async def test_journal_keeps_newest_entries(
    open_store: StoreOpener,
    database_path: Path,
    make_record: RecordFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_watch, "JOURNAL_KEEP", 5)
    monkeypatch.setattr(sql, "TRIM_EVERY", 1)
    store = await open_store()

    for _ in range(3):
        await store.create([make_record() for _ in range(4)])

    connection = sqlite3.connect(database_path)
    [count] = connection.execute("SELECT count(*) FROM taskflow_changes").fetchone()
    connection.close()
    assert count == 5


# several processes

CLAIM_SCRIPT = """
import asyncio, json, sys
from datetime import UTC, datetime
from pathlib import Path

from app_taskflow.stores.sql import SqlStore


async def main(url: str, instance_id: str, start_file: str) -> None:
    store = SqlStore(url)
    await store.open()
    print("ready", flush=True)
    while not Path(start_file).exists():
        await asyncio.sleep(0.005)
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    claimed = []
    while batch := await store.claim_next(instance_id, now, 5, ["send_email"]):
        claimed.extend(task.id for task in batch)
    await store.close()
    print(json.dumps(claimed), flush=True)


asyncio.run(main(*sys.argv[1:]))
"""

CREATE_SCRIPT = """
import asyncio, json, sys
from datetime import UTC, datetime
from pathlib import Path

from app_taskflow.models import TaskRecord, TaskStatus, new_task_id
from app_taskflow.stores.sql import SqlStore


async def main(url: str, key_count: str, start_file: str) -> None:
    store = SqlStore(url)
    await store.open()
    print("ready", flush=True)
    while not Path(start_file).exists():
        await asyncio.sleep(0.005)
    ids = []
    for number in range(int(key_count)):
        record = TaskRecord(
            id=new_task_id(),
            name="send_email",
            status=TaskStatus.PENDING,
            args=[number],
            created_at=datetime(2030, 1, 1, 12, 0, tzinfo=UTC),
            idempotency_key=f"order-{number}",
        )
        ids.extend(await store.create([record]))
    await store.close()
    print(json.dumps(ids), flush=True)


asyncio.run(main(*sys.argv[1:]))
"""


def run_together(script: str, arguments: list[list[str]], start_file: Path) -> list[Any]:
    """Run one Python process per argument list, start them at once, return their JSON output.

    Each process prints "ready" once it is set up, waits for ``start_file`` to exist, then
    prints one line of JSON.
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *process_arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_arguments in arguments
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(f"A store process failed to start:\n{process.communicate()[1]}")
        start_file.touch()

        outputs = []
        for process in processes:
            stdout, stderr = process.communicate(timeout=30)
            if process.returncode != 0:
                raise RuntimeError(f"A store process failed:\n{stderr}")
            outputs.append(json.loads(stdout))
        return outputs
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_claim_next_processes_each_task_once(
    database_path: Path, tmp_path: Path, make_record: RecordFactory
) -> None:
    records = [make_record() for _ in range(200)]
    url = database_url(database_path)
    start_file = tmp_path / "start"

    async def create_tasks() -> None:
        store = SqlStore(url)
        await store.open()
        await store.create(records)
        await store.close()

    asyncio.run(create_tasks())
    arguments = [[url, f"instance-{n}", str(start_file)] for n in range(4)]

    claimed_per_process = run_together(CLAIM_SCRIPT, arguments, start_file)

    claimed_ids = [task_id for claimed in claimed_per_process for task_id in claimed]
    assert len(claimed_ids) == len(records)
    assert set(claimed_ids) == {record.id for record in records}

    async def count_running_first_attempts() -> int:
        store = SqlStore(url)
        await store.open()
        tasks = [await store.get(record.id) for record in records]
        await store.close()
        return sum(
            1
            for task in tasks
            if task is not None and task.status is TaskStatus.RUNNING and task.attempts == 1
        )

    assert asyncio.run(count_running_first_attempts()) == len(records)


def test_create_processes_same_key_one_task(database_path: Path, tmp_path: Path) -> None:
    key_count = 20
    start_file = tmp_path / "start"
    arguments = [[database_url(database_path), str(key_count), str(start_file)]] * 4

    ids_per_process = run_together(CREATE_SCRIPT, arguments, start_file)

    for ids in ids_per_process[1:]:
        assert ids == ids_per_process[0]

    async def count_tasks() -> int:
        store = SqlStore(database_url(database_path))
        await store.open()
        page = await store.list(TaskQuery(limit=1000))
        await store.close()
        return len(page.items)

    assert asyncio.run(count_tasks()) == key_count


WRITE_SCRIPT = """
import asyncio, sys
from datetime import UTC, datetime

from app_taskflow.models import AttemptOutcome, LogEntry, TaskRecord, TaskStatus
from app_taskflow.stores.sql import SqlStore


async def main(url: str, task_id: str) -> None:
    store = SqlStore(url)
    await store.open()
    now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    record = TaskRecord(id=task_id, name="send_email", status=TaskStatus.PENDING, created_at=now)
    await store.create([record])
    await store.claim(task_id, "instance-b", now)
    await store.append_logs(task_id, [LogEntry(timestamp=now, message="sent", attempt=1)])
    outcome = AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=now, duration=1.0)
    await store.finish(task_id, "instance-b", 1, outcome)
    await store.close()


asyncio.run(main(*sys.argv[1:]))
"""


async def test_watch_changes_from_other_process(
    open_store: StoreOpener,
    database_path: Path,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    probe_id = (await store.create([make_record(name="probe")]))[0]
    watcher = Watcher(store)
    watchers.append(watcher)
    await watcher.start(store, probe_id, clock)
    task_id = new_task_id()

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITE_SCRIPT,
        database_url(database_path),
        task_id,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        changes = await watcher.read_until(
            lambda change: (
                change.task_id == task_id
                and change.summary is not None
                and change.summary.status is TaskStatus.SUCCESS
            ),
            timeout=20.0,
        )
    finally:
        _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()

    assert describe(changes, task_id) == ["PENDING", "RUNNING", "log sent", "SUCCESS"]
