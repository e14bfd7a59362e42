"""Tests of SqlStore on SQLite beyond the contract: files, schema versions, locks, processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel

from app_taskflow.errors import (
    ConfigurationError,
    MissingExtraError,
    SchemaVersionError,
    StoreError,
)
from app_taskflow.models import AttemptOutcome, LogEntry, TaskQuery, TaskRecord, TaskStatus
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_schema import SCHEMA_VERSION

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
