"""The write transactions of SqlStore, one function per store method.

Each function runs inside a transaction that ``SqlStore`` opens (with ``BEGIN IMMEDIATE``
on SQLite), reports every task and log change to ``write_changes(session)``, and returns
what the store method returns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeGuard

from sqlalchemy import bindparam, delete, func, insert, or_, update
from sqlalchemy import select as select_columns
from sqlalchemy.dialects.postgresql import insert as postgres_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.dml import ReturningInsert
from sqlmodel import Session, col, select

from app_taskflow.errors import (
    IdempotencyConflictError,
    StoreError,
    TaskNotFoundError,
    TaskStateError,
)
from app_taskflow.models import (
    ACTIVE_STATUSES,
    IDEMPOTENCY_HOLDING_STATUSES,
    AttemptOutcome,
    AttemptRecord,
    LogEntry,
    RecoveryReport,
    TaskRecord,
    TaskStatus,
)
from app_taskflow.stores.records import (
    apply_outcome,
    cancel_record,
    check_retryable,
    check_same_task,
    requeue,
    take_back,
)
from app_taskflow.stores.sql_queries import full_record
from app_taskflow.stores.sql_schema import (
    ATTEMPT_TABLE,
    HOLDS_IDEMPOTENCY_KEY,
    LOG_TABLE,
    OWNERLESS_PENDING,
    TAG_TABLE,
    TASK_COLUMNS,
    TASK_TABLE,
    AttemptRow,
    LeaseRow,
    LogRow,
    TagRow,
    TaskRow,
    UtcDateTime,
    attempt_from_mapping,
    log_values,
    record_from_mapping,
    record_from_row,
    tag_values,
    task_values,
)
from app_taskflow.stores.sql_watch import write_changes


class RecordsAfterConflictError(Exception):
    """Raised by ``create`` when it inserted records after one whose key conflicts.

    The caller rolls back and creates the records up to ``position`` again, so that the
    second run stops at the same conflict with nothing inserted after it.
    """

    def __init__(self, position: int) -> None:
        super().__init__(f"Idempotency conflict at record {position} of the batch.")
        self.position = position


_KEY_ROUNDS = 5
"""Times ``create`` looks for the holder of a key that keeps changing hands before it fails."""


def create(
    session: Session, records: Sequence[TaskRecord]
) -> tuple[list[str], IdempotencyConflictError | None]:
    """Insert the records and return their ids, stopping at the first idempotency conflict.

    All records go in with one INSERT that skips those whose key a task already holds.
    The conflict is returned rather than raised, so that the caller commits the records
    before it and then raises it.
    """
    changes = write_changes(session)
    rows = [task_values(record) for record in records]
    inserted = _insert_new_tasks(session, rows)
    if len(inserted) == len(records):
        changes.tasks_written(rows)
        return [record.id for record in records], None

    ids: list[str] = []
    for position, record in enumerate(records):
        if record.id in inserted:
            ids.append(record.id)
            continue
        try:
            task_id = _use_key(session, record, rows[position])
        except IdempotencyConflictError as conflict:
            if any(later.id in inserted for later in records[position + 1 :]):
                # The single INSERT also took records after the conflict. Rolling back
                # undoes them together with their change notifications.
                raise RecordsAfterConflictError(position) from conflict
            changes.tasks_written([row for row in rows[:position] if row["id"] in inserted])
            return ids, conflict
        if task_id == record.id:
            inserted.add(task_id)
        ids.append(task_id)
    changes.tasks_written([row for row in rows if row["id"] in inserted])
    return ids, None


def _insert_new_tasks(session: Session, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Insert task rows and their tags, skipping rows whose idempotency key is held.

    Returns the ids of the tasks inserted.

    The database checks the key as it inserts, so that of two transactions that insert one
    key at once, one inserts it and the other skips it once the first has committed.
    """
    statement = _INSERT_NEW_TASKS[session.get_bind().dialect.name]
    inserted = set(session.execute(statement, rows).scalars())
    tags = tag_values(row for row in rows if row["id"] in inserted)
    if tags:
        session.execute(_INSERT_TAGS, tags)
    return inserted


