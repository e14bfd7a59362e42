"""Tests of SqlStore on PostgreSQL beyond the contract: migrations, locks, plans, NOTIFY.

They use the shared server (see ``tests/servers.py``): a missing server skips them, or
fails them when ``CI`` is set. Tests that need an empty database create their own.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from servers import POSTGRES, require_server
from sqlalchemy import create_engine
from test_sql import (
    Watcher,
    check_tags,
    create_version_1_schema,
    describe,
    executed_statements,
    finished_records,
    insert_version_1_task,
    list_statement,
    metrics_of,
    page_queries,
    rounded_means,
    schema_of,
    schema_of_models,
)

from app_taskflow.errors import SchemaVersionError, StoreUnavailableError, TaskStateError
from app_taskflow.models import AttemptOutcome, LogEntry, TaskQuery, TaskRecord, TaskStatus
from app_taskflow.stores import sql_queries
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_migrations import SCHEMA_VERSION
from app_taskflow.stores.sql_watch import LISTENER_NAME

psycopg = pytest.importorskip("psycopg")

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]
StoreOpener = Callable[..., Awaitable[SqlStore]]

ADMIN_URL = f"postgresql://postgres@{POSTGRES.address}/test"
INSTANCE_A = "instance-a"


@pytest.fixture(scope="session")
def admin_connection() -> Iterator[Any]:
    """Yield an autocommit connection to the server's ``test`` database."""
    connections: list[Any] = []

    def connect() -> None:
        connections.append(psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3))

    require_server(POSTGRES, connect, (psycopg.OperationalError,))
    with connections[0] as connection:
        yield connection


@pytest.fixture
def empty_database(admin_connection: Any) -> Iterator[str]:
    """Yield the URL of a new empty database, dropped after the test."""
    name = f"taskflow_sql_{secrets.token_hex(6)}"
    admin_connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{POSTGRES.address}/{name}"
    finally:
        admin_connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_database: Any) -> str:
    """Return the URL of the session's test database, emptied of tasks."""
    postgres_database.empty_tables()
    return postgres_database.url


@pytest.fixture
async def open_store(database_url: str) -> AsyncIterator[StoreOpener]:
    """Return a function that opens a SqlStore (by default on ``database_url``).

    The stores are closed after the test.
    """
    stores: list[SqlStore] = []

    async def open_one(url: str | None = None, **options: Any) -> SqlStore:
        store = SqlStore(url or database_url, **options)
        await store.open()
        stores.append(store)
        return store

    yield open_one
    for store in stores:
        await store.close()


@pytest.fixture
async def watchers() -> AsyncIterator[list[Watcher]]:
    """Yield a list to which a test adds its watchers; they are closed after the test."""
    opened: list[Watcher] = []
    yield opened
    for watcher in opened:
        await watcher.aclose()


def plain_url(url: str) -> str:
    """Return the libpq form of a SQLAlchemy PostgreSQL URL."""
    return url.replace("postgresql+psycopg://", "postgresql://")


async def wait_for_lock_wait(url: str) -> None:
    """Wait until a session of the database at ``url`` waits for a lock (at most 10 s)."""
    with psycopg.connect(plain_url(url), autocommit=True) as connection:
        for _ in range(200):
            [waiting] = connection.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
            if waiting:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("No session waited for a lock within 10 s.")


# schema and migrations


async def test_open_concurrent_starts_migrate_once(empty_database: str) -> None:
    stores = [SqlStore(empty_database) for _ in range(4)]
    try:
        await asyncio.gather(*(store.open() for store in stores))
    finally:
        for store in stores:
            await store.close()

    with psycopg.connect(plain_url(empty_database)) as connection:
        versions = connection.execute("SELECT version FROM taskflow_schema_version").fetchall()
    assert versions == [(SCHEMA_VERSION,)]


async def test_open_migrates_version_1(
    empty_database: str, open_store: StoreOpener, clock: Clock
) -> None:
    engine = create_engine(empty_database)
    with engine.begin() as connection:
        create_version_1_schema(connection)
        insert_version_1_task(connection, "task-1", clock(0))
    engine.dispose()

    store = await open_store(empty_database)

    task = await store.get("task-1")
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert [entry.message for entry in task.logs] == ["connecting", "refused"]
    page = await store.list(TaskQuery(statuses=[TaskStatus.FAILED], search="REFUSED"))
    assert [item.id for item in page.items] == ["task-1"]
    with psycopg.connect(plain_url(empty_database)) as connection:
        [log_id_type] = connection.execute(
            "SELECT data_type FROM information_schema.columns"
            " WHERE table_name = 'taskflow_logs' AND column_name = 'id'"
        ).fetchone()
        [sequence_type] = connection.execute(
            "SELECT data_type FROM information_schema.sequences"
            " WHERE sequence_name = 'taskflow_logs_id_seq'"
        ).fetchone()
    assert log_id_type == "bigint"
    assert sequence_type == "bigint"


