"""Helpers of the store contract suite: instances, outcomes and tasks brought to a status."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from app_taskflow.models import AttemptOutcome, LogEntry, TaskRecord, TaskStatus
from app_taskflow.stores.base import TaskStore

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]

INSTANCE_A = "instance-a"
INSTANCE_B = "instance-b"
TASK_NAMES = ("send_email", "resize_image", "send_sms")
TRACEBACK = "Traceback (most recent call last):\nValueError: invalid address\n"
STOPPED_INSTANCE = "instance-stopped"
"""The instance that ``create_in_status`` claims and releases to make INTERRUPTED tasks."""

# Written out rather than taken from the sets in models.py, so that the suite checks the
# statuses that the TaskStore docstrings name.
HOLDING_STATUSES = [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SUCCESS]
RELEASING_STATUSES = [TaskStatus.FAILED, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED]
FINISHED_STATUSES = [
    TaskStatus.SUCCESS,
    TaskStatus.FAILED,
    TaskStatus.INTERRUPTED,
    TaskStatus.CANCELLED,
]
RETRYABLE_STATUSES = [TaskStatus.FAILED, TaskStatus.INTERRUPTED]
NOT_RETRYABLE_STATUSES = [
    TaskStatus.PENDING,
    TaskStatus.RUNNING,
    TaskStatus.SUCCESS,
    TaskStatus.CANCELLED,
]


def status_id(status: TaskStatus) -> str:
    return status.value


def make_outcome(
    status: TaskStatus, finished_at: datetime, duration: float = 1.0, **fields: Any
) -> AttemptOutcome:
    return AttemptOutcome(status=status, finished_at=finished_at, duration=duration, **fields)


def failure(
    finished_at: datetime, duration: float = 1.0, retry_at: datetime | None = None
) -> AttemptOutcome:
    """Return the outcome of an attempt that raised ValueError.

    The task is FAILED, or PENDING with another attempt due at ``retry_at`` when given.
    """
    return make_outcome(
        TaskStatus.FAILED if retry_at is None else TaskStatus.PENDING,
        finished_at,
        duration,
        scheduled_at=retry_at,
        error_type="ValueError",
        error_message="invalid address",
        traceback=TRACEBACK,
    )


async def create_task(store: TaskStore, record: TaskRecord) -> str:
    [task_id] = await store.create([record])
    return task_id


async def create_running(
    store: TaskStore, record: TaskRecord, instance_id: str, now: datetime
) -> str:
    task_id = await create_task(store, record)
    claimed = await store.claim(task_id, instance_id, now)
    assert claimed is not None
    return task_id


async def create_in_status(
    store: TaskStore,
    record: TaskRecord,
    status: TaskStatus,
    clock: Clock,
    duration: float = 1.0,
) -> str:
    """Create ``record`` and bring it to ``status`` through the store's own methods.

    RUNNING, SUCCESS and FAILED tasks are claimed by ``INSTANCE_A`` at ``clock(1)`` and
    finished at ``clock(1 + duration)``. INTERRUPTED tasks are claimed by
    ``STOPPED_INSTANCE``, which is then released, so tasks that ``INSTANCE_A`` runs stay
    RUNNING.
    """
    task_id = await create_task(store, record)
    if status == TaskStatus.PENDING:
        return task_id
    if status == TaskStatus.CANCELLED:
        await store.cancel(task_id, clock(1))
        return task_id
    if status == TaskStatus.INTERRUPTED:
        assert await store.claim(task_id, STOPPED_INSTANCE, clock(1)) is not None
        await store.release(STOPPED_INSTANCE, clock(2))
        return task_id

    assert await store.claim(task_id, INSTANCE_A, clock(1)) is not None
    if status == TaskStatus.RUNNING:
        return task_id
    if status == TaskStatus.FAILED:
        outcome = failure(clock(1 + duration), duration)
    else:
        outcome = make_outcome(status, clock(1 + duration), duration)
    assert await store.finish(task_id, INSTANCE_A, 1, outcome)
    return task_id


async def create_waiting_with_cancel(store: TaskStore, record: TaskRecord, clock: Clock) -> str:
    """Create a PENDING task owned by ``INSTANCE_A`` whose cancel was requested.

    The cancel arrives while attempt 1 runs, and that attempt then fails with a retry due
    at ``clock(3)``, which leaves the task PENDING with ``cancel_requested`` still set.
    """
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.cancel(task_id, clock(2))
    retry_outcome = failure(clock(2), retry_at=clock(3))
    assert await store.finish(task_id, INSTANCE_A, 1, retry_outcome)
    return task_id


def log_entry(clock: Clock, seconds: float, message: str) -> LogEntry:
    return LogEntry(timestamp=clock(seconds), message=message, attempt=1, extra={"step": message})
