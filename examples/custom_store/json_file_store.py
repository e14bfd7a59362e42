"""JsonFileStore: tasks kept in memory and saved to one JSON file after every change."""

from __future__ import annotations

import asyncio
import builtins
import json
import os
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from app_taskflow.errors import StoreError, TaskNotFoundError, TaskStateError
from app_taskflow.events import ChangeFanout
from app_taskflow.logs import log
from app_taskflow.models import (
    ACTIVE_STATUSES,
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
from examples.custom_store.snapshot_file import (
    dump_snapshot,
    lock_exclusively,
    parse_snapshot,
    read_snapshot,
    replace_atomically,
)


@dataclass
class _Batch:
    """Changes made in memory between two snapshots, which are saved or undone together."""

    changed: bool = False
    saved: bool = False
    error: Exception | None = None
    """The error of the save that failed, after which the changes were undone."""


class JsonFileStore(TaskStore):
    """A store that keeps tasks in memory and rewrites one JSON file after every change.

    A write method changes the records in memory without awaiting in between, so on the
    one event loop that calls it, no other call finds the change half done. Only then does
    the method await the save, and it returns once the file contains its change: a task id
    that a route returns survives a crash of the process. Reads and ``watch()`` see a
    change as soon as it is made in memory, a moment before the file contains it.

    A save that fails undoes every change that the file lacks, as a rolled-back transaction
    would: the store reloads the last saved snapshot, each call whose change was undone
    raises ``StoreError``, and watchers receive a resync. A call retried after the error
    therefore finds the task as it was before.

    Only one process may use the file: ``open()`` locks ``<path>.lock`` and raises
    ``StoreError`` while another store holds that lock. Instance leases are therefore kept
    in memory only. An owner found in the file after a restart is a process that stopped,
    so ``recover_expired`` takes its tasks back at once.

    NOTE: every save serializes all tasks on the event loop and rewrites the whole file,
    and the store keeps the last saved file in memory for undoing. Each change thus costs
    time and memory in proportion to the tasks kept: prune finished tasks, or use
    ``SqlStore`` for a long history. The lock uses ``fcntl``, so this runs on POSIX only.

    Args:
        path: the JSON file, created with the first change, and its folder when missing.
    """

    # The contract suite skips its tests of a second instance on the same data, and the
    # docs tell users to run one process.
    supports_multiple_instances = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._tasks: dict[str, TaskRecord] = {}
        self._key_holders: dict[str, str] = {}
        self._leases: dict[str, datetime] = {}
        self._changes = ChangeFanout()
        self._lock_file: BinaryIO | None = None
        # The file's content as last written, which a failed save loads again to undo.
        self._saved_data = b""
        # The changes made since the last snapshot, and the write in progress, if any.
        self._batch = _Batch()
        self._writing: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._lock_file = await asyncio.to_thread(lock_exclusively, self._path)
        try:
            data = await asyncio.to_thread(read_snapshot, self._path)
            self._load(parse_snapshot(self._path, data))
        except BaseException:
            # The caller does not close a store that failed to open.
            self._lock_file.close()
            self._lock_file = None
            raise
        self._saved_data = data

    async def close(self) -> None:
        try:
            # Waits for a running write, and saves the changes of callers cancelled while
            # they waited for an earlier write.
            await self._save()
        finally:
            if self._lock_file is not None:
                self._lock_file.close()  # closing the file releases its lock
                self._lock_file = None

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        ids: list[str] = []
        try:
            for record in records:
                # The key check and the insert run with no await between them, so of two
                # concurrent creates with one key, the second finds the first one's task.
                holder = self._holder_of_key(record.idempotency_key)
                if holder is not None:
                    check_same_task(holder, record)
                    ids.append(holder.id)
                    continue
                stored = record.model_copy(deep=True)
                self._tasks[stored.id] = stored
                if stored.idempotency_key is not None:
                    self._key_holders[stored.idempotency_key] = stored.id
                self._changed(stored)
                ids.append(stored.id)
        finally:
            # Runs after a conflict too, because the records before it stay inserted. It
            # also waits when a holder's id is returned whose own save is still running.
            await self._save()
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.get(task_id)
        return None if record is None else record.model_copy(deep=True)

    async def list(self, query: TaskQuery) -> TaskPage:
        newest_first = query.order == "newest"
        text = query.search.casefold() if query.search else None
        matching = [
            record
            for record in self._tasks.values()
            if (query.statuses is None or record.status in query.statuses)
            and (query.name is None or record.name == query.name)
            and (not query.tags or _has_tags(record, query.tags))
            and (text is None or _mentions(record, text))
        ]
        matching.sort(key=_position, reverse=newest_first)

        offset = query.offset
        if query.cursor:
            # The task that the cursor names may be gone, so the page starts at the first
            # position past the cursor's rather than after a task found by id.
            after = decode_cursor(query.cursor)
            offset = 0
            matching = [
                record
                for record in matching
                if (_position(record) < after if newest_first else _position(record) > after)
            ]
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
        if (
            record is None
            or record.owner not in (None, instance_id)
            or not _is_claimable(record, now)
        ):
            return None
        # The check above and this change run with no await between them, so of any number
        # of concurrent claims, only the first finds the task PENDING.
        claimed = self._start_attempt(record, instance_id, now)
        await self._save()
        return claimed

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        ready = [
            record
            for record in self._tasks.values()
            if record.owner is None and record.name in names and _is_claimable(record, now)
        ]
        ready.sort(key=_position)
        claimed = [self._start_attempt(record, instance_id, now) for record in ready[:limit]]
        if claimed:
            await self._save()  # one write for the whole batch
        return claimed

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
        self._changed(record)
        await self._save()
        return True

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        record = self._tasks.get(task_id)
        if record is None or not entries:
            return
        for entry in entries:
            record.logs.append(entry.model_copy(deep=True))
            if self._changes.has_watchers:
                self._changes.publish(TaskChange(task_id=task_id, log=entry.model_copy(deep=True)))
        self._batch.changed = True
        await self._save()

    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        # Leases are not saved (see the class docstring), so a heartbeat writes no file.
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
        for instance_id, expires_at in list(self._leases.items()):
            if expires_at < now:
                del self._leases[instance_id]
        return await self._take_back(lambda owner: owner not in self._leases, now)

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        self._leases.pop(instance_id, None)
        return await self._take_back(lambda owner: owner == instance_id, now)

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        record = self._find(task_id)
        cancel_record(record, now)
        self._changed(record)
        await self._save()
        return record.model_copy(deep=True)

    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        record = self._find(task_id)
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
        self._changed(record)
        await self._save()
        return record.model_copy(deep=True)

    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        finished = [record for record in self._tasks.values() if record.status in TERMINAL_STATUSES]
        finished.sort(key=lambda record: (_finished_at(record), record.id))
        doomed: set[str] = set()
        if max_count is not None:
            doomed.update(record.id for record in finished[: max(len(finished) - max_count, 0)])
        if max_age is not None:
            cutoff = now - timedelta(seconds=max_age)
            doomed.update(record.id for record in finished if _finished_at(record) < cutoff)
        if not doomed:
            return 0

        for task_id in doomed:
            key = self._tasks.pop(task_id).idempotency_key
            if key is not None and self._key_holders.get(key) == task_id:
                del self._key_holders[key]
        self._batch.changed = True
        await self._save()
        return len(doomed)

    def watch(self) -> AsyncGenerator[TaskChange, None]:
        # Only this process writes the file, so the changes published here are all there
        # are, and the fan-out needs no feed from outside.
        return self._changes.watch()

    async def _take_back(self, is_gone: Callable[[str], bool], now: datetime) -> RecoveryReport:
        report = RecoveryReport()
        orphans = [
            record
            for record in self._tasks.values()
            if record.owner is not None
            and record.status in ACTIVE_STATUSES
            and is_gone(record.owner)
        ]
        for record in orphans:
            take_back(record, now, report)
            self._changed(record)
        if orphans:
            await self._save()
        return report

    def _find(self, task_id: str) -> TaskRecord:
        record = self._tasks.get(task_id)
        if record is None:
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        return record

    def _holder_of_key(self, key: str | None) -> TaskRecord | None:
        record = self._tasks.get(self._key_holders.get(key, "")) if key else None
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
        self._changed(record)
        return record.model_copy(deep=True)

    def _changed(self, record: TaskRecord) -> None:
        """Mark the change for the next save, and send the task's new summary to watchers."""
        self._batch.changed = True
        if self._changes.has_watchers:
            self._changes.publish(TaskChange(task_id=record.id, summary=record.summary()))

    def _load(self, tasks: Iterable[TaskRecord]) -> None:
        self._tasks = {record.id: record for record in tasks}
        self._key_holders = {
            record.idempotency_key: record.id
            for record in self._tasks.values()
            if record.idempotency_key and record.status in IDEMPOTENCY_HOLDING_STATUSES
        }

    async def _save(self) -> None:
        """Return once the file contains the changes made so far, or raise if they were undone.

        One write runs at a time. Callers that arrive during a write wait for it, and the
        next write saves all their changes at once (a group commit).
        """
        batch = self._batch
        while not batch.saved:
            if batch.error is not None:
                raise StoreError(
                    f"Saving tasks to {self._path} failed: {batch.error}. The change was "
                    "undone, so repeat the call once the cause is fixed, such as a full disk "
                    "or a folder that is not writable."
                ) from batch.error
            if self._writing is None:
                # With no write running, an unsaved batch is the current one.
                if not batch.changed:
                    return
                self._writing = asyncio.create_task(self._write())
            # Shielded, so that a caller cancelled meanwhile does not stop the write halfway.
            await asyncio.shield(self._writing)

    async def _write(self) -> None:
        # The batch switch and the snapshot happen together on the event loop, so the
        # snapshot contains exactly the changes of this batch and of those before it.
        batch, self._batch = self._batch, _Batch()
        try:
            data = dump_snapshot(self._tasks.values())
            await asyncio.to_thread(replace_atomically, self._path, data)
        except Exception as error:
            # Logged here because the callers that would raise it may have been cancelled.
            log.warning(
                "Saving tasks to {} failed, and the changes since the last save were undone: {}",
                self._path,
                error,
            )
            # The reload also drops the changes made during the write, so they fail too.
            batch.error = error
            self._batch.error = error
            self._batch = _Batch()
            self._load(parse_snapshot(self._path, self._saved_data))
            if self._changes.has_watchers:
                self._changes.publish(TaskChange(resync=True))
        else:
            batch.saved = True
            self._saved_data = data
        finally:
            self._writing = None


def _position(record: TaskRecord) -> tuple[datetime, str]:
    return record.created_at, record.id


def _finished_at(record: TaskRecord) -> datetime:
    # Every path to a terminal status sets finished_at, so created_at only satisfies the type.
    return record.finished_at or record.created_at


def _is_claimable(record: TaskRecord, now: datetime) -> bool:
    return is_claimable(record.status, record.cancel_requested, record.scheduled_at, now)


def _has_tags(record: TaskRecord, tags: dict[str, str]) -> bool:
    """Return whether the task carries every one of ``tags``."""
    return all(record.tags.get(key) == value for key, value in tags.items())


def _mentions(record: TaskRecord, folded_text: str) -> bool:
    """Return whether a searched field or log message of the task contains the text."""
    fields = [
        record.id,
        record.name,
        json.dumps(record.args, ensure_ascii=False),
        json.dumps(record.kwargs, ensure_ascii=False),
        record.error_type or "",
        record.error_message or "",
        *(entry.message for entry in record.logs),
    ]
    return any(folded_text in field.casefold() for field in fields)