async def test_migrated_schema_matches_models(empty_database: str, open_store: StoreOpener) -> None:
    engine = create_engine(empty_database)
    with engine.begin() as connection:
        create_version_1_schema(connection)
    await open_store(empty_database)

    with engine.connect() as connection:
        migrated = schema_of(connection)
    engine.dispose()

    assert migrated == schema_of_models("postgresql")


async def test_open_rejects_newer_schema(empty_database: str, open_store: StoreOpener) -> None:
    store = await open_store(empty_database)
    await store.close()
    with psycopg.connect(plain_url(empty_database), autocommit=True) as connection:
        connection.execute("UPDATE taskflow_schema_version SET version = %s", [SCHEMA_VERSION + 1])

    message = rf"schema version {SCHEMA_VERSION + 1}.*up to {SCHEMA_VERSION}\. Upgrade app-taskflow"
    with pytest.raises(SchemaVersionError, match=message):
        await open_store(empty_database)


# errors and locks


async def test_unreachable_server_raises_unavailable() -> None:
    # Port 1 on the loopback interface refuses connections.
    store = SqlStore("postgresql+psycopg://postgres@127.0.0.1:1/tasks")

    with pytest.raises(StoreUnavailableError, match=r"could not be reached during open"):
        await store.open()


async def test_row_locked_past_busy_timeout_raises(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store(busy_timeout=0.2)
    [task_id] = await store.create([make_record()])

    with psycopg.connect(plain_url(database_url)) as holder:
        holder.execute("SELECT id FROM taskflow_tasks WHERE id = %s FOR UPDATE", [task_id])
        with pytest.raises(
            StoreUnavailableError, match=r"Timed out after 0\.2 s waiting for a lock .* cancel"
        ):
            await store.cancel(task_id, clock(1))
        holder.rollback()

    cancelled = await store.cancel(task_id, clock(2))
    assert cancelled.status is TaskStatus.CANCELLED


async def test_retry_key_taken_meanwhile_raises(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    first, second = make_record(idempotency_key="order-42"), make_record(idempotency_key="order-42")
    for record in (first, second):
        await store.create([record])
        await store.cancel(record.id, clock(1))
    # CANCELLED tasks cannot be retried, so they are made FAILED by hand.
    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        connection.execute("UPDATE taskflow_tasks SET status = 'FAILED'")

    # Another transaction gives the key back to the first task and commits only after the
    # retry of the second task found the key free.
    with psycopg.connect(plain_url(database_url)) as other:
        other.execute("UPDATE taskflow_tasks SET status = 'PENDING' WHERE id = %s", [first.id])
        retry = asyncio.ensure_future(store.retry(second.id, clock(2), extra_attempts=1))
        await wait_for_lock_wait(database_url)
        other.commit()
        with pytest.raises(TaskStateError, match=r"another task took its idempotency key"):
            await retry

    task = await store.get(second.id)
    assert task is not None
    assert task.status is TaskStatus.FAILED


# several instances


async def test_claim_next_concurrent_no_duplicates(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    stores = [await open_store() for _ in range(4)]
    records = [make_record() for _ in range(200)]
    await stores[0].create(records)

    async def claim_all(store: SqlStore, instance_id: str) -> list[str]:
        claimed: list[str] = []
        while batch := await store.claim_next(instance_id, clock(1), 5, ["send_email"]):
            claimed.extend(task.id for task in batch)
        return claimed

    claimed_per_store = await asyncio.gather(
        *(claim_all(store, f"instance-{number}") for number, store in enumerate(stores))
    )

    claimed_ids = [task_id for claimed in claimed_per_store for task_id in claimed]
    assert len(claimed_ids) == len(records)
    assert set(claimed_ids) == {record.id for record in records}
    assert all(len(claimed) > 0 for claimed in claimed_per_store)


async def test_recover_expired_concurrent_takes_each_once(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    stores = [await open_store() for _ in range(4)]
    records = [make_record(owner="instance-gone") for _ in range(200)]
    await stores[0].create(records)
    await stores[0].heartbeat("instance-gone", clock(0), expires_at=clock(10))

    reports = await asyncio.gather(*(store.recover_expired(clock(20)) for store in stores))

    released = [task_id for report in reports for task_id in report.released]
    assert len(released) == len(records)
    assert set(released) == {record.id for record in records}


async def test_create_concurrent_same_key_one_task(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    stores = [await open_store() for _ in range(4)]
    keys = [f"order-{number}" for number in range(20)]

    async def create_all(store: SqlStore) -> list[str]:
        ids: list[str] = []
        for number, key in enumerate(keys):
            ids.extend(await store.create([make_record(args=[number], idempotency_key=key)]))
        return ids

    ids_per_store = await asyncio.gather(*(create_all(store) for store in stores))

    for ids in ids_per_store[1:]:
        assert ids == ids_per_store[0]
    page = await stores[0].list(TaskQuery(limit=100))
    assert len(page.items) == len(keys)


# list, metrics and prune


async def test_list_plans_use_indexes(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory
) -> None:
    store = await open_store()
    # Few tasks match the filters, so that an index on the filtered column is the cheapest.
    names = ["resize_image"] * 38 + ["send_email"] * 2
    await store.create([make_record(name=name) for name in names])
    first_page = await store.list(TaskQuery(limit=5))
    assert first_page.next_cursor is not None

    plans = {}
    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        connection.execute("ANALYZE")
        # Tiny tables make any plan cheap. With sequential scans and sorts priced out, a plan
        # without a Sort node shows that an index returns the rows in page order.
        connection.execute("SET enable_seqscan = off")
        connection.execute("SET enable_sort = off")
        for name, query in page_queries(first_page.next_cursor).items():
            statement, parameters = await list_statement(store, query)
            rows = connection.execute(f"EXPLAIN {statement}", parameters).fetchall()
            plans[name] = "\n".join(row[0] for row in rows)

    expected_index = {
        "first_page": "ix_taskflow_tasks_created_at_id",
        "oldest_first": "ix_taskflow_tasks_created_at_id",
        "status": "ix_taskflow_tasks_status_created_at_id",
        "name": "ix_taskflow_tasks_name_created_at_id",
        "cursor": "ix_taskflow_tasks_created_at_id",
        "status_cursor": "ix_taskflow_tasks_status_created_at_id",
        "statuses": "ix_taskflow_tasks_status_created_at_id",
    }
    for name, index in expected_index.items():
        assert f"using {index} on taskflow_tasks" in plans[name], plans[name]
        assert "Sort  (" not in plans[name], plans[name]
        assert "Seq Scan" not in plans[name], plans[name]
    assert "Merge Append" in plans["statuses"]


async def test_metrics_plans_use_indexes(
    open_store: StoreOpener,
    database_url: str,
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

    plans = {}
    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        connection.execute("ANALYZE")
        connection.execute("SET enable_seqscan = off")
        connection.execute("SET enable_sort = off")
        for statement, parameters in statements:
            rows = connection.execute(f"EXPLAIN {statement}", parameters).fetchall()
            plans[statement, tuple(parameters.values())] = "\n".join(row[0] for row in rows)
    [sample] = [plan for (statement, _), plan in plans.items() if "finished_at DESC" in statement]
    # PostgreSQL may read a frequent name along the created_at index, which also stops early.
    [of_name] = [plan for (_, parameters), plan in plans.items() if "send_sms" in parameters]
    assert "using ix_taskflow_tasks_finished_at_id on taskflow_tasks" in sample, sample
    assert "using ix_taskflow_tasks_name_created_at_id on taskflow_tasks" in of_name, of_name
    # Counts come from the counters: only reads of a sample touch the tasks table.
    readers = [key for key, plan in plans.items() if "on taskflow_tasks" in plan]
    assert all("LIMIT" in statement for statement, _ in readers), readers


async def test_list_search_folds_non_ascii_case(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    with psycopg.connect(plain_url(database_url)) as connection:
        [folded] = connection.execute("SELECT lower('É')").fetchone()
    if folded != "é":
        pytest.skip("The database's locale does not fold the case of non-ASCII letters.")
    store = await open_store()
    args_id, log_id = await store.create([make_record(args=["Émile"]), make_record()])
    await store.append_logs(log_id, [LogEntry(timestamp=clock(1), message="Ärger mit SMTP")])

    args_page = await store.list(TaskQuery(search="éMILE"))
    log_page = await store.list(TaskQuery(search="ärger"))

    assert [item.id for item in args_page.items] == [args_id]
    assert [item.id for item in log_page.items] == [log_id]


async def test_tags_and_origin_stored(open_store: StoreOpener, make_record: RecordFactory) -> None:
    store = await open_store()

    await check_tags(store, make_record)


async def test_metrics_match_python_reference(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    records = finished_records(make_record, clock, seed=7)
    await store.create(records)

    metrics = await store.metrics()

    assert rounded_means(metrics) == rounded_means(metrics_of(records))


async def test_prune_plan_uses_finished_at_index(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    await store.create(finished_records(make_record, clock, seed=1))
    await store.create([make_record() for _ in range(3)])

    with executed_statements() as statements:
        deleted = await store.prune(clock(1000), max_age=60.0, max_count=10)

    assert deleted == 62
    page = await store.list(TaskQuery())
    assert [item.status for item in page.items] == [TaskStatus.PENDING] * 3
    # The SELECTs that pick tasks by age and by count; a third one counts them.
    selects = [item for item in statements if "ORDER BY taskflow_tasks.finished_at" in item[0]]
    assert len(selects) == 2
    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        connection.execute("SET enable_seqscan = off")
        connection.execute("SET enable_sort = off")
        for statement, parameters in selects:
            rows = connection.execute(f"EXPLAIN {statement}", parameters).fetchall()
            plan = "\n".join(row[0] for row in rows)
            assert "using ix_taskflow_tasks_finished_at_id" in plan, plan
            assert "Sort  (" not in plan, plan


# watch


async def start_watcher(
    store: SqlStore, watchers: list[Watcher], make_record: RecordFactory, clock: Clock
) -> Watcher:
    """Return a watcher of ``store`` that is ready: it received a probe change."""
    [probe_id] = await store.create([make_record(name="probe")])
    watcher = Watcher(store)
    watchers.append(watcher)
    await watcher.start(store, probe_id, clock)
    return watcher


async def test_watch_other_store_same_database(
    open_store: StoreOpener, watchers: list[Watcher], make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    other = await open_store()
    watcher = await start_watcher(store, watchers, make_record, clock)

    [task_id] = await other.create([make_record()])
    await other.claim(task_id, INSTANCE_A, clock(1))
    await other.append_logs(task_id, [LogEntry(timestamp=clock(2), message="sent", attempt=1)])
    outcome = AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=clock(3), duration=2.0)
    await other.finish(task_id, INSTANCE_A, 1, outcome)
    changes = await watcher.read_until(
        lambda change: change.summary is not None and change.summary.status is TaskStatus.SUCCESS
    )

    assert describe(changes, task_id) == ["PENDING", "RUNNING", "log sent", "SUCCESS"]


async def test_watch_large_payloads_arrive_whole(
    open_store: StoreOpener, watchers: list[Watcher], make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    watcher = await start_watcher(store, watchers, make_record, clock)
    record = make_record(args=["x" * 9000], kwargs={"note": "y" * 9000})
    message = "z" * 9000

    await store.create([record])
    await store.append_logs(record.id, [LogEntry(timestamp=clock(1), message=message)])
    changes = await watcher.read_until(lambda change: change.log is not None)

    assert [change.summary for change in changes if change.summary is not None] == [
        record.summary()
    ]
    assert changes[-1].log == LogEntry(timestamp=clock(1), message=message)


async def test_watch_change_by_other_client(
    open_store: StoreOpener,
    database_url: str,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    [task_id] = await store.create([make_record()])
    await store.claim(task_id, INSTANCE_A, clock(1))
    watcher = await start_watcher(store, watchers, make_record, clock)

    # A client in another time zone: the change must still carry UTC times.
    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        connection.execute("SET TimeZone = 'Asia/Tokyo'")
        connection.execute(
            "UPDATE taskflow_tasks SET cancel_requested = true WHERE id = %s", [task_id]
        )
    changes = await watcher.read_until(lambda change: change.task_id == task_id)

    summary = changes[-1].summary
    assert summary is not None
    assert summary.cancel_requested
    assert summary.started_at == clock(1)
    assert summary.started_at.tzinfo == UTC


async def test_watch_reconnects_and_resyncs(
    open_store: StoreOpener,
    database_url: str,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    watcher = await start_watcher(store, watchers, make_record, clock)

    with psycopg.connect(plain_url(database_url), autocommit=True) as connection:
        [terminated] = connection.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            [LISTENER_NAME],
        ).fetchone()
    resync = await watcher.read(timeout=10.0)
    [task_id] = await store.create([make_record()])
    changes = await watcher.read_until(lambda change: change.task_id == task_id)

    assert terminated == 1
    assert resync.resync
    assert describe(changes, task_id) == ["PENDING"]
