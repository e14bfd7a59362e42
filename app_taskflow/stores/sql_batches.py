"""Batch forms of ``claim`` and ``finish``, which the writer thread of SqlStore runs for a group.

A batch form runs the calls of one kind that wait in one group with a few statements for
all of them, where one by one each call needs two or three. It reads the tasks first,
decides each call in Python by the rules of the single form, then writes with
executemany statements whose WHERE clauses check those rules again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy import select as select_columns
from sqlmodel import Session

from app_taskflow.models import AttemptOutcome, AttemptRecord, TaskRecord, TaskStatus
from app_taskflow.stores.records import is_claimable
from app_taskflow.stores.sql_operations import (
    CLAIM_CONDITIONS,
    STARTED_VALUES,
    UPDATE_ATTEMPT,
    build_finished_record,
    claim,
    ended_attempt_values,
    finish,
    mutable_values,
    runs_attempt,
    start_attempts,
)
from app_taskflow.stores.sql_schema import TASK_COLUMNS, TASK_TABLE
from app_taskflow.stores.sql_watch import write_changes


class BatchCheckError(Exception):
    """Raised by a batch form when the database disagrees with the checks made in Python.

    The caller rolls back and runs the calls one by one instead.
    """


def claim_many(
    session: Session, calls: Sequence[tuple[str, str, datetime]]
) -> list[TaskRecord | None]:
    """Run ``claim`` for each call, in order, with a few statements for all of them.

    Each call is the ``(task_id, instance_id, now)`` of one ``claim``. One SELECT reads the
    tasks, one executemany UPDATE starts the attempts and one executemany INSERT adds the
    attempt rows. Returns the result of each call, in order.

    Raises:
        BatchCheckError: the UPDATE started other tasks than the rows read predicted.
    """
    tasks = _lock_tasks(session, [task_id for task_id, _, _ in calls])
    started: list[dict[str, Any]] = []
    attempts: list[AttemptRecord] = []
    positions: list[int | None] = []
    for task_id, instance_id, now in calls:
        row = tasks.get(task_id)
        if row is None or not _claimable(row, instance_id, now):
            positions.append(None)
            continue
        # The values that the RETURNING clause of a single claim reads back, in UTC.
        row = {
            **row,
            "status": TaskStatus.RUNNING.value,
            "owner": instance_id,
            "started_at": now.astimezone(UTC),
            "scheduled_at": None,
            "attempts": row["attempts"] + 1,
        }
        # A later call for the same task finds it started, as it would one by one.
        tasks[task_id] = row
        positions.append(len(started))
        started.append(row)
        attempts.append(
            AttemptRecord(number=row["attempts"], instance_id=instance_id, started_at=now)
        )

    # Every call goes to the UPDATE, whose WHERE clause is that of a single claim. It must
    # start exactly the tasks that the checks above started.
    parameters = [
        {"task_id": task_id, "instance_id": instance_id, "now": now}
        for task_id, instance_id, now in calls
    ]
    updated = session.connection().execute(_CLAIM_MANY, parameters).rowcount
    if updated != len(started):
        raise BatchCheckError(f"{updated} claims were made where {len(started)} were expected.")
    records = start_attempts(session, started, attempts) if started else []
    return [None if position is None else records[position] for position in positions]


def finish_many(
    session: Session, calls: Sequence[tuple[str, str, int, AttemptOutcome]]
) -> list[bool]:
    """Run ``finish`` for each call, in order, with a few statements for all of them.

    Each call is the ``(task_id, instance_id, attempt, outcome)`` of one ``finish``. One
    SELECT reads the tasks, then one executemany UPDATE writes the tasks (every column that
    can change, whether it changed or not) and one the attempts. Returns the result of each
    call, in order.

    Raises:
        BatchCheckError: the UPDATE changed other tasks than the rows read predicted.
    """
    tasks = _lock_tasks(session, [task_id for task_id, _, _, _ in calls])
    results: list[bool] = []
    task_parameters: list[dict[str, Any]] = []
    attempt_parameters: list[dict[str, Any]] = []
    written: list[dict[str, Any]] = []
    for task_id, instance_id, attempt, outcome in calls:
        row = tasks.get(task_id)
        if not runs_attempt(row, instance_id, attempt):
            results.append(False)
            continue

        record = build_finished_record(row, instance_id, attempt, outcome)
        values = mutable_values(record)
        # The WHERE clause repeats the checks of runs_attempt, for the row count below.
        task_parameters.append(
            {
                "task_id": task_id,
                "expected_owner": instance_id,
                "expected_attempt": attempt,
                **values,
            }
        )
        attempt_parameters.append(ended_attempt_values(record))
        row = {**row, **values}
        # A later call for the same task finds it finished, as it would one by one.
        tasks[task_id] = row
        written.append(row)
        results.append(True)

    if task_parameters:
        updated = session.connection().execute(_FINISH_MANY, task_parameters).rowcount
        if updated != len(task_parameters):
            raise BatchCheckError(
                f"{updated} finishes were written where {len(task_parameters)} were expected."
            )
        session.execute(UPDATE_ATTEMPT, attempt_parameters)
        write_changes(session).tasks_written(written)
    return results


BATCH_FORMS: dict[Callable[..., Any], Callable[..., list[Any]]] = {
    claim: claim_many,
    finish: finish_many,
}
"""The batch form of each write function that has one, which takes the calls' arguments.

A batch form gives each call the result and the database the rows that the calls would
give one by one, in the order given. It raises when one of them fails, and then the
caller runs the calls one by one to find out which.
"""


def _lock_tasks(session: Session, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Read the columns of the tasks that exist among ``task_ids``, by id."""
    parameters = {"task_ids": list(set(task_ids))}
    return {row["id"]: dict(row) for row in session.execute(_LOCK_TASKS, parameters).mappings()}


def _claimable(row: Mapping[str, Any], instance_id: str, now: datetime) -> bool:
    """Return whether ``claim`` would start the task of ``row``, by the conditions of its UPDATE."""
    return row["owner"] in (None, instance_id) and is_claimable(
        row["status"], row["cancel_requested"], row["scheduled_at"], now
    )


# SQLite runs no executemany with RETURNING, so claim_many reads the rows beforehand.
_CLAIM_MANY = update(TASK_TABLE).values(STARTED_VALUES).where(*CLAIM_CONDITIONS)
# On PostgreSQL the rows stay locked until the group commits, so no other instance changes
# them between the checks in Python and the UPDATE. Locking in id order keeps two batches
# of two instances from deadlocking each other. Writes that lock in other orders can still
# deadlock, and then SqlStore runs the group again.
_LOCK_TASKS = (
    select_columns(*TASK_COLUMNS)
    .where(TASK_TABLE.c.id.in_(bindparam("task_ids", expanding=True)))
    .order_by(TASK_TABLE.c.id)
    .with_for_update()
)
# The WHERE clause repeats finish's checks, and the other parameters are the columns to set.
_FINISH_MANY = update(TASK_TABLE).where(
    TASK_TABLE.c.id == bindparam("task_id"),
    TASK_TABLE.c.status == TaskStatus.RUNNING.value,
    TASK_TABLE.c.owner == bindparam("expected_owner"),
    TASK_TABLE.c.attempts == bindparam("expected_attempt"),
)
