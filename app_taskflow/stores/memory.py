"""MemoryStore: tasks kept in one process's memory, for tests and throwaway apps."""

from __future__ import annotations

import builtins
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from app_taskflow.errors import IdempotencyConflictError, TaskNotFoundError, TaskStateError
from app_taskflow.models import (
    IDEMPOTENCY_HOLDING_STATUSES,
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    AttemptOutcome,
    AttemptRecord,
    LogEntry,
    RecoveryReport,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    TaskStatus,
)
from app_taskflow.stores.base import TaskStore, build_metrics


class MemoryStore(TaskStore):
    """A store that lives in the memory of one process and is lost when it exits.

    Every method runs without awaiting, so each is atomic on the event loop. It cannot be
    shared between processes.
    """

    supports_multiple_instances = False

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._leases: dict[str, datetime] = {}

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        ids: list[str] = []
        for record in records:
            existing = self._holder_of_key(record.idempotency_key)
            if existing is not None:
                check_same_task(existing, record)
                ids.append(existing.id)
                continue
            self._tasks[record.id] = record.model_copy(deep=True)
            ids.append(record.id)
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        return None if record is None else record.model_copy(deep=True)

    async def list(self, query: TaskQuery) -> TaskPage:
        matching = [
            record
            for record in self._tasks.values()
            if (query.statuses is None or record.status in query.statuses)
            and (query.name is None or record.name == query.name)
        ]
        matching.sort(key=lambda record: (record.created_at, record.id), reverse=True)
        window = matching[query.offset : query.offset + query.limit + 1]
        return TaskPage(
            items=[record.summary() for record in window[: query.limit]],
            limit=query.limit,
            offset=query.offset,
            has_more=len(window) > query.limit,
        )

    async def metrics(self) -> TaskMetrics:
        counts: dict[str, dict[TaskStatus, int]] = defaultdict(lambda: defaultdict(int))
        durations: dict[str, list[float]] = defaultdict(list)
        for record in self._tasks.values():
            counts[record.name][record.status] += 1
            if record.status in TERMINAL_STATUSES and record.duration is not None:
                durations[record.name].append(record.duration)
        return build_metrics(counts, durations)

    async def claim(self, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        if record is None or not _is_claimable(record, now):
            return None
        if record.owner not in (None, instance_id):
            return None
        return self._start_attempt(record, instance_id, now)

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int
    ) -> builtins.list[TaskRecord]:
        ready = sorted(
            (
                record
                for record in self._tasks.values()
                if record.owner is None and _is_claimable(record, now)
            ),
            key=lambda record: (record.created_at, record.id),
        )
        return [self._start_attempt(record, instance_id, now) for record in ready[:limit]]

    async def finish(
        self, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
    ) -> bool:
        record = self._tasks.get(task_id)
        if (
            record is None
            or record.status is not TaskStatus.RUNNING
            or record.owner != instance_id
            or record.attempts != attempt
        ):
            return False

        apply_outcome(record, outcome)
        return True

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        record = self._tasks.get(task_id)
        if record is not None:
            record.logs.extend(entry.model_copy() for entry in entries)

    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        self._leases[instance_id] = expires_at
        return [
            record.id
            for record in self._tasks.values()
            if record.owner == instance_id
            and record.status is TaskStatus.RUNNING
            and record.cancel_requested
        ]

    async def recover_expired(self, now: datetime) -> RecoveryReport:
        expired = {owner for owner, expires_at in self._leases.items() if expires_at < now}
        for owner in expired:
            del self._leases[owner]

        report = RecoveryReport()
        for record in self._tasks.values():
            if record.owner is not None and record.owner not in self._leases:
                take_back(record, now, report)
        return report

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        self._leases.pop(instance_id, None)
        report = RecoveryReport()
        for record in self._tasks.values():
            if record.owner == instance_id:
                take_back(record, now, report)
        return report

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        check_cancellable(record)
        if record.status is TaskStatus.PENDING:
            record.status = TaskStatus.CANCELLED
            record.finished_at = now
            record.scheduled_at = None
            record.owner = None
        else:
            record.cancel_requested = True
        return record.model_copy(deep=True)

    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        check_retryable(record)
        holder = self._holder_of_key(record.idempotency_key)
        if holder is not None and holder.id != record.id:
            raise TaskStateError(
                f"Task {task_id} cannot be retried: its idempotency key "
                f"{record.idempotency_key!r} is now held by task {holder.id}."
            )
        requeue(record, extra_attempts)
        return record.model_copy(deep=True)

    def _holder_of_key(self, key: str | None) -> TaskRecord | None:
        if key is None:
            return None
        for record in self._tasks.values():
            if record.idempotency_key == key and record.status in IDEMPOTENCY_HOLDING_STATUSES:
                return record
        return None

    def _start_attempt(self, record: TaskRecord, instance_id: str, now: datetime) -> TaskRecord:
        record.status = TaskStatus.RUNNING
        record.owner = instance_id
        record.started_at = now
        record.scheduled_at = None
        record.attempts += 1
        record.attempt_history.append(
            AttemptRecord(number=record.attempts, instance_id=instance_id, started_at=now)
        )
        return record.model_copy(deep=True)


def _is_claimable(record: TaskRecord, now: datetime) -> bool:
    return (
        record.status is TaskStatus.PENDING
        and not record.cancel_requested
        and (record.scheduled_at is None or record.scheduled_at <= now)
    )


def check_same_task(existing: TaskRecord, new: TaskRecord) -> None:
    """Raise ``IdempotencyConflictError`` unless both records describe the same call."""
    if (existing.name, existing.args, existing.kwargs) != (new.name, new.args, new.kwargs):
        raise IdempotencyConflictError(
            f"Idempotency key {new.idempotency_key!r} is already used by task {existing.id} "
            f"({existing.name} with args={existing.args!r}, kwargs={existing.kwargs!r}); "
            f"it cannot be reused for {new.name} with args={new.args!r}, "
            f"kwargs={new.kwargs!r}. Use a new key for a different call."
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
