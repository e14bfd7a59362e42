"""SqlStore: tasks kept in a SQL database through SQLModel, with SQLite as the default."""

from __future__ import annotations

import builtins
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar, TypeVarTuple

import anyio
import anyio.to_thread
from loguru import logger
from sqlalchemy import Connection, Engine, StaticPool, create_engine, delete, event, func, or_
from sqlalchemy import select as select_columns
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlmodel import Session, col, select

from app_taskflow.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    MissingExtraError,
    StoreError,
    TaskNotFoundError,
    TaskStateError,
)
from app_taskflow.models import (
    ACTIVE_STATUSES,
    IDEMPOTENCY_HOLDING_STATUSES,
    TERMINAL_STATUSES,
    AttemptOutcome,
    LogEntry,
    RecoveryReport,
    TaskChange,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    TaskStatus,
)
from app_taskflow.stores.base import TaskStore, build_metrics
from app_taskflow.stores.records import (
    apply_outcome,
    check_cancellable,
    check_retryable,
    check_same_task,
    requeue,
    take_back,
)
from app_taskflow.stores.sql_schema import (
    SUMMARY_COLUMNS,
    AttemptRow,
    LeaseRow,
    LogRow,
    TaskRow,
    log_row,
    migrate,
    record_from_row,
    summary_from_mapping,
    task_values,
)

Ts = TypeVarTuple("Ts")
T = TypeVar("T")

_WORKER_THREADS = 4
"""Maximum number of database calls that run at once, each in a worker thread."""

_FIRST_RETRY_DELAY = 0.01
_MAX_RETRY_DELAY = 0.2
_WRITE_OPTION = "taskflow_write"
_DRIVER_EXTRAS = {"postgresql": "postgres"}


