"""Tests of the metrics of SqlStore: the counters that triggers keep, the migration that adds
them, PostgreSQL's count deltas, and the sample of durations behind the percentiles.

Each test runs on SQLite and on PostgreSQL, unless its name says otherwise. PostgreSQL
tests get a database of their own, so that they start from an empty schema.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from servers import POSTGRES, require_server
from sqlalchemy import Connection, Engine, create_engine, insert, text
from sqlalchemy.exc import DBAPIError

from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus
from app_taskflow.stores import sql_queries
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_counts import FOLD_EVERY, FOLD_LOCK_KEY
from app_taskflow.stores.sql_migrations import MIGRATIONS
from app_taskflow.stores.sql_schema import TASK_TABLE

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]
StoreOpener = Callable[[], Awaitable[SqlStore]]
Counts = dict[tuple[str, str], tuple[int, int, float]]

ADMIN_URL = f"postgresql://postgres@{POSTGRES.address}/test"
INSTANCE_A = "instance-a"
INSTANCE_B = "instance-b"
CREATED_AT = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of an empty database of each kind, and drop a PostgreSQL one after."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/tasks.db"
        return

    psycopg = pytest.importorskip("psycopg")
    admin: list[Any] = []

    def connect() -> None:
        admin.append(psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3))

    require_server(POSTGRES, connect, (psycopg.OperationalError,))
    name = f"taskflow_counts_{secrets.token_hex(6)}"
    with admin[0] as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@{POSTGRES.address}/{name}"
        finally:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(database_url: str) -> str:
    """Return ``database_url`` for PostgreSQL, and skip the SQLite run of the test."""
    if not database_url.startswith("postgresql"):
        pytest.skip("The test is about PostgreSQL's count deltas.")
    return database_url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """Yield an engine of its own on the test's database, as another client of it would use."""
    database_engine = create_engine(database_url)
    yield database_engine
    database_engine.dispose()


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[StoreOpener]:
    """Return a function that opens a SqlStore on the test's database, closed after the test."""
    stores: list[SqlStore] = []

    async def open_one() -> SqlStore:
        store = SqlStore(database_url)
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


def task_row(task_id: str, name: str, status: str, duration: float | None) -> dict[str, Any]:
    """Return the column values of a task row written by a client other than the store."""
    return {
        "id": task_id,
        "name": name,
        "status": status,
        "args": "[]",
        "kwargs": "{}",
        "attempts": 1,
        "max_attempts": 1,
        "created_at": CREATED_AT,
        "finished_at": None if status in ("PENDING", "RUNNING") else CREATED_AT,
        "duration": duration,
        "requeue_on_interrupt": False,
        "cancel_requested": False,
    }


def counted(connection: Connection) -> Counts:
    """Return tasks, timed tasks and summed durations per name and status, from the counters."""
    postgres = connection.dialect.name == "postgresql"
    source = "taskflow_counts"
    if postgres:
        source = (
            "(SELECT * FROM taskflow_counts UNION ALL SELECT * FROM taskflow_count_deltas)"
            " AS counted"
        )
    rows = connection.execute(
        text(
            "SELECT name, status, sum(tasks), sum(timed), sum(total_duration)"
            f" FROM {source} GROUP BY name, status"
        )
    )
    return {
        (name, status): (int(tasks), int(timed), round(float(total), 9))
        for name, status, tasks, timed, total in rows
        if tasks != 0
    }


def recounted(connection: Connection) -> Counts:
    """Return what ``counted`` should return, counted from the task rows."""
    rows = connection.execute(
        text(
            "SELECT name, status, count(*), count(duration), coalesce(sum(duration), 0)"
            " FROM taskflow_tasks GROUP BY name, status"
        )
    )
    return {
        (name, status): (tasks, timed, round(float(total), 9))
        for name, status, tasks, timed, total in rows
    }


def pending_deltas(connection: Connection) -> int:
    return int(connection.execute(text("SELECT count(*) FROM taskflow_count_deltas")).scalar_one())


# triggers


async def test_counts_follow_direct_writes(open_store: StoreOpener, engine: Engine) -> None:
    store = await open_store()
    rows = [
        task_row("t1", "send_email", "PENDING", None),
        task_row("t2", "send_email", "SUCCESS", 1.5),
        task_row("t3", "resize_image", "RUNNING", None),
        task_row("t4", "resize_image", "FAILED", 0.25),
        task_row("t5", "send_sms", "SUCCESS", 3.0),
    ]
    writes = {
        "insert of several names": [],
        "update of status and duration over several names": [
            "UPDATE taskflow_tasks SET status = 'SUCCESS', duration = 2.0 WHERE id IN ('t1', 't3')"
        ],
        "update of duration only": ["UPDATE taskflow_tasks SET duration = 4.0 WHERE id = 't2'"],
        "update of name": ["UPDATE taskflow_tasks SET name = 'send_sms' WHERE id = 't4'"],
        "update of other columns": ["UPDATE taskflow_tasks SET attempts = 2"],
        "update of nothing": ["UPDATE taskflow_tasks SET status = 'FAILED' WHERE id = 'none'"],
        "update of a duration to null": [
            "UPDATE taskflow_tasks SET duration = NULL WHERE id = 't5'"
        ],
        "delete": ["DELETE FROM taskflow_tasks WHERE id IN ('t2', 't4')"],
    }

    for step, statements in writes.items():
        with engine.begin() as connection:
            if not statements:
                connection.execute(insert(TASK_TABLE), rows)
            for statement in statements:
                connection.execute(text(statement))
        with engine.connect() as connection:
            assert counted(connection) == recounted(connection), step

    metrics = await store.metrics()
    assert metrics.counts[TaskStatus.SUCCESS] == 3
    assert metrics.duration.count == 2
    assert metrics.duration.mean == pytest.approx(2.0)


