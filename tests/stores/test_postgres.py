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
from sqlalchemy.exc import DBAPIError
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

from app_taskflow.errors import (
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    TaskStateError,
)
from app_taskflow.models import AttemptOutcome, LogEntry, TaskQuery, TaskRecord, TaskStatus
from app_taskflow.stores import sql_operations, sql_queries
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_migrations import SCHEMA_VERSION
from app_taskflow.stores.sql_watch import LISTENER_NAME
from app_taskflow.stores.sql_writer import PendingWrite

psycopg = pytest.importorskip("psycopg")

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]
StoreOpener = Callable[..., Awaitable[SqlStore]]

ADMIN_URL = f"postgresql://postgres@{POSTGRES.address}/test"
INSTANCE_A = "instance-a"
INSTANCE_B = "instance-b"


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
def quick_deadlock_database(admin_connection: Any, empty_database: str) -> str:
    """Return the URL of a new empty database whose sessions check for deadlocks after 0.3 s.

    The default deadlock_timeout (1 s) equals the lock timeout of a group of writes, so
    that either could end a deadlock of a group. With 0.3 s the deadlock check ends it.
    A session checks once per lock wait, so the deadlock must form within those 0.3 s.
    """
    name = empty_database.rsplit("/", 1)[1]
    admin_connection.execute(f"ALTER DATABASE \"{name}\" SET deadlock_timeout = '300ms'")
    return empty_database


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


# groups of the writer thread


def success(clock: Clock) -> AttemptOutcome:
    return AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=clock(10), duration=0.5)


async def create_running(
    store: SqlStore, make_record: RecordFactory, clock: Clock, instance_id: str = INSTANCE_A
) -> TaskRecord:
    record = make_record()
    await store.create([record])
    await store.claim(record.id, instance_id, clock(1))
    return record


