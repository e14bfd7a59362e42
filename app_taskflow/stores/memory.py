"""MemoryStore: tasks kept in one process's memory, for tests and throwaway apps."""

from __future__ import annotations

import builtins
import heapq
import json
from collections import defaultdict
from collections.abc import AsyncGenerator, Collection, Sequence
from datetime import datetime, timedelta

from app_taskflow.errors import TaskNotFoundError, TaskStateError
from app_taskflow.events import ChangeFanout
from app_taskflow.models import (
    IDEMPOTENCY_HOLDING_STATUSES,
    TERMINAL_STATUSES,
    AttemptOutcome,
    AttemptRecord,
    LogEntry,
    RecoveryReport,
    TaskChange,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    TaskStatus,
    decode_cursor,
)
from app_taskflow.stores.base import TaskStore, build_metrics, build_page
from app_taskflow.stores.records import (
    apply_outcome,
    cancel_record,
    check_retryable,
    check_same_task,
    is_claimable,
    requeue,
    take_back,
)


class MemoryStore(TaskStore):
    """A store that lives in the memory of one process and is lost when it exits.

    Every method runs without awaiting, so each is atomic on the event loop. It cannot be
    shared between processes.
    """

    supports_multiple_instances = False

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._leases: dict[str, datetime] = {}
        self._key_holders: dict[str, str] = {}
        self._changes = ChangeFanout()

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        ids: list[str] = []
        for record in records:
            existing = self._holder_of_key(record.idempotency_key)
            if existing is not None:
                check_same_task(existing, record)
                ids.append(existing.id)
                continue
            stored = _copy(record)
            self._tasks[record.id] = stored
            if record.idempotency_key is not None:
                self._key_holders[record.idempotency_key] = record.id
            self._publish(stored)
            ids.append(record.id)
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        return None if record is None else _copy(record)

    async def list(self, query: TaskQuery) -> TaskPage:
        newest_first = query.order == "newest"
        after = decode_cursor(query.cursor) if query.cursor else None
        search = query.search.casefold() if query.search else None
        matching = [
            record
            for record in self._tasks.values()
            if (query.statuses is None or record.status in query.statuses)
            and (query.name is None or record.name == query.name)
            and (not query.tags or _has_tags(record, query.tags))
            and (search is None or _mentions(record, search))
            and (after is None or _is_after(record, after, newest_first))
        ]
        matching.sort(key=lambda record: (record.created_at, record.id), reverse=newest_first)
        offset = 0 if after is not None else query.offset
        window = matching[offset : offset + query.limit + 1]
        return build_page([record.summary() for record in window], query.limit, offset)

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
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        # nsmallest keeps only ``limit`` candidates, rather than sorting every waiting task
        # at each call, which a backlog of thousands makes slow.
        ready = heapq.nsmallest(
            limit,
            (
                record
                for record in self._tasks.values()
                if record.owner is None and record.name in names and _is_claimable(record, now)
            ),
            key=lambda record: (record.created_at, record.id),
        )
        return [self._start_attempt(record, instance_id, now) for record in ready]

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
        self._publish(record)
        return True

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        record = self._tasks.get(task_id)
        if record is None:
            return
        for entry in entries:
            record.logs.append(entry.model_copy())
            if self._changes.has_watchers:
                self._changes.publish(TaskChange(task_id=task_id, log=entry.model_copy()))

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

    async def earliest_lease_end(self) -> datetime | None:
        return min(self._leases.values(), default=None)

    async def recover_expired(self, now: datetime) -> RecoveryReport:
        expired = {owner for owner, expires_at in self._leases.items() if expires_at < now}
        for owner in expired:
            del self._leases[owner]

        report = RecoveryReport()
        for record in self._tasks.values():
            if record.owner is not None and record.owner not in self._leases:
                take_back(record, now, report)
                self._publish(record)
        return report

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        self._leases.pop(instance_id, None)
        report = RecoveryReport()
        for record in self._tasks.values():
            if record.owner == instance_id:
                take_back(record, now, report)
                self._publish(record)
        return report

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        cancel_record(record, now)
        self._publish(record)
        return _copy(record)

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
        if record.idempotency_key is not None:
            self._key_holders[record.idempotency_key] = record.id
        self._publish(record)
        return _copy(record)

    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        finished = sorted(
            (record for record in self._tasks.values() if record.status in TERMINAL_STATUSES),
            key=lambda record: (record.finished_at or record.created_at, record.id),
            reverse=True,
        )
        doomed = finished[max_count:] if max_count is not None else []
        if max_age is not None:
            cutoff = now - timedelta(seconds=max_age)
            doomed.extend(
                record
                for record in finished[: len(finished) - len(doomed)]
                if (record.finished_at or record.created_at) < cutoff
            )
        for record in doomed:
            del self._tasks[record.id]
            key = record.idempotency_key
            if key is not None and self._key_holders.get(key) == record.id:
                del self._key_holders[key]
        return len(doomed)

    def watch(self) -> AsyncGenerator[TaskChange, None]:
        return self._changes.watch()

    def _publish(self, record: TaskRecord) -> None:
        if self._changes.has_watchers:
            self._changes.publish(TaskChange(task_id=record.id, summary=record.summary()))

    def _holder_of_key(self, key: str | None) -> TaskRecord | None:
        if key is None:
            return None
        record = self._tasks.get(self._key_holders.get(key, ""))
        if record is None or record.status not in IDEMPOTENCY_HOLDING_STATUSES:
            return None
        return record

    def _start_attempt(self, record: TaskRecord, instance_id: str, now: datetime) -> TaskRecord:
        record.status = TaskStatus.RUNNING
        record.owner = instance_id
        record.started_at = now
        record.scheduled_at = None
        record.attempts += 1
        record.attempt_history.append(
            AttemptRecord(number=record.attempts, instance_id=instance_id, started_at=now)
        )
        self._publish(record)
        return _copy(record)


def _copy(record: TaskRecord) -> TaskRecord:
    """Return a copy that shares no mutable part with ``record``.

    Cheaper than ``model_copy(deep=True)``: args, kwargs, tags and origin are values that
    neither the store nor its callers change in place, so only the lists and models that the
    store changes later are copied.
    """
    return record.model_copy(
        update={
            "logs": list(record.logs),
            "attempt_history": [attempt.model_copy() for attempt in record.attempt_history],
        }
    )


def _mentions(record: TaskRecord, folded_text: str) -> bool:
    haystacks = [
        record.id,
        record.name,
        json.dumps(record.args, ensure_ascii=False),
        json.dumps(record.kwargs, ensure_ascii=False),
        record.error_type or "",
        record.error_message or "",
        *(entry.message for entry in record.logs),
    ]
    return any(folded_text in haystack.casefold() for haystack in haystacks)


def _has_tags(record: TaskRecord, tags: dict[str, str]) -> bool:
    return all(record.tags.get(key) == value for key, value in tags.items())


def _is_after(record: TaskRecord, cursor: tuple[datetime, str], newest_first: bool) -> bool:
    position = (record.created_at, record.id)
    return position < cursor if newest_first else position > cursor


def _is_claimable(record: TaskRecord, now: datetime) -> bool:
    return is_claimable(record.status, record.cancel_requested, record.scheduled_at, now)