async def test_counts_reset_duration_sum_when_empty(
    open_store: StoreOpener, engine: Engine
) -> None:
    await open_store()
    durations = [0.1, 0.2, 0.7]
    rows = [task_row(f"t{index}", "send_email", "SUCCESS", d) for index, d in enumerate(durations)]
    with engine.begin() as connection:
        connection.execute(insert(TASK_TABLE), rows)
    for row in rows:
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM taskflow_tasks WHERE id = :id"), {"id": row["id"]})

    with engine.begin() as connection:
        connection.execute(insert(TASK_TABLE), [task_row("t9", "send_email", "SUCCESS", None)])
    store = await open_store()
    metrics = await store.metrics()

    with engine.connect() as connection:
        [total] = connection.execute(
            text("SELECT total_duration FROM taskflow_counts WHERE status = 'SUCCESS'")
        ).one()
    assert total == 0.0
    assert metrics.counts[TaskStatus.SUCCESS] == 1
    assert metrics.duration.count == 0


async def test_postgres_counts_follow_upsert_id_change_and_truncate(
    open_store: StoreOpener, engine: Engine, postgres_url: str
) -> None:
    await open_store()
    with engine.begin() as connection:
        connection.execute(
            insert(TASK_TABLE),
            [
                task_row("t1", "send_email", "SUCCESS", 1.0),
                task_row("t2", "send_email", "FAILED", 2.0),
            ],
        )
    upsert = (
        "INSERT INTO taskflow_tasks (id, name, status, args, kwargs, attempts, max_attempts,"
        " created_at, requeue_on_interrupt, cancel_requested) VALUES"
        " ('t1', 'send_email', 'PENDING', '[]', '{}', 1, 1, now(), false, false),"
        " ('t3', 'resize_image', 'PENDING', '[]', '{}', 1, 1, now(), false, false)"
        " ON CONFLICT (id) DO UPDATE SET status = excluded.status, duration = NULL"
    )
    writes = {
        "insert ... on conflict do update": upsert,
        "update of ids": "UPDATE taskflow_tasks SET id = id || '-moved'",
    }

    for step, statement in writes.items():
        with engine.begin() as connection:
            connection.execute(text(statement))
        with engine.connect() as connection:
            assert counted(connection) == recounted(connection), step

    with engine.begin() as connection:
        connection.execute(text("TRUNCATE taskflow_tasks CASCADE"))
    with engine.connect() as connection:
        assert counted(connection) == {}


# migration


async def test_open_counts_tasks_of_previous_schema(
    open_store: StoreOpener, engine: Engine, make_record: RecordFactory, clock: Clock
) -> None:
    previous_version = len(MIGRATIONS) - 1
    with engine.begin() as connection:
        for migration in MIGRATIONS[:previous_version]:
            migration(connection)
        connection.execute(
            text(
                "CREATE TABLE taskflow_schema_version"
                " (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)"
            )
        )
        connection.execute(
            text("INSERT INTO taskflow_schema_version (id, version) VALUES (1, :version)"),
            {"version": previous_version},
        )
        connection.execute(
            insert(TASK_TABLE),
            [
                task_row("t1", "send_email", "SUCCESS", 1.0),
                task_row("t2", "send_email", "SUCCESS", 3.0),
                task_row("t3", "send_email", "PENDING", None),
                task_row("t4", "resize_image", "FAILED", 0.5),
            ],
        )

    store = await open_store()

    metrics = await store.metrics()
    assert metrics.by_name["send_email"].counts[TaskStatus.SUCCESS] == 2
    assert metrics.by_name["send_email"].counts[TaskStatus.PENDING] == 1
    assert metrics.by_name["resize_image"].counts[TaskStatus.FAILED] == 1
    assert metrics.duration.count == 3
    assert metrics.duration.mean == pytest.approx(4.5 / 3)
    await store.create([make_record(name="resize_image")])
    with engine.connect() as connection:
        assert counted(connection) == recounted(connection)


# PostgreSQL deltas


async def test_postgres_metrics_fold_deltas(
    open_store: StoreOpener, engine: Engine, postgres_url: str, make_record: RecordFactory
) -> None:
    store = await open_store()
    await store.create([make_record(name="send_email"), make_record(name="resize_image")])
    with engine.connect() as connection:
        before = pending_deltas(connection)

    metrics = await store.metrics()

    with engine.connect() as connection:
        after = pending_deltas(connection)
        folded = counted(connection)
    assert before == 2
    assert after == 0
    assert folded == {
        ("send_email", "PENDING"): (1, 0, 0.0),
        ("resize_image", "PENDING"): (1, 0, 0.0),
    }
    assert metrics.counts[TaskStatus.PENDING] == 2