async def in_one_group(
    store: SqlStore, url: str, clock: Clock, writes: list[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Run ``writes`` in one group of the writer thread, and return their results or errors.

    Another connection holds the lease row of INSTANCE_B while a heartbeat waits for it, so
    that the writes queue behind the heartbeat and the writer thread takes them all at once.
    """
    await store.heartbeat(INSTANCE_B, clock(0), clock(60))
    writer = store._writer
    assert writer is not None
    run_group = writer._run_group
    sizes: list[int] = []

    def run_and_count(group: list[PendingWrite]) -> None:
        sizes.append(len(group))
        run_group(group)

    writer._run_group = run_and_count
    try:
        with psycopg.connect(plain_url(url)) as holder:
            holder.execute(
                "SELECT 1 FROM taskflow_leases WHERE instance_id = %s FOR UPDATE", [INSTANCE_B]
            )
            blocker = asyncio.ensure_future(store.heartbeat(INSTANCE_B, clock(0), clock(60)))
            await wait_for_lock_wait(url)
            results = asyncio.gather(*(write() for write in writes), return_exceptions=True)
            await asyncio.sleep(0.1)
            holder.rollback()
        await blocker
        gathered = await results
    finally:
        writer._run_group = run_group
    assert sizes == [1, len(writes)]
    return gathered


async def test_group_failed_write_spares_others(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    existing = make_record()
    pending = make_record()
    await store.create([existing, pending])
    running = await create_running(store, make_record, clock)
    first, duplicate, last = make_record(), make_record(id=existing.id), make_record()

    results = await in_one_group(
        store,
        database_url,
        clock,
        [
            lambda: store.create([first]),
            lambda: store.create([duplicate]),
            lambda: store.claim(pending.id, INSTANCE_A, clock(2)),
            lambda: store.finish(running.id, INSTANCE_A, 1, success(clock)),
            lambda: store.create([last]),
        ],
    )

    assert results[0] == [first.id]
    assert isinstance(results[1], StoreError)
    assert isinstance(results[2], TaskRecord)
    assert results[3] is True
    assert results[4] == [last.id]
    assert await store.get(first.id) == first
    assert await store.get(last.id) == last
    claimed = await store.get(pending.id)
    assert claimed is not None
    assert claimed.status is TaskStatus.RUNNING
    finished = await store.get(running.id)
    assert finished is not None
    assert finished.status is TaskStatus.SUCCESS


async def test_group_notifies_each_change_once(
    open_store: StoreOpener,
    database_url: str,
    watchers: list[Watcher],
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    existing, pending = make_record(), make_record()
    await store.create([existing, pending])
    running = await create_running(store, make_record, clock)
    created = make_record()
    # A write that fails after its first record went in: it is rolled back unnotified.
    lost, duplicate = make_record(), make_record(id=existing.id)
    watcher = await start_watcher(store, watchers, make_record, clock)

    results = await in_one_group(
        store,
        database_url,
        clock,
        [
            lambda: store.create([created]),
            lambda: store.create([lost, duplicate]),
            lambda: store.claim(pending.id, INSTANCE_A, clock(2)),
            lambda: store.append_logs(running.id, [LogEntry(timestamp=clock(3), message="note")]),
            lambda: store.finish(running.id, INSTANCE_A, 1, success(clock)),
        ],
    )
    await store.append_logs(existing.id, [LogEntry(timestamp=clock(4), message="end")])
    changes = await watcher.read_until(
        lambda change: change.log is not None and change.log.message == "end"
    )

    assert isinstance(results[1], StoreError)
    assert describe(changes, created.id) == ["PENDING"]
    assert describe(changes, lost.id) == []
    assert describe(changes, pending.id) == ["RUNNING"]
    assert describe(changes, running.id) == ["log note", "SUCCESS"]
    assert describe(changes, existing.id) == ["log end"]


async def test_group_write_waiting_for_lock_runs_alone(
    open_store: StoreOpener, database_url: str, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    running = await create_running(store, make_record, clock)
    record = make_record()

    with psycopg.connect(plain_url(database_url)) as holder:
        holder.execute("SELECT 1 FROM taskflow_tasks WHERE id = %s FOR UPDATE", [running.id])
        finish = asyncio.ensure_future(store.finish(running.id, INSTANCE_A, 1, success(clock)))
        await wait_for_lock_wait(database_url)
        # The finish leaves the writer thread after the group's lock timeout (1 s) and keeps
        # waiting in a worker thread, so later writes commit meanwhile.
        created = await asyncio.wait_for(store.create([record]), timeout=5)
        assert not finish.done()
        holder.rollback()
        finished = await finish

    assert created == [record.id]
    assert finished is True
    stored = await store.get(running.id)
    assert stored is not None
    assert stored.status is TaskStatus.SUCCESS


async def test_group_deadlock_runs_again(
    quick_deadlock_database: str,
    open_store: StoreOpener,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = await open_store(quick_deadlock_database)
    commit_group = store._commit_group
    errors: list[str | None] = []

    def commit_and_note_error(group: list[PendingWrite], isolated: bool) -> bool:
        try:
            return commit_group(group, isolated)
        except DBAPIError as error:
            errors.append(getattr(error.orig, "sqlstate", None))
            raise

    monkeypatch.setattr(store, "_commit_group", commit_and_note_error)
    logged = await create_running(store, make_record, clock)
    finished = await create_running(store, make_record, clock)
    loop = asyncio.get_running_loop()
    entry = LogEntry(timestamp=clock(2), message="sent")
    group = [
        PendingWrite(
            "append_logs", sql_operations.append_logs, (logged.id, [entry]), loop.create_future()
        ),
        PendingWrite(
            "finish",
            sql_operations.finish,
            (finished.id, INSTANCE_A, 1, success(clock)),
            loop.create_future(),
        ),
    ]

    # The group locks the first task (key share), then waits for the second, which the
    # other transaction holds and which then waits for the first: a deadlock, in which
    # PostgreSQL rolls back the group's transaction, the first to check.
    with psycopg.connect(plain_url(quick_deadlock_database)) as other:
        other.execute("SET deadlock_timeout = '10s'")
        other.execute("SELECT 1 FROM taskflow_tasks WHERE id = %s FOR UPDATE", [finished.id])
        run = asyncio.ensure_future(asyncio.to_thread(store._run_group, group))
        await wait_for_lock_wait(quick_deadlock_database)
        query = "SELECT 1 FROM taskflow_tasks WHERE id = %s FOR UPDATE"
        await asyncio.to_thread(other.execute, query, [logged.id])
        other.commit()
        await run

    assert errors == ["40P01"]
    assert [pending.error for pending in group] == [None, None]
    assert group[1].result is True
    stored_log = await store.get(logged.id)
    assert stored_log is not None
    assert [log.message for log in stored_log.logs] == ["sent"]
    stored_finish = await store.get(finished.id)
    assert stored_finish is not None
    assert stored_finish.status is TaskStatus.SUCCESS


async def test_groups_two_stores_same_tasks(
    quick_deadlock_database: str, open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    first = await open_store(quick_deadlock_database)
    second = await open_store(quick_deadlock_database)
    records = [make_record() for _ in range(100)]
    await first.create(records)
    ids = [record.id for record in records]
    entry = LogEntry(timestamp=clock(2), message="working")

    claims = await asyncio.gather(
        *(first.claim(task_id, INSTANCE_A, clock(1)) for task_id in ids),
        *(second.claim(task_id, INSTANCE_B, clock(1)) for task_id in reversed(ids)),
        return_exceptions=True,
    )
    claimed_by_first = claims[: len(ids)]
    claimed_by_second = list(reversed(claims[len(ids) :]))
    owners: dict[str, str] = {}
    for task_id, by_first, by_second in zip(ids, claimed_by_first, claimed_by_second, strict=True):
        assert not isinstance(by_first, BaseException)
        assert not isinstance(by_second, BaseException)
        assert (by_first is None) != (by_second is None)
        owners[task_id] = INSTANCE_A if by_first is not None else INSTANCE_B

    # Both stores write logs and finish every task, in opposite orders, so that their
    # groups lock the same rows in different orders.
    finishes = await asyncio.gather(
        *(
            write
            for task_id in ids
            for write in (
                first.append_logs(task_id, [entry]),
                first.finish(task_id, INSTANCE_A, 1, success(clock)),
            )
        ),
        *(
            write
            for task_id in reversed(ids)
            for write in (
                second.append_logs(task_id, [entry]),
                second.finish(task_id, INSTANCE_B, 1, success(clock)),
            )
        ),
        return_exceptions=True,
    )

    assert not [result for result in finishes if isinstance(result, BaseException)]
    finished_by_first = finishes[1 : 2 * len(ids) : 2]
    finished_by_second = list(reversed(finishes[2 * len(ids) + 1 :: 2]))
    for task_id, by_first, by_second in zip(
        ids, finished_by_first, finished_by_second, strict=True
    ):
        assert by_first is (owners[task_id] == INSTANCE_A)
        assert by_second is (owners[task_id] == INSTANCE_B)
        task = await first.get(task_id)
        assert task is not None
        assert task.status is TaskStatus.SUCCESS
        assert task.attempts == 1
        assert len(task.logs) == 2


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
