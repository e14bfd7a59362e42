"""Rules for changing a task record, shared by the stores so that they behave alike."""

from __future__ import annotations

from datetime import datetime

from app_taskflow.errors import IdempotencyConflictError, TaskStateError
from app_taskflow.models import (
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    AttemptOutcome,
    RecoveryReport,
    TaskRecord,
    TaskStatus,
)


def is_claimable(
    status: str, cancel_requested: bool, scheduled_at: datetime | None, now: datetime
) -> bool:
    """Return whether a task in this state may start an attempt at ``now``, owner aside.

    ``status`` is a ``TaskStatus`` or its value. The SQL store checks the same conditions
    in the WHERE clause of its claims.
    """
    return (
        status == TaskStatus.PENDING
        and not cancel_requested
        and (scheduled_at is None or scheduled_at <= now)
    )


def check_same_task(existing: TaskRecord, new: TaskRecord) -> None:
    """Raise ``IdempotencyConflictError`` unless both records describe the same call."""
    if (existing.name, existing.args, existing.kwargs) != (new.name, new.args, new.kwargs):
        # The message leaves the argument values out: they may be personal data, and
        # this error is often logged.
        raise IdempotencyConflictError(
            f"Idempotency key {new.idempotency_key!r} is already used by task {existing.id} "
            f"({existing.name}) with other arguments; it cannot be reused for a different "
            f"call of {new.name}. Use a new key for a different call."
        )


def check_cancellable(record: TaskRecord) -> None:
    """Raise ``TaskStateError`` when the task has already finished."""
    if record.status in TERMINAL_STATUSES:
        raise TaskStateError(
            f"Task {record.id} cannot be cancelled: it is already {record.status.value}."
        )


def check_retryable(record: TaskRecord) -> None:
    """Raise ``TaskStateError`` unless the task is FAILED or INTERRUPTED."""
    if record.status not in RETRYABLE_STATUSES:
        raise TaskStateError(
            f"Task {record.id} cannot be retried: it is {record.status.value}, and only "
            "FAILED or INTERRUPTED tasks can be retried."
        )


def apply_outcome(record: TaskRecord, outcome: AttemptOutcome) -> None:
    """Write an attempt's outcome onto a RUNNING record and its current attempt.

    A retry outcome for a task whose cancel was requested ends it as CANCELLED instead,
    because the request may have reached the store after the runner decided to retry.
    """
    if outcome.status is TaskStatus.PENDING and record.cancel_requested:
        outcome = outcome.model_copy(update={"status": TaskStatus.CANCELLED, "scheduled_at": None})
    record.status = outcome.status
    record.duration = outcome.duration
    record.error_type = outcome.error_type
    record.error_message = outcome.error_message
    if outcome.traceback is not None or outcome.status is TaskStatus.SUCCESS:
        # A success clears the traceback of an earlier failure; a retry keeps it until then.
        record.traceback = outcome.traceback
    if outcome.status is TaskStatus.PENDING:
        record.scheduled_at = outcome.scheduled_at
    else:
        record.finished_at = outcome.finished_at
        record.cancel_requested = False

    current = record.attempt_history[-1] if record.attempt_history else None
    if current is not None and current.number == record.attempts:
        current.finished_at = outcome.finished_at
        current.status = (
            TaskStatus.FAILED if outcome.status is TaskStatus.PENDING else outcome.status
        )
        current.error_type = outcome.error_type
        current.error_message = outcome.error_message


def take_back(record: TaskRecord, now: datetime, report: RecoveryReport) -> None:
    """Release a PENDING task or interrupt a RUNNING one whose owner is gone."""
    if record.status is TaskStatus.PENDING:
        record.owner = None
        report.released.append(record.id)
        return
    if record.status is not TaskStatus.RUNNING:
        return

    current = record.attempt_history[-1] if record.attempt_history else None
    if current is not None and current.finished_at is None:
        current.finished_at = now
        current.status = TaskStatus.INTERRUPTED
        current.error_type = "Interrupted"
        current.error_message = f"Instance {record.owner} stopped during this attempt."

    record.owner = None
    record.cancel_requested = False
    if record.requeue_on_interrupt:
        record.status = TaskStatus.PENDING
        record.scheduled_at = None
        # The requeued run is one more attempt, so the budget grows to show "n of n".
        record.max_attempts = max(record.max_attempts, record.attempts + 1)
        # NOTE: requeueing is not bounded by max_attempts, so a task that kills its
        # instance every time keeps coming back; the attempt count shows the loop.
        report.requeued.append(record.id)
    else:
        record.status = TaskStatus.INTERRUPTED
        record.finished_at = now
        if record.started_at is not None:
            record.duration = (now - record.started_at).total_seconds()
        record.error_type = "Interrupted"
        record.error_message = "The instance running this task stopped before it finished."
        report.interrupted.append(record.id)


def cancel_record(record: TaskRecord, now: datetime) -> None:
    """Cancel a PENDING record, or mark a RUNNING one as asked to stop.

    Raises:
        TaskStateError: the task has already finished.
    """
    check_cancellable(record)
    if record.status is TaskStatus.PENDING:
        record.status = TaskStatus.CANCELLED
        record.finished_at = now
        record.scheduled_at = None
        record.owner = None
    else:
        # The instance running it learns of the request from its next heartbeat.
        record.cancel_requested = True


def requeue(record: TaskRecord, extra_attempts: int) -> None:
    """Make a FAILED or INTERRUPTED record PENDING again with ``extra_attempts`` more."""
    record.status = TaskStatus.PENDING
    record.owner = None
    record.scheduled_at = None
    record.finished_at = None
    record.error_type = None
    record.error_message = None
    record.cancel_requested = False
    record.max_attempts = record.attempts + extra_attempts
