"""Tests of the batch forms of claim and finish, and of the SQLite groups that run them.

Each batch form is checked against its single form: the same calls, run on two copies of
one database, must return the same results, leave the same rows and report the same
changes to the journal.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlmodel import Session
from test_sql import INSTANCE_A, database_url, executed_statements, write_lock_held

from app_taskflow.errors import StoreError
from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus
from app_taskflow.stores import sql_batches
from app_taskflow.stores.sql import SqlStore
from app_taskflow.stores.sql_batches import claim_many, finish_many
from app_taskflow.stores.sql_operations import claim, finish
from app_taskflow.stores.sql_watch import begin_write_changes

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]

INSTANCE_B = "instance-b"
MISSING_ID = "no-such-task"
CLAIM_PREFIX = "UPDATE taskflow_tasks SET status=?, attempts=(taskflow_tasks.attempts + ?)"
"""The start of the UPDATE that claims, which a single claim runs with RETURNING."""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    opened = SqlStore(database_url(tmp_path / "tasks.db"))
    await opened.open()
    yield opened
    await opened.close()


def success(clock: Clock) -> AttemptOutcome:
    return AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=clock(10), duration=0.5)


def retry_at(clock: Clock, seconds: float) -> AttemptOutcome:
    return AttemptOutcome(
        status=TaskStatus.PENDING,
        finished_at=clock(10),
        duration=0.5,
        scheduled_at=clock(seconds),
        error_type="builtins.ValueError",
        error_message="try again",
        traceback="Traceback (most recent call last): ...",
    )


def failure(clock: Clock) -> AttemptOutcome:
    return AttemptOutcome(
        status=TaskStatus.FAILED,
        finished_at=clock(10),
        duration=0.5,
        error_type="builtins.KeyError",
        error_message="'user'",
        traceback="Traceback (most recent call last): ...",
    )


async def create_running(
    store: SqlStore, make_record: RecordFactory, clock: Clock, instance_id: str, **fields: Any
) -> TaskRecord:
    """Create a task and claim it for ``instance_id``; return the claimed record."""
    record = make_record(**fields)
    await store.create([record])
    claimed = await store.claim(record.id, instance_id, clock(0))
    assert claimed is not None
    return claimed


@dataclass
class WriteRun:
    """What a list of calls returned, reported to the journal and left in the tables."""

    results: list[Any]
    journal: list[dict[str, Any]]
    tables: dict[str, list[tuple[Any, ...]]]


def run_calls(
    path: Path, run: Callable[[Session], tuple[list[Any], list[dict[str, Any]]]]
) -> WriteRun:
    """Run ``run`` in one committed transaction on the database at ``path``."""
    engine = create_engine(database_url(path))
    try:
        with Session(engine) as session, session.begin():
            results, journal = run(session)
    finally:
        engine.dispose()
    connection = sqlite3.connect(path)
    try:
        tables = {
            table: connection.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("taskflow_tasks", "taskflow_attempts")
        }
    finally:
        connection.close()
    comparable = [
        result.model_dump_json() if isinstance(result, TaskRecord) else result for result in results
    ]
    return WriteRun(comparable, journal, tables)


def one_by_one(
    work: Callable[..., Any], calls: Sequence[tuple[Any, ...]]
) -> Callable[[Session], tuple[list[Any], list[dict[str, Any]]]]:
    """Return a run that makes the calls one at a time, each with its own journal changes."""

    def run(session: Session) -> tuple[list[Any], list[dict[str, Any]]]:
        results, journal = [], []
        for call in calls:
            changes = begin_write_changes(session, journals=True)
            results.append(work(session, *call))
            journal.extend(changes.journal_entries())
        return results, journal

    return run


def batched(
    batch_form: Callable[..., list[Any]], calls: Sequence[tuple[Any, ...]]
) -> Callable[[Session], tuple[list[Any], list[dict[str, Any]]]]:
    """Return a run that makes the calls with one call of ``batch_form``."""

    def run(session: Session) -> tuple[list[Any], list[dict[str, Any]]]:
        changes = begin_write_changes(session, journals=True)
        results = batch_form(session, calls)
        return results, changes.journal_entries()

    return run


def compare_forms(
    path: Path,
    single_form: Callable[..., Any],
    batch_form: Callable[..., list[Any]],
    calls: Sequence[tuple[Any, ...]],
) -> tuple[WriteRun, WriteRun]:
    """Run ``calls`` one by one on a copy of the database and as a batch on another."""
    single_path = path.with_name("single.db")
    batch_path = path.with_name("batch.db")
    shutil.copyfile(path, single_path)
    shutil.copyfile(path, batch_path)
    single = run_calls(single_path, one_by_one(single_form, calls))
    batch = run_calls(batch_path, batched(batch_form, calls))
    return single, batch


def journal_statuses(path: Path) -> list[tuple[str, str]]:
    """Return the task id and status of each task entry of the change journal, in order."""
    connection = sqlite3.connect(path)
    try:
        rows = connection.execute(
            "SELECT task_id, summary FROM taskflow_changes WHERE summary IS NOT NULL ORDER BY id"
        ).fetchall()
    finally:
        connection.close()
    return [(task_id, json.loads(summary)["status"]) for task_id, summary in rows]


async def in_one_group(
    store: SqlStore, path: Path, clock: Clock, writes: Sequence[Callable[[], Awaitable[Any]]]
) -> list[Any]:
    """Run ``writes`` in one group of the writer thread; return their results or errors.

    Another connection holds the write lock while a first write waits for it, so that the
    writes queue behind it and the writer thread takes them all at once.
    """
    with write_lock_held(path, seconds=0.3):
        blocker = asyncio.create_task(store.heartbeat(INSTANCE_B, clock(0), clock(60)))
        await asyncio.sleep(0.1)
        results = await asyncio.gather(*(write() for write in writes), return_exceptions=True)
        await blocker
    return results


# claim_many


async def test_claim_many_matches_single_claims(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    pending = make_record()
    scheduled_later = make_record(scheduled_at=clock(60))
    scheduled_earlier = make_record(scheduled_at=clock(-60))
    owned_by_a = make_record(owner=INSTANCE_A)
    owned_by_b = make_record(owner=INSTANCE_B)
    retried = make_record(max_attempts=3)
    await store.create([pending, scheduled_later, scheduled_earlier, owned_by_a, owned_by_b])
    await store.create([retried])
    await store.claim(retried.id, INSTANCE_A, clock(0))
    await store.finish(retried.id, INSTANCE_A, 1, retry_at(clock, 0))
    running = await create_running(store, make_record, clock, INSTANCE_B)
    await store.close()
    now = clock(1)
    east_of_utc = timezone(timedelta(hours=2))
    calls = [
        (pending.id, INSTANCE_A, now),
        (pending.id, INSTANCE_A, now),
        (scheduled_later.id, INSTANCE_A, now),
        (scheduled_earlier.id, INSTANCE_A, now.astimezone(east_of_utc)),
        (owned_by_a.id, INSTANCE_A, now),
        (owned_by_b.id, INSTANCE_A, now),
        (running.id, INSTANCE_A, now),
        (retried.id, INSTANCE_A, now),
        (MISSING_ID, INSTANCE_A, now),
    ]

    single, batch = compare_forms(tmp_path / "tasks.db", claim, claim_many, calls)

    claimed = [result is not None for result in batch.results]
    assert claimed == [True, False, False, True, True, False, False, True, False]
    assert batch.results == single.results
    assert batch.tables == single.tables
    assert batch.journal == single.journal


async def test_claim_many_returns_attempt_history(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    retried = make_record(max_attempts=3)
    await store.create([retried])
    await store.claim(retried.id, INSTANCE_A, clock(0))
    await store.finish(retried.id, INSTANCE_A, 1, retry_at(clock, 0))
    await store.close()

    single, batch = compare_forms(
        tmp_path / "tasks.db", claim, claim_many, [(retried.id, INSTANCE_A, clock(1))]
    )

    record = TaskRecord.model_validate_json(batch.results[0])
    assert [attempt.number for attempt in record.attempt_history] == [1, 2]
    assert record.attempt_history[0].status is TaskStatus.FAILED
    assert batch.results == single.results


# finish_many


async def test_finish_many_matches_single_finishes(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    succeeds = await create_running(store, make_record, clock, INSTANCE_A)
    stale_attempt = await create_running(store, make_record, clock, INSTANCE_A)
    stale_owner = await create_running(store, make_record, clock, INSTANCE_B)
    retries = await create_running(store, make_record, clock, INSTANCE_A, max_attempts=3)
    fails = await create_running(store, make_record, clock, INSTANCE_A)
    cancelled = await create_running(store, make_record, clock, INSTANCE_A, max_attempts=3)
    await store.cancel(cancelled.id, clock(2))
    finished = await create_running(store, make_record, clock, INSTANCE_A)
    await store.finish(finished.id, INSTANCE_A, 1, success(clock))
    await store.close()
    calls = [
        (succeeds.id, INSTANCE_A, 1, success(clock)),
        (stale_attempt.id, INSTANCE_A, 2, success(clock)),
        (stale_owner.id, INSTANCE_A, 1, success(clock)),
        (succeeds.id, INSTANCE_A, 1, failure(clock)),
        (retries.id, INSTANCE_A, 1, retry_at(clock, 30)),
        (fails.id, INSTANCE_A, 1, failure(clock)),
        (cancelled.id, INSTANCE_A, 1, retry_at(clock, 30)),
        (finished.id, INSTANCE_A, 1, failure(clock)),
        (MISSING_ID, INSTANCE_A, 1, success(clock)),
    ]

    single, batch = compare_forms(tmp_path / "tasks.db", finish, finish_many, calls)

    assert batch.results == [True, False, False, False, True, True, True, False, False]
    assert batch.results == single.results
    assert batch.tables == single.tables
    assert batch.journal == single.journal


async def test_finish_many_ends_cancel_requested_retry_as_cancelled(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    record = await create_running(store, make_record, clock, INSTANCE_A, max_attempts=3)
    await store.cancel(record.id, clock(2))
    await store.close()

    _, batch = compare_forms(
        tmp_path / "tasks.db",
        finish,
        finish_many,
        [(record.id, INSTANCE_A, 1, retry_at(clock, 30))],
    )

    [status] = [row[2] for row in batch.tables["taskflow_tasks"] if row[0] == record.id]
    assert status == TaskStatus.CANCELLED.value


# groups of the writer thread


async def test_group_claims_run_as_one_statement(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)
    calls = [record.id for record in records] + [records[0].id, MISSING_ID]

    with executed_statements() as statements:
        results = await in_one_group(
            store,
            tmp_path / "tasks.db",
            clock,
            [
                lambda task_id=task_id: store.claim(task_id, INSTANCE_A, clock(1))
                for task_id in calls
            ],
        )

    claim_statements = [
        parameters
        for sql, parameters in statements
        if sql.startswith(CLAIM_PREFIX) and "RETURNING" not in sql
    ]
    assert [len(parameters) for parameters in claim_statements] == [len(calls)]
    assert [result is not None for result in results] == [True] * 5 + [False, False]
    assert all(result.status is TaskStatus.RUNNING for result in results[:5])


async def test_group_stale_finish_returns_false(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    fresh = [await create_running(store, make_record, clock, INSTANCE_A) for _ in range(3)]
    stale = await create_running(store, make_record, clock, INSTANCE_B)

    results = await in_one_group(
        store,
        tmp_path / "tasks.db",
        clock,
        [
            *(
                lambda task_id=record.id: store.finish(task_id, INSTANCE_A, 1, success(clock))
                for record in fresh
            ),
            lambda: store.finish(stale.id, INSTANCE_A, 1, success(clock)),
        ],
    )

    assert results == [True, True, True, False]
    for record in fresh:
        stored = await store.get(record.id)
        assert stored is not None
        assert stored.status is TaskStatus.SUCCESS
        assert stored.attempt_history[-1].status is TaskStatus.SUCCESS
    stale_stored = await store.get(stale.id)
    assert stale_stored is not None
    assert stale_stored.status is TaskStatus.RUNNING


async def test_group_failed_write_spares_batches(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    pending = [make_record() for _ in range(2)]
    await store.create(pending)
    running = [await create_running(store, make_record, clock, INSTANCE_A) for _ in range(2)]
    broken = await create_running(store, make_record, clock, INSTANCE_A)
    # The store rejects naive datetimes, so this finish fails as it binds its values.
    naive = AttemptOutcome(
        status=TaskStatus.SUCCESS, finished_at=clock(10).replace(tzinfo=None), duration=0.5
    )

    results = await in_one_group(
        store,
        tmp_path / "tasks.db",
        clock,
        [
            lambda: store.claim(pending[0].id, INSTANCE_A, clock(1)),
            lambda: store.finish(running[0].id, INSTANCE_A, 1, success(clock)),
            lambda: store.finish(broken.id, INSTANCE_A, 1, naive),
            lambda: store.claim(pending[1].id, INSTANCE_A, clock(1)),
            lambda: store.finish(running[1].id, INSTANCE_A, 1, success(clock)),
        ],
    )

    assert isinstance(results[0], TaskRecord)
    assert results[1] is True
    assert isinstance(results[2], StoreError)
    assert isinstance(results[3], TaskRecord)
    assert results[4] is True
    broken_stored = await store.get(broken.id)
    assert broken_stored is not None
    assert broken_stored.status is TaskStatus.RUNNING


async def test_group_journals_every_change(
    store: SqlStore, tmp_path: Path, make_record: RecordFactory, clock: Clock
) -> None:
    pending = [make_record() for _ in range(3)]
    await store.create(pending)
    running = [await create_running(store, make_record, clock, INSTANCE_A) for _ in range(3)]
    stale = await create_running(store, make_record, clock, INSTANCE_B)
    path = tmp_path / "tasks.db"
    journaled_before = len(journal_statuses(path))

    await in_one_group(
        store,
        path,
        clock,
        [
            *(
                lambda task_id=record.id: store.claim(task_id, INSTANCE_A, clock(1))
                for record in pending
            ),
            *(
                lambda task_id=record.id: store.finish(task_id, INSTANCE_A, 1, success(clock))
                for record in running
            ),
            lambda: store.finish(stale.id, INSTANCE_A, 1, success(clock)),
        ],
    )

    journaled = journal_statuses(path)[journaled_before:]
    expected = {(record.id, "RUNNING") for record in pending}
    expected |= {(record.id, "SUCCESS") for record in running}
    assert sorted(journaled) == sorted(expected)


async def test_group_batch_check_failure_runs_writes_alone(
    store: SqlStore,
    tmp_path: Path,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    claimable = make_record()
    scheduled_later = make_record(scheduled_at=clock(60))
    await store.create([claimable, scheduled_later])
    # A wrong prediction makes the UPDATE's row count disagree with the rows read.
    monkeypatch.setattr(sql_batches, "_claimable", lambda *arguments: True)

    with executed_statements() as statements:
        results = await in_one_group(
            store,
            tmp_path / "tasks.db",
            clock,
            [
                lambda: store.claim(claimable.id, INSTANCE_A, clock(1)),
                lambda: store.claim(scheduled_later.id, INSTANCE_A, clock(1)),
            ],
        )

    assert isinstance(results[0], TaskRecord)
    assert results[1] is None
    assert any(sql.startswith("SAVEPOINT") for sql, _ in statements)
