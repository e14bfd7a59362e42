"""TaskStore: the contract every store implements."""

from __future__ import annotations

import builtins
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Collection, Iterable, Mapping, Sequence
from datetime import datetime

from app_taskflow.models import (
    AttemptOutcome,
    DurationStats,
    LogEntry,
    NameMetrics,
    RecoveryReport,
    TaskChange,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    TaskStatus,
    TaskSummary,
    encode_cursor,
)


class TaskStore(ABC):
    """The single source of truth for tasks, attempts, logs and instance leases.

    Every method is a coroutine and must not block the event loop: a store whose driver is
    synchronous runs its calls in worker threads. Times passed in are aware UTC datetimes,
    and the store keeps them as given (the caller owns the clock, so tests can fix it).

    Atomicity: each method is atomic on its own. ``create``, ``claim``, ``finish``,
    ``cancel``, ``retry``, ``recover_expired`` and ``release`` are read-modify-write steps
    that must stay correct when several instances in several processes call them on the
    same store at once. A store that cannot offer that in some setting states it in its
    documentation and in ``supports_multiple_instances``.

    Errors: driver failures are raised as ``StoreError`` with the driver's exception as
    ``__cause__``. Transient conflicts (such as SQLite's "database is locked") are retried
    inside the store and never surface as a lost write.
    """

    supports_multiple_instances: bool = True
    """Whether several processes may share this store safely."""

    async def open(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Connect and create or migrate the schema. Called once at startup."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release connections. Called once at shutdown; the store is not used again."""

    @abstractmethod
    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        """Insert new PENDING tasks and return their ids, in order.

        Args:
            records: new tasks, each with a fresh id, status ``PENDING`` and ``owner`` set
                to the instance that will run it (or ``None`` for any instance). Their
                ``tags``, ``origin`` and ``trace_parent`` never change afterwards. Every
                method that returns a ``TaskRecord`` returns them, and summaries carry
                the ``tags``.

        Returns:
            One id per record: the record's own id, or, when the record carries an
            ``idempotency_key`` already held by a task in ``IDEMPOTENCY_HOLDING_STATUSES``
            with the same name, args and kwargs, the id of that task (nothing is inserted
            for it).

        Raises:
            IdempotencyConflictError: the key is held by a task with another name or other
                arguments. Records before it in the batch stay inserted.

        Atomicity: the key check and the insert of each record are one atomic step, so two
        instances creating the same key at once get the same id.
        """

    @abstractmethod
    async def get(self, task_id: str) -> TaskRecord | None:
        """Return the task with its logs and attempt history, or ``None`` if unknown."""

    @abstractmethod
    async def list(self, query: TaskQuery) -> TaskPage:
        """Return one page of tasks matching ``query``, in the order it requests.

        Tasks are ordered by ``created_at`` and then by id (both descending for
        ``newest``), so pages never overlap. ``search`` matches as ``TaskQuery`` describes, and
        ``tags`` keeps the tasks whose ``tags`` contain every key with the value given.
        With ``cursor``, the page starts after the task it names and ``offset`` is
        ignored (the page reports offset 0). ``next_cursor`` is set when ``has_more`` is.

        Raises:
            ValueError: ``query.cursor`` is not a cursor from ``next_cursor``.
        """

    @abstractmethod
    async def metrics(self) -> TaskMetrics:
        """Return counts per status, success rate and durations, overall and per name.

        Durations are those of finished tasks (``duration`` of their last attempt).
        ``build_metrics`` turns raw counts and durations into the model.
        """

    @abstractmethod
    async def claim(self, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
        """Start the next attempt of one task if it is free to run.

        The task is claimed when its status is ``PENDING``, its ``owner`` is ``None`` or
        ``instance_id``, its ``scheduled_at`` is ``None`` or not after ``now``, and no
        cancel was requested. Claiming sets status ``RUNNING``, ``owner`` to
        ``instance_id``, ``started_at`` to ``now``, increments ``attempts`` and appends an
        ``AttemptRecord`` with that number.

        Returns:
            The claimed task (logs may be omitted), or ``None`` when it was not free.

        Atomicity: of any number of concurrent claims of one task, at most one succeeds.
        """

    @abstractmethod
    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        """Claim up to ``limit`` ownerless PENDING tasks that are due, oldest first.

        These are tasks released at shutdown, recovered from a dead instance or queued
        again by ``retry``. Only tasks whose name is in ``names`` (the tasks the calling
        instance can run) are claimed, so that during a rolling deploy an instance never
        takes a task whose code it lacks. Each is claimed exactly as ``claim`` does.
        """

    @abstractmethod
    async def finish(
        self, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
    ) -> bool:
        """Record how attempt number ``attempt`` ended.

        ``outcome.status`` is a terminal status, or ``PENDING`` with ``scheduled_at`` when
        another attempt follows; the task then stays owned by ``instance_id``. A
        ``PENDING`` outcome for a task whose cancel was requested is stored as
        ``CANCELLED`` instead. The matching ``AttemptRecord`` gets the end time, the error
        and a status: the outcome's, or ``FAILED`` for a ``PENDING`` outcome. A terminal
        outcome clears ``cancel_requested``; ``SUCCESS`` also clears ``traceback``.

        Returns:
            ``True`` when written; ``False`` when the task is no longer ``RUNNING`` under
            ``instance_id`` with that attempt number (it was recovered by another instance
            after this one lost its lease), in which case nothing is changed.
        """

    @abstractmethod
    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        """Append log entries to a task, keeping their order. Unknown ids are ignored."""

    @abstractmethod
    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        """Create or renew the lease of an instance until ``expires_at``.

        Returns:
            Ids of RUNNING tasks owned by ``instance_id`` whose cancel was requested, so
            that a cancel sent to any instance reaches the one running the task.
        """

    @abstractmethod
    async def recover_expired(self, now: datetime) -> RecoveryReport:
        """Take back the tasks of every instance whose lease expired before ``now``.

        Tasks count as orphaned when their owner has no lease or an expired one. Their
        PENDING tasks lose their owner (keeping ``scheduled_at``). Their RUNNING tasks
        become ``INTERRUPTED`` with ``finished_at = now``, or ``PENDING`` without owner
        when ``requeue_on_interrupt`` is set; either way ``attempts`` is kept and the
        current ``AttemptRecord`` ends as ``INTERRUPTED``. An interrupted task's
        ``duration`` is the time from ``started_at`` to ``now``. Expired leases are deleted.

        A store may take back at most a bounded batch of tasks per call, oldest first, so
        that no call blocks the store for long. The tasks left then have an owner without a
        lease, and callers repeat the call until it returns an empty report.

        Atomicity: each task is taken back by at most one caller.
        """

    async def earliest_lease_end(self) -> datetime | None:
        """Return the earliest ``expires_at`` among the stored leases, expired ones included.

        The dispatcher calls this every poll interval, because it reads the leases alone,
        while ``recover_expired`` reads every active task. It calls ``recover_expired``
        once the returned time is past, and sleeps until then when it comes before the
        next poll. A store without a cheap way to tell keeps this default, which returns
        ``None`` as when no lease is stored, and its instances recover at the full pass
        of every heartbeat interval only.
        """
        return None

    @abstractmethod
    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        """Hand back every task of one instance at shutdown and delete its lease.

        Does for ``instance_id`` what ``recover_expired`` does for an expired instance,
        regardless of its lease.
        """

    @abstractmethod
    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        """Cancel a task.

        A PENDING task becomes ``CANCELLED`` with ``finished_at = now`` and never runs.
        A RUNNING task gets ``cancel_requested = True`` and keeps running until its
        instance stops it.

        Raises:
            TaskNotFoundError: no task has this id.
            TaskStateError: the task is already finished.
        """

    @abstractmethod
    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        """Queue a FAILED or INTERRUPTED task again as a new attempt of the same task.

        The task becomes ``PENDING`` without owner, with ``scheduled_at``,
        ``finished_at``, ``error_type``, ``error_message`` and ``cancel_requested``
        cleared and ``max_attempts = attempts + extra_attempts``. Its attempt history,
        logs and last traceback stay.

        Raises:
            TaskNotFoundError: no task has this id.
            TaskStateError: the task is not FAILED or INTERRUPTED, or its idempotency key
                is now held by another task.
        """

    @abstractmethod
    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        """Delete finished tasks with their attempts and logs; return how many were deleted.

        A task in ``TERMINAL_STATUSES`` is deleted when its ``finished_at`` is more than
        ``max_age`` seconds before ``now``, or when it is not among the ``max_count`` most
        recently finished ones. ``None`` turns either rule off. PENDING and RUNNING tasks
        are never deleted. A store may delete at most a batch per call so that no single
        transaction locks it for long. Callers repeat the call until it returns 0.
        """

    @abstractmethod
    def watch(self) -> AsyncGenerator[TaskChange, None]:
        """Yield every change to tasks made by any instance from now on, in order per task.

        Every write method above that changes a task (``create``, ``claim``,
        ``claim_next``, ``finish``, ``cancel``, ``retry``, ``recover_expired``,
        ``release``) yields a change with the task's new summary, and ``append_logs``
        yields one change per entry. Changes made by other instances on a shared store
        arrive within about a second. Delivery is at most once: a watcher that falls
        behind receives a change with ``resync`` set in place of the ones it missed.
        The subscription starts with the first ``__anext__``, and on a shared store it may
        take a moment to be live, so a consumer that mirrors tasks reads the store after
        its first change or resync rather than before subscribing. ``aclose()`` frees the
        watcher's resources; leaving ``async for`` by ``break`` frees them only when the
        generator is garbage-collected.
        """


def build_page(found: Sequence[TaskSummary], limit: int, offset: int) -> TaskPage:
    """Build a page from up to ``limit + 1`` tasks read in page order.

    The task past ``limit`` is not shown: it only tells that another page follows.
    """
    items = list(found[:limit])
    has_more = len(found) > limit
    return TaskPage(
        items=items,
        limit=limit,
        offset=offset,
        has_more=has_more,
        next_cursor=encode_cursor(items[-1]) if has_more else None,
    )


def build_metrics(
    counts: Mapping[str, Mapping[TaskStatus, int]],
    durations: Mapping[str, Iterable[float]],
) -> TaskMetrics:
    """Build ``TaskMetrics`` from counts and durations keyed by task name."""
    by_name: dict[str, NameMetrics] = {}
    all_counts: dict[TaskStatus, int] = dict.fromkeys(TaskStatus, 0)
    all_durations: list[float] = []

    for name in sorted(set(counts) | set(durations)):
        name_counts = dict.fromkeys(TaskStatus, 0)
        name_counts.update(counts.get(name, {}))
        name_durations = sorted(durations.get(name, ()))
        for status, count in name_counts.items():
            all_counts[status] += count
        all_durations.extend(name_durations)
        by_name[name] = NameMetrics(
            counts=name_counts,
            success_rate=_success_rate(name_counts),
            duration=_duration_stats(name_durations),
        )

    all_durations.sort()
    return TaskMetrics(
        counts=all_counts,
        success_rate=_success_rate(all_counts),
        duration=_duration_stats(all_durations),
        by_name=by_name,
    )


def _success_rate(counts: Mapping[TaskStatus, int]) -> float | None:
    ended = counts[TaskStatus.SUCCESS] + counts[TaskStatus.FAILED] + counts[TaskStatus.INTERRUPTED]
    if ended == 0:
        return None
    return counts[TaskStatus.SUCCESS] / ended


def _duration_stats(sorted_durations: Sequence[float]) -> DurationStats:
    if not sorted_durations:
        return DurationStats()
    return DurationStats(
        count=len(sorted_durations),
        mean=sum(sorted_durations) / len(sorted_durations),
        p50=percentile(sorted_durations, 0.50),
        p95=percentile(sorted_durations, 0.95),
    )


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of values sorted ascending."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]