async def test_postgres_metrics_skip_fold_while_locked(
    open_store: StoreOpener, engine: Engine, postgres_url: str, make_record: RecordFactory
) -> None:
    store = await open_store()
    await store.create([make_record(), make_record()])
    with engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:key)"), {"key": FOLD_LOCK_KEY})
        metrics = await store.metrics()
        with engine.connect() as connection:
            left = pending_deltas(connection)
        holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": FOLD_LOCK_KEY})

    assert metrics.counts[TaskStatus.PENDING] == 2
    assert left == 1


async def test_postgres_trigger_folds_every_n_statements(
    open_store: StoreOpener, engine: Engine, postgres_url: str, make_record: RecordFactory
) -> None:
    store = await open_store()
    await store.create([make_record()])
    with engine.begin() as connection:
        connection.execute(
            text("SELECT setval('taskflow_count_delta_statements', :last)"),
            {"last": FOLD_EVERY - 1},
        )

    await store.create([make_record()])

    with engine.connect() as connection:
        assert pending_deltas(connection) == 0
        assert counted(connection) == {("send_email", "PENDING"): (2, 0, 0.0)}


async def test_postgres_repeatable_read_write_skips_fold(
    open_store: StoreOpener, engine: Engine, postgres_url: str
) -> None:
    await open_store()
    with engine.begin() as connection:
        connection.execute(
            text("SELECT setval('taskflow_count_delta_statements', :last)"),
            {"last": FOLD_EVERY - 1},
        )

    with engine.connect() as connection:
        repeatable = connection.execution_options(isolation_level="REPEATABLE READ")
        with repeatable.begin():
            repeatable.execute(insert(TASK_TABLE), [task_row("t1", "send_email", "PENDING", None)])

    with engine.connect() as connection:
        assert pending_deltas(connection) == 1
        assert counted(connection) == recounted(connection)


async def test_postgres_concurrent_claims_never_conflict(
    open_store: StoreOpener,
    postgres_url: str,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = [f"task_{index}" for index in range(5)]
    stores = [await open_store(), await open_store()]
    # Names interleave in creation order, so each claim_next takes tasks of several names.
    await stores[0].create([make_record(name=name) for _ in range(30) for name in names])
    conflicts: list[str] = []
    for store in stores:
        is_transient = store._is_transient

        def record_conflict(error: DBAPIError, is_transient: Any = is_transient) -> bool:
            conflicts.append(str(getattr(error.orig, "sqlstate", None)))
            return bool(is_transient(error))

        monkeypatch.setattr(store, "_is_transient", record_conflict)

    async def work(store: SqlStore, instance_id: str) -> int:
        finished = 0
        while claimed := await store.claim_next(instance_id, clock(1), 7, list(reversed(names))):
            outcome_fields = {
                "status": TaskStatus.SUCCESS,
                "finished_at": clock(2),
                "duration": 1.0,
            }
            for task in claimed:
                await store.finish(task.id, instance_id, 1, AttemptOutcome(**outcome_fields))
            await store.metrics()
            finished += len(claimed)
        return finished

    finished = await asyncio.gather(
        work(stores[0], INSTANCE_A),
        work(stores[1], INSTANCE_B),
        work(stores[0], INSTANCE_A),
        work(stores[1], INSTANCE_B),
    )

    metrics = await stores[1].metrics()
    assert sum(finished) == 150
    assert conflicts == []
    assert metrics.counts[TaskStatus.SUCCESS] == 150
    assert metrics.counts[TaskStatus.RUNNING] == 0


# duration sample


async def test_metrics_percentiles_from_recent_sample(
    open_store: StoreOpener,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sql_queries, "DURATION_SAMPLE", 3)
    store = await open_store()
    # resize_image finished first, so none of its tasks is among the 3 most recent.
    records = [
        make_record(
            name="resize_image",
            status=TaskStatus.SUCCESS,
            finished_at=clock(seconds),
            duration=duration,
        )
        for seconds, duration in ((1, 100.0), (2, 200.0))
    ]
    records += [
        make_record(
            name="send_email",
            status=TaskStatus.SUCCESS,
            finished_at=clock(10 + seconds),
            duration=float(seconds),
        )
        for seconds in range(1, 6)
    ]
    await store.create(records)

    metrics = await store.metrics()

    assert metrics.duration.count == 7
    assert metrics.duration.mean == pytest.approx(315.0 / 7)
    assert (metrics.duration.p50, metrics.duration.p95) == (4.0, 5.0)
    email = metrics.by_name["send_email"].duration
    assert (email.count, email.mean, email.p50, email.p95) == (5, 3.0, 4.0, 5.0)
    image = metrics.by_name["resize_image"].duration
    assert (image.count, image.mean, image.p50, image.p95) == (2, 150.0, 100.0, 200.0)