class SqlStore(TaskStore):
    """A store in a SQL database, shared safely by several processes.

    SQLite (``sqlite:///path/to/tasks.db``) runs in WAL mode with ``synchronous=NORMAL``,
    in which readers and the writer do not block each other. Every write transaction starts
    with ``BEGIN IMMEDIATE``, so writers queue for the lock instead of failing halfway.
    Calls run in a few worker threads, so the event loop does not wait on the database.

    NOTE: with ``synchronous=NORMAL`` a commit survives a crash of the app but can be lost
    in a power failure or operating system crash. Only SQLite is tested; other databases
    reachable through SQLAlchemy are untested.

    Args:
        url: a SQLAlchemy database URL, such as ``sqlite:///var/tasks.db``.
        busy_timeout: seconds a call waits for a lock held by another connection before it
            raises ``StoreError``.
    """

    supports_multiple_instances = True

    def __init__(self, url: str, *, busy_timeout: float = 30.0) -> None:
        self._busy_timeout = busy_timeout
        self._engine, self._location = _create_engine(url, busy_timeout)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        threads = 1 if isinstance(self._engine.pool, StaticPool) else _WORKER_THREADS
        self._limiter = anyio.CapacityLimiter(threads)

    async def open(self) -> None:
        await self._write("open", migrate, self._location)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._engine.dispose, limiter=self._limiter)

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        ids, conflict = await self._write("create", _create, records)
        if conflict is not None:
            raise conflict
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._read("get", _load_record, task_id)

    async def list(self, query: TaskQuery) -> TaskPage:
        return await self._read("list", _list, query)

    async def metrics(self) -> TaskMetrics:
        return await self._read("metrics", _metrics)

    async def claim(self, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
        return await self._write("claim", _claim, task_id, instance_id, now)

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        if limit <= 0 or not names:
            return []
        return await self._write("claim_next", _claim_next, instance_id, now, limit, list(names))

    async def finish(
        self, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
    ) -> bool:
        return await self._write("finish", _finish, task_id, instance_id, attempt, outcome)

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        if entries:
            await self._write("append_logs", _append_logs, task_id, entries)

    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        return await self._write("heartbeat", _heartbeat, instance_id, expires_at)

    async def recover_expired(self, now: datetime) -> RecoveryReport:
        return await self._write("recover_expired", _recover_expired, now)

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        return await self._write("release", _release, instance_id, now)

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        return await self._write("cancel", _cancel, task_id, now)

    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        return await self._write("retry", _retry, task_id, extra_attempts)

    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        return await self._write("prune", _prune, now, max_age, max_count)

    async def watch(self) -> AsyncIterator[TaskChange]:
        # TODO: deliver changes by polling a change sequence (SQLite) or LISTEN/NOTIFY.
        raise NotImplementedError("SqlStore.watch() is not implemented yet.")
        yield  # pragma: no cover - makes this function an async generator

    async def _read(self, operation: str, work: Callable[[Session, *Ts], T], *args: *Ts) -> T:
        return await self._run(operation, self._engine, work, *args)

    async def _write(self, operation: str, work: Callable[[Session, *Ts], T], *args: *Ts) -> T:
        return await self._run(operation, self._write_engine, work, *args)

    async def _run(
        self, operation: str, engine: Engine, work: Callable[[Session, *Ts], T], *args: *Ts
    ) -> T:
        return await anyio.to_thread.run_sync(
            self._run_in_thread, operation, engine, work, *args, limiter=self._limiter
        )

    def _run_in_thread(
        self, operation: str, engine: Engine, work: Callable[[Session, *Ts], T], *args: *Ts
    ) -> T:
        """Run ``work(session, *args)`` in one transaction, retried while the database is busy.

        Every driver error leaves here as ``StoreError``. Errors of the library itself, such
        as ``TaskStateError``, roll the transaction back and pass through unchanged.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = _FIRST_RETRY_DELAY
        retries = 0
        while True:
            try:
                with Session(engine) as session, session.begin():
                    return work(session, *args)
            except OperationalError as error:
                if not _is_busy(error):
                    raise self._store_error(operation, error) from error
                pause = delay * random.uniform(0.5, 1.0)
                if time.monotonic() + pause > deadline:
                    raise StoreError(
                        f"Timed out after {self._busy_timeout:g} s waiting for a lock on the "
                        f"task store at {self._location} during {operation}. Another "
                        "connection kept a write transaction open that long, so end that "
                        "transaction or raise busy_timeout."
                    ) from error
            except SQLAlchemyError as error:
                raise self._store_error(operation, error) from error

            # The busy handler of SQLite waits for most locks itself (see busy_timeout), but
            # some busy errors return at once. The transaction was rolled back, so it runs
            # again from the start. Jitter keeps processes that collided from retrying in step.
            retries += 1
            logger.debug(
                "Task store busy during {}; retry {} in {:.3f} s", operation, retries, pause
            )
            time.sleep(pause)
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _store_error(self, operation: str, error: SQLAlchemyError) -> StoreError:
        # Quote the driver's message only, because the SQL parameters may contain task arguments.
        cause = error.orig if isinstance(error, StatementError) else error
        return StoreError(
            f"The task store at {self._location} failed during {operation}: "
            f"{type(cause).__name__}: {cause}"
        )


def _create_engine(url: str, busy_timeout: float) -> tuple[Engine, str]:
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigurationError(
            f"Invalid database URL {url!r}: {error}. Use a SQLAlchemy URL such as "
            "'sqlite:///var/tasks.db'."
        ) from error
    location = parsed.render_as_string(hide_password=True)

    options: dict[str, Any] = {"pool_size": _WORKER_THREADS}
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        options["connect_args"] = {"timeout": busy_timeout, "check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            # An in-memory database lives in one connection, so every thread must share it.
            options = {**options, "poolclass": StaticPool}
            del options["pool_size"]

    try:
        engine = create_engine(parsed, **options)
    except ImportError as error:
        extra = _DRIVER_EXTRAS.get(parsed.get_backend_name())
        advice = (
            f"Install it with: pip install 'app-taskflow[{extra}]'"
            if extra
            else "Install the driver package that the URL names."
        )
        raise MissingExtraError(
            f"The database driver for {location} is not installed ({error}). {advice}"
        ) from error
    except ArgumentError as error:
        raise ConfigurationError(f"Invalid database URL {location}: {error}.") from error

    if is_sqlite:
        _configure_sqlite(engine)
    return engine, location


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, connection_record: object) -> None:
        # SQLAlchemy emits BEGIN itself (below), as its SQLite documentation advises, because
        # the sqlite3 module leaves SELECT and SAVEPOINT outside of transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        # A transaction that reads and then writes must take the write lock at its start,
        # because taking it later fails with SQLITE_BUSY at once if another writer got in.
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _is_busy(error: OperationalError) -> bool:
    code = getattr(error.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY


def _create(
    session: Session, records: Sequence[TaskRecord]
) -> tuple[list[str], IdempotencyConflictError | None]:
    """Insert the records and return their ids, stopping at the first idempotency conflict.

    The conflict is returned rather than raised, so that the caller commits the records
    before it and then raises it.
    """
    ids: list[str] = []
    for record in records:
        row = TaskRow(**task_values(record))
        if record.idempotency_key is None:
            session.add(row)
            ids.append(record.id)
            continue

        # Insert first and look for the holder only when the unique index rejects the key,
        # because a check before the insert could miss a holder inserted at the same time.
        new_task = record_from_row(row)
        try:
            with session.begin_nested():
                session.add(row)
            ids.append(record.id)
            continue
        except IntegrityError:
            holder = _holder_of_key(session, record.idempotency_key)
            if holder is None:
                raise

        try:
            check_same_task(record_from_row(holder), new_task)
        except IdempotencyConflictError as conflict:
            return ids, conflict
        ids.append(holder.id)
    return ids, None


def _list(session: Session, query: TaskQuery) -> TaskPage:
    statement = select_columns(*SUMMARY_COLUMNS)
    if query.statuses is not None:
        statuses = [status.value for status in query.statuses]
        statement = statement.where(col(TaskRow.status).in_(statuses))
    if query.name is not None:
        statement = statement.where(col(TaskRow.name) == query.name)
    statement = (
        statement.order_by(col(TaskRow.created_at).desc(), col(TaskRow.id).desc())
        .offset(query.offset)
        .limit(query.limit + 1)
    )
    rows = session.execute(statement).mappings().all()
    return TaskPage(
        items=[summary_from_mapping(row) for row in rows[: query.limit]],
        limit=query.limit,
        offset=query.offset,
        has_more=len(rows) > query.limit,
    )


def _metrics(session: Session) -> TaskMetrics:
    counts: dict[str, dict[TaskStatus, int]] = defaultdict(dict)
    count_statement = select(TaskRow.name, TaskRow.status, func.count()).group_by(
        col(TaskRow.name), col(TaskRow.status)
    )
    for name, status, count in session.exec(count_statement):
        counts[name][TaskStatus(status)] = count

    # NOTE: percentiles are computed here from one duration per finished task, so memory
    # grows with the history; move them into SQL when histories get large.
    durations: dict[str, list[float]] = defaultdict(list)
    duration_statement = select(TaskRow.name, TaskRow.duration).where(
        col(TaskRow.status).in_([status.value for status in TERMINAL_STATUSES]),
        col(TaskRow.duration).is_not(None),
    )
    for name, duration in session.exec(duration_statement):
        if duration is not None:
            durations[name].append(duration)
    return build_metrics(counts, durations)


def _claim(session: Session, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
    statement = select(TaskRow).where(
        col(TaskRow.id) == task_id,
        or_(col(TaskRow.owner).is_(None), col(TaskRow.owner) == instance_id),
        *_claimable(now),
    )
    row = session.exec(statement.with_for_update()).first()
    if row is None:
        return None
    _start_attempt(session, row, instance_id, now)
    return _records_with_attempts(session, [row])[0]


def _claim_next(
    session: Session, instance_id: str, now: datetime, limit: int, names: list[str]
) -> list[TaskRecord]:
    statement = (
        select(TaskRow)
        .where(col(TaskRow.owner).is_(None), col(TaskRow.name).in_(names), *_claimable(now))
        .order_by(col(TaskRow.created_at), col(TaskRow.id))
        .limit(limit)
    )
    # SKIP LOCKED lets concurrent callers on PostgreSQL take different tasks. SQLite ignores
    # it, and its write lock already runs these transactions one at a time.
    rows = session.exec(statement.with_for_update(skip_locked=True)).all()
    for row in rows:
        _start_attempt(session, row, instance_id, now)
    return _records_with_attempts(session, rows)


def _finish(
    session: Session, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
) -> bool:
    row = session.get(TaskRow, task_id, with_for_update=True)
    if (
        row is None
        or row.status != TaskStatus.RUNNING.value
        or row.owner != instance_id
        or row.attempts != attempt
    ):
        return False
    _change(session, row, lambda record: apply_outcome(record, outcome))
    return True


def _append_logs(session: Session, task_id: str, entries: Sequence[LogEntry]) -> None:
    if session.exec(select(TaskRow.id).where(col(TaskRow.id) == task_id)).first() is None:
        return
    session.add_all(log_row(task_id, entry) for entry in entries)


def _heartbeat(session: Session, instance_id: str, expires_at: datetime) -> list[str]:
    lease = session.get(LeaseRow, instance_id, with_for_update=True)
    if lease is None:
        session.add(LeaseRow(instance_id=instance_id, expires_at=expires_at))
    else:
        lease.expires_at = expires_at

    statement = select(TaskRow.id).where(
        col(TaskRow.owner) == instance_id,
        col(TaskRow.status) == TaskStatus.RUNNING.value,
        col(TaskRow.cancel_requested).is_(True),
    )
    return list(session.exec(statement.order_by(col(TaskRow.created_at))).all())


def _recover_expired(session: Session, now: datetime) -> RecoveryReport:
    session.execute(delete(LeaseRow).where(col(LeaseRow.expires_at) < now))
    rows = _lock_active_tasks(
        session,
        col(TaskRow.owner).is_not(None),
        col(TaskRow.owner).not_in(select(LeaseRow.instance_id)),
        skip_locked=True,
    )
    return _take_back_all(session, rows, now)


def _release(session: Session, instance_id: str, now: datetime) -> RecoveryReport:
    session.execute(delete(LeaseRow).where(col(LeaseRow.instance_id) == instance_id))
    rows = _lock_active_tasks(session, col(TaskRow.owner) == instance_id, skip_locked=False)
    return _take_back_all(session, rows, now)


def _cancel(session: Session, task_id: str, now: datetime) -> TaskRecord:
    def cancel_record(record: TaskRecord) -> None:
        check_cancellable(record)
        if record.status is TaskStatus.PENDING:
            record.status = TaskStatus.CANCELLED
            record.finished_at = now
            record.scheduled_at = None
            record.owner = None
        else:
            record.cancel_requested = True

    return _change_task(session, task_id, cancel_record)


PRUNE_BATCH = 1000
"""Tasks deleted by one prune transaction, so that no prune holds the write lock for long."""


def _prune(session: Session, now: datetime, max_age: float | None, max_count: int | None) -> int:
    finished = col(TaskRow.status).in_([status.value for status in TERMINAL_STATUSES])
    doomed: set[str] = set()
    if max_age is not None:
        cutoff = now - timedelta(seconds=max_age)
        doomed.update(
            session.exec(
                select(TaskRow.id)
                .where(finished, col(TaskRow.finished_at) < cutoff)
                .limit(PRUNE_BATCH)
            ).all()
        )
    if max_count is not None:
        doomed.update(
            session.exec(
                select(TaskRow.id)
                .where(finished)
                .order_by(col(TaskRow.finished_at).desc(), col(TaskRow.id).desc())
                .offset(max_count)
                .limit(PRUNE_BATCH)
            ).all()
        )
    if not doomed:
        return 0
    ids = list(doomed)
    session.exec(delete(LogRow).where(col(LogRow.task_id).in_(ids)))
    session.exec(delete(AttemptRow).where(col(AttemptRow.task_id).in_(ids)))
    session.exec(delete(TaskRow).where(col(TaskRow.id).in_(ids)))
    return len(ids)


def _retry(session: Session, task_id: str, extra_attempts: int) -> TaskRecord:
    def requeue_record(record: TaskRecord) -> None:
        check_retryable(record)
        holder = _holder_of_key(session, record.idempotency_key)
        if holder is not None and holder.id != record.id:
            raise TaskStateError(
                f"Task {task_id} cannot be retried: its idempotency key "
                f"{record.idempotency_key!r} is now held by task {holder.id}."
            )
        requeue(record, extra_attempts)

    return _change_task(session, task_id, requeue_record)


def _claimable(now: datetime) -> list[Any]:
    return [
        col(TaskRow.status) == TaskStatus.PENDING.value,
        col(TaskRow.cancel_requested).is_(False),
        or_(col(TaskRow.scheduled_at).is_(None), col(TaskRow.scheduled_at) <= now),
    ]


def _start_attempt(session: Session, row: TaskRow, instance_id: str, now: datetime) -> None:
    row.status = TaskStatus.RUNNING.value
    row.owner = instance_id
    row.started_at = now
    row.scheduled_at = None
    row.attempts += 1
    session.add(
        AttemptRow(
            task_id=row.id,
            number=row.attempts,
            instance_id=instance_id,
            started_at=now,
            status=TaskStatus.RUNNING.value,
        )
    )


def _lock_active_tasks(session: Session, *conditions: Any, skip_locked: bool) -> list[TaskRow]:
    statuses = [status.value for status in ACTIVE_STATUSES]
    statement = (
        select(TaskRow)
        .where(col(TaskRow.status).in_(statuses), *conditions)
        .order_by(col(TaskRow.created_at), col(TaskRow.id))
        .with_for_update(skip_locked=skip_locked)
    )
    return list(session.exec(statement).all())


def _take_back_all(session: Session, rows: Iterable[TaskRow], now: datetime) -> RecoveryReport:
    report = RecoveryReport()
    for row in rows:
        _change(session, row, lambda record: take_back(record, now, report))
    return report


def _change_task(
    session: Session, task_id: str, change: Callable[[TaskRecord], None]
) -> TaskRecord:
    """Apply ``change`` to one locked task and return the task with logs and attempts."""
    row = session.get(TaskRow, task_id, with_for_update=True)
    if row is None:
        raise TaskNotFoundError(f"No task has id {task_id!r}.")
    _change(session, row, change)
    return _full_record(session, row)


def _change(session: Session, row: TaskRow, change: Callable[[TaskRecord], None]) -> None:
    """Apply a change written for ``TaskRecord`` to a locked row and its current attempt.

    The record handed to ``change`` carries the current attempt only, which is all that the
    shared helpers (``apply_outcome``, ``take_back``, ``requeue``) read or write.
    """
    current = session.get(AttemptRow, (row.id, row.attempts)) if row.attempts else None
    record = record_from_row(row, attempts=[current] if current is not None else [])
    change(record)

    # The session writes only the columns whose value changed.
    for name, value in task_values(record).items():
        setattr(row, name, value)
    if current is not None:
        attempt = record.attempt_history[-1]
        current.finished_at = attempt.finished_at
        current.status = attempt.status.value
        current.error_type = attempt.error_type
        current.error_message = attempt.error_message


def _holder_of_key(session: Session, key: str | None) -> TaskRow | None:
    if key is None:
        return None
    statement = select(TaskRow).where(
        col(TaskRow.idempotency_key) == key,
        col(TaskRow.status).in_([status.value for status in IDEMPOTENCY_HOLDING_STATUSES]),
    )
    return session.exec(statement).first()


def _load_record(session: Session, task_id: str) -> TaskRecord | None:
    row = session.get(TaskRow, task_id)
    return None if row is None else _full_record(session, row)


def _full_record(session: Session, row: TaskRow) -> TaskRecord:
    attempt_statement = select(AttemptRow).where(col(AttemptRow.task_id) == row.id)
    attempts = session.exec(attempt_statement.order_by(col(AttemptRow.number))).all()
    log_statement = select(LogRow).where(col(LogRow.task_id) == row.id)
    logs = session.exec(log_statement.order_by(col(LogRow.id))).all()
    return record_from_row(row, attempts=attempts, logs=logs)


def _records_with_attempts(session: Session, rows: Sequence[TaskRow]) -> list[TaskRecord]:
    """Return the rows as records with their attempt history, in the order given."""
    if not rows:
        return []
    statement = (
        select(AttemptRow)
        .where(col(AttemptRow.task_id).in_([row.id for row in rows]))
        .order_by(col(AttemptRow.task_id), col(AttemptRow.number))
    )
    attempts: dict[str, list[AttemptRow]] = defaultdict(list)
    for attempt in session.exec(statement):
        attempts[attempt.task_id].append(attempt)
    return [record_from_row(row, attempts=attempts[row.id]) for row in rows]