def _use_key(session: Session, record: TaskRecord, row: dict[str, Any]) -> str:
    """Return the id of the task that has reserved the key of a record that was not inserted.

    Raises:
        IdempotencyConflictError: the holder describes another call.
    """
    new_task = record_from_row(TaskRow(**row))
    for _ in range(_KEY_ROUNDS):
        holder = _holder_of_key(session, record.idempotency_key)
        if holder is not None:
            check_same_task(record_from_row(holder), new_task)
            return holder.id
        # The holder ended (and freed the key) after the INSERT skipped the record.
        if _insert_new_tasks(session, [row]):
            return record.id
    raise StoreError(
        f"Idempotency key {record.idempotency_key!r} changed hands {_KEY_ROUNDS} times while "
        f"task {record.id} was being created. Add the task again."
    )


def claim(session: Session, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
    parameters = {"task_id": task_id, "instance_id": instance_id, "now": now}
    rows = session.execute(_CLAIM, parameters).mappings().all()
    return _records_started(session, rows, instance_id, now)[0] if rows else None


def claim_next(
    session: Session, instance_id: str, now: datetime, limit: int, names: list[str]
) -> list[TaskRecord]:
    parameters = {"instance_id": instance_id, "now": now, "limit": limit, "names": names}
    rows = session.execute(_CLAIM_NEXT, parameters).mappings().all()
    if not rows:
        return []
    # RETURNING gives the rows in no promised order.
    rows = sorted(rows, key=_creation_order)
    return _records_started(session, rows, instance_id, now)


def finish(
    session: Session, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
) -> bool:
    row = session.execute(_LOCK_TASK, {"task_id": task_id}).mappings().first()
    if not runs_attempt(row, instance_id, attempt):
        return False

    record = build_finished_record(row, instance_id, attempt, outcome)
    written = _changed_values(row, record)
    session.execute(_UPDATE_TASK, {"task_id": task_id, **written})
    session.execute(UPDATE_ATTEMPT, ended_attempt_values(record))
    write_changes(session).tasks_written([{**row, **written}])
    return True


def append_logs(session: Session, task_id: str, entries: Sequence[LogEntry]) -> None:
    if session.execute(_SHARE_TASK, {"task_id": task_id}).first() is None:
        return
    changes = write_changes(session)
    values = [log_values(task_id, entry) for entry in entries]
    if changes.journals:
        # The change journal of SQLite names log entries by id.
        ids = session.execute(_INSERT_LOGS.returning(LOG_TABLE.c.id), values).scalars()
        changes.logs_added(task_id, list(ids))
    else:
        session.execute(_INSERT_LOGS, values)


def heartbeat(session: Session, instance_id: str, expires_at: datetime) -> list[str]:
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


RECOVERY_BATCH = 1000
"""PENDING tasks released by one recover_expired transaction, so that none keeps locks long."""


def recover_expired(session: Session, now: datetime) -> RecoveryReport:
    session.execute(delete(LeaseRow).where(col(LeaseRow.expires_at) < now))
    orphaned = (
        TASK_TABLE.c.owner.is_not(None),
        TASK_TABLE.c.owner.not_in(select(LeaseRow.instance_id)),
    )
    # A task that another transaction has locked (its owner finishing it just now) is left
    # for the next pass, rather than waited for.
    return _take_back_all(session, orphaned, now, skip_locked=True, limit=RECOVERY_BATCH)


def release(session: Session, instance_id: str, now: datetime) -> RecoveryReport:
    session.execute(delete(LeaseRow).where(col(LeaseRow.instance_id) == instance_id))
    return _take_back_all(session, (TASK_TABLE.c.owner == instance_id,), now, skip_locked=False)


def cancel(session: Session, task_id: str, now: datetime) -> TaskRecord:
    return _change_task(session, task_id, lambda record: cancel_record(record, now))


PRUNE_BATCH = 1000
"""Tasks deleted by one prune transaction, so that no prune holds the write lock for long."""


def prune(session: Session, now: datetime, max_age: float | None, max_count: int | None) -> int:
    # The row locks keep a retry from making a task PENDING again while it is deleted. A task
    # that is locked now is left for the next call. Both rules read the finished_at index
    # from the oldest end. The status condition is written as "not active" because SQLite
    # would pick the status index for an IN list of finished statuses and read every
    # finished task.
    finished = [
        col(TaskRow.finished_at).is_not(None),
        col(TaskRow.status).not_in([status.value for status in ACTIVE_STATUSES]),
    ]
    oldest_first = (col(TaskRow.finished_at), col(TaskRow.id))

    doomed: set[str] = set()
    if max_age is not None:
        cutoff = now - timedelta(seconds=max_age)
        doomed.update(
            session.exec(
                select(TaskRow.id)
                .where(*finished, col(TaskRow.finished_at) < cutoff)
                .order_by(*oldest_first)
                .limit(PRUNE_BATCH)
                .with_for_update(skip_locked=True)
            ).all()
        )
    if max_count is not None:
        finished_count = session.execute(select(func.count()).where(*finished)).scalar_one()
        excess = min(finished_count - max_count, PRUNE_BATCH)
        if excess > 0:
            doomed.update(
                session.exec(
                    select(TaskRow.id)
                    .where(*finished)
                    .order_by(*oldest_first)
                    .limit(excess)
                    .with_for_update(skip_locked=True)
                ).all()
            )
    if not doomed:
        return 0

    ids = list(doomed)
    session.execute(delete(LogRow).where(col(LogRow.task_id).in_(ids)))
    session.execute(delete(AttemptRow).where(col(AttemptRow.task_id).in_(ids)))
    session.execute(delete(TagRow).where(col(TagRow.task_id).in_(ids)))
    session.execute(delete(TaskRow).where(col(TaskRow.id).in_(ids)))
    return len(ids)


def retry(session: Session, task_id: str, extra_attempts: int) -> TaskRecord:
    def requeue_record(record: TaskRecord) -> None:
        check_retryable(record)
        holder = _holder_of_key(session, record.idempotency_key)
        if holder is not None and holder.id != record.id:
            raise TaskStateError(
                f"Task {task_id} cannot be retried: its idempotency key "
                f"{record.idempotency_key!r} is now held by task {holder.id}."
            )
        requeue(record, extra_attempts)

    try:
        return _change_task(session, task_id, requeue_record)
    except IntegrityError as error:
        # Another task took the key after the check above (PostgreSQL runs retries of
        # different tasks at once), and the unique index rejected this task as a holder.
        raise TaskStateError(
            f"Task {task_id} cannot be retried: another task took its idempotency key meanwhile."
        ) from error


# The statements of the frequent calls are built once; calls pass their values by name.
_NOW = bindparam("now", type_=UtcDateTime())
_CLAIMABLE = (
    TASK_TABLE.c.status == TaskStatus.PENDING.value,
    TASK_TABLE.c.cancel_requested.is_(False),
    or_(TASK_TABLE.c.scheduled_at.is_(None), TASK_TABLE.c.scheduled_at <= _NOW),
)
STARTED_VALUES = {
    "status": TaskStatus.RUNNING.value,
    "owner": bindparam("instance_id"),
    "started_at": _NOW,
    "scheduled_at": None,
    "attempts": TASK_TABLE.c.attempts + 1,
}
_START_ATTEMPTS = update(TASK_TABLE).values(STARTED_VALUES).returning(*TASK_COLUMNS)
"""Starts the next attempt of the tasks that a WHERE clause added to it selects."""


def _locked_ids(*conditions: Any, skip_locked: bool, limit: Any = None) -> Any:
    """Return a condition on ``id`` that matches the tasks a locking subquery selects.

    The subquery is a MATERIALIZED common table expression, so that PostgreSQL runs it
    once: a subquery planned inside a join may run again, and lock other rows when it
    does. SKIP LOCKED lets concurrent callers on PostgreSQL take different tasks. SQLite
    ignores the locking clause, because its write lock already runs writers one at a time.
    """
    statement = select_columns(TASK_TABLE.c.id).where(*conditions)
    if limit is not None:
        statement = statement.order_by(TASK_TABLE.c.created_at, TASK_TABLE.c.id).limit(limit)
    locked = statement.with_for_update(skip_locked=skip_locked).cte().prefix_with("MATERIALIZED")
    return TASK_TABLE.c.id.in_(select_columns(locked.c.id))


# One statement claims the batch: it selects the oldest claimable tasks and starts them.
_CLAIM_NEXT = _START_ATTEMPTS.where(
    _locked_ids(
        OWNERLESS_PENDING,
        TASK_TABLE.c.name.in_(bindparam("names", expanding=True)),
        *_CLAIMABLE,
        skip_locked=True,
        limit=bindparam("limit"),
    )
)

# One UPDATE both checks and claims, so that of concurrent claims at most one matches.
CLAIM_CONDITIONS = (
    TASK_TABLE.c.id == bindparam("task_id"),
    or_(TASK_TABLE.c.owner.is_(None), TASK_TABLE.c.owner == bindparam("instance_id")),
    *_CLAIMABLE,
)
_CLAIM = _START_ATTEMPTS.where(*CLAIM_CONDITIONS)
_LOCK_TASK = (
    select_columns(*TASK_COLUMNS).where(TASK_TABLE.c.id == bindparam("task_id")).with_for_update()
)
# The key-share lock keeps prune from deleting the task before its log entries are in.
_SHARE_TASK = (
    select_columns(TASK_TABLE.c.id)
    .where(TASK_TABLE.c.id == bindparam("task_id"))
    .with_for_update(key_share=True)
)
# The columns to set are the other keys of the parameters.
_UPDATE_TASK = update(TASK_TABLE).where(TASK_TABLE.c.id == bindparam("task_id"))
UPDATE_ATTEMPT = update(ATTEMPT_TABLE).where(
    ATTEMPT_TABLE.c.task_id == bindparam("attempt_task_id"),
    ATTEMPT_TABLE.c.number == bindparam("attempt_number"),
)
_FIXED_COLUMNS = frozenset({"id", "name", "args", "kwargs", "created_at", "tags", "origin"})
"""The task columns that never change after a task is created."""
MUTABLE_COLUMNS = tuple(column.name for column in TASK_COLUMNS if column.name not in _FIXED_COLUMNS)
_INSERT_NEW_TASKS: dict[str, ReturningInsert[tuple[str]]] = {
    "postgresql": postgres_insert(TASK_TABLE)
    .on_conflict_do_nothing(
        index_elements=[TASK_TABLE.c.idempotency_key], index_where=HOLDS_IDEMPOTENCY_KEY
    )
    .returning(TASK_TABLE.c.id),
    "sqlite": sqlite_insert(TASK_TABLE)
    .on_conflict_do_nothing(
        index_elements=[TASK_TABLE.c.idempotency_key], index_where=HOLDS_IDEMPOTENCY_KEY
    )
    .returning(TASK_TABLE.c.id),
}
_INSERT_ATTEMPTS = insert(ATTEMPT_TABLE)
_INSERT_LOGS = insert(LOG_TABLE)
_INSERT_TAGS = insert(TAG_TABLE)


def _records_started(
    session: Session, rows: Sequence[Mapping[Any, Any]], instance_id: str, now: datetime
) -> list[TaskRecord]:
    """Insert the attempt records of tasks just started; return the tasks with attempts."""
    started = [
        AttemptRecord(number=row["attempts"], instance_id=instance_id, started_at=now)
        for row in rows
    ]
    return start_attempts(session, rows, started)


def start_attempts(
    session: Session, rows: Sequence[Mapping[Any, Any]], started: Sequence[AttemptRecord]
) -> list[TaskRecord]:
    """Insert the attempt records of tasks just started, one per row of ``rows``.

    Returns the tasks with their attempts.
    """
    session.execute(
        _INSERT_ATTEMPTS,
        [
            {**attempt.model_dump(), "task_id": row["id"], "status": attempt.status.value}
            for row, attempt in zip(rows, started, strict=True)
        ],
    )
    history: dict[str, list[AttemptRecord]] = defaultdict(list)
    repeated = {row["id"]: row["attempts"] for row in rows if row["attempts"] > 1}
    if repeated:
        statement = (
            select_columns(ATTEMPT_TABLE)
            .where(ATTEMPT_TABLE.c.task_id.in_(repeated))
            .order_by(ATTEMPT_TABLE.c.task_id, ATTEMPT_TABLE.c.number)
        )
        for attempt_row in session.execute(statement).mappings():
            if attempt_row["number"] < repeated[attempt_row["task_id"]]:
                history[attempt_row["task_id"]].append(attempt_from_mapping(attempt_row))
    write_changes(session).tasks_written(rows)
    return [
        record_from_mapping(row, [*history[row["id"]], attempt])
        for row, attempt in zip(rows, started, strict=True)
    ]


def runs_attempt(
    row: Mapping[Any, Any] | None, instance_id: str, attempt: int
) -> TypeGuard[Mapping[Any, Any]]:
    """Return whether the task of ``row`` runs ``attempt`` on ``instance_id``, as finish needs."""
    return (
        row is not None
        and row["status"] == TaskStatus.RUNNING.value
        and row["owner"] == instance_id
        and row["attempts"] == attempt
    )


def build_finished_record(
    row: Mapping[Any, Any], instance_id: str, attempt: int, outcome: AttemptOutcome
) -> TaskRecord:
    """Return the record of a running task with ``outcome`` applied to it and its attempt."""
    # apply_outcome writes only the end of the current attempt, so its start is not read.
    current = AttemptRecord(number=attempt, instance_id=instance_id, started_at=row["started_at"])
    record = record_from_mapping(row, [current])
    apply_outcome(record, outcome)
    return record


def ended_attempt_values(record: TaskRecord) -> dict[str, Any]:
    """Return the parameters of ``UPDATE_ATTEMPT`` for the current attempt of ``record``."""
    ended = record.attempt_history[-1]
    return {
        "attempt_task_id": record.id,
        "attempt_number": ended.number,
        "finished_at": ended.finished_at,
        "status": ended.status.value,
        "error_type": ended.error_type,
        "error_message": ended.error_message,
    }


def mutable_values(record: TaskRecord) -> dict[str, Any]:
    """Return the values of the task columns that can change after a task is created."""
    values = {name: getattr(record, name) for name in MUTABLE_COLUMNS}
    values["status"] = record.status.value
    return values


def _changed_values(row: Mapping[Any, Any], record: TaskRecord) -> dict[str, Any]:
    """Return the columns whose value in ``record`` differs from ``row``.

    Columns that never change after a task is created are not compared.
    """
    return {name: value for name, value in mutable_values(record).items() if value != row[name]}


def _take_back_all(
    session: Session,
    owned: Sequence[Any],
    now: datetime,
    *,
    skip_locked: bool,
    limit: int | None = None,
) -> RecoveryReport:
    """Take back the active tasks that the conditions ``owned`` select.

    PENDING tasks lose their owner in one statement, because a dead instance may hold
    thousands: the oldest ``limit`` of them, or all. RUNNING tasks, at most the concurrency
    of their instance, end their attempt one at a time, as ``take_back`` describes.
    """
    report = RecoveryReport()
    pending = (TASK_TABLE.c.status == TaskStatus.PENDING.value, *owned)
    statement = (
        update(TASK_TABLE)
        .where(_locked_ids(*pending, skip_locked=skip_locked, limit=limit))
        .values(owner=None)
        .returning(*TASK_COLUMNS)
    )
    released: list[Mapping[Any, Any]] = sorted(
        session.execute(statement).mappings().all(), key=_creation_order
    )
    report.released.extend(row["id"] for row in released)
    write_changes(session).tasks_written(released)

    running = (
        select(TaskRow)
        .where(col(TaskRow.status) == TaskStatus.RUNNING.value, *owned)
        .order_by(col(TaskRow.created_at), col(TaskRow.id))
        .with_for_update(skip_locked=skip_locked)
    )
    for row in session.exec(running).all():
        _change(session, row, lambda record: take_back(record, now, report))
    return report


def _creation_order(row: Mapping[Any, Any]) -> tuple[Any, Any]:
    return row["created_at"], row["id"]


def _change_task(
    session: Session, task_id: str, change: Callable[[TaskRecord], None]
) -> TaskRecord:
    """Apply ``change`` to one locked task and return the task with logs and attempts."""
    row = session.get(TaskRow, task_id, with_for_update=True)
    if row is None:
        raise TaskNotFoundError(f"No task has id {task_id!r}.")
    _change(session, row, change)
    return full_record(session, row)


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
    write_changes(session).task_changed(row)


def _holder_of_key(session: Session, key: str | None) -> TaskRow | None:
    if key is None:
        return None
    statement = select(TaskRow).where(
        col(TaskRow.idempotency_key) == key,
        col(TaskRow.status).in_([status.value for status in IDEMPOTENCY_HOLDING_STATUSES]),
    )
    return session.exec(statement).first()
