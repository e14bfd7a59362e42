"""Claiming and running tasks: concurrency, retry timers, leases, recovery and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Literal, TypeVar

from app_taskflow.context import TaskContext
from app_taskflow.errors import StoreError
from app_taskflow.logs import bind_task, log
from app_taskflow.models import (
    AttemptOutcome,
    RecoveryReport,
    TaskRecord,
    TaskStatus,
    utcnow,
)
from app_taskflow.outage import MAX_BACKOFF, StoreCaller, StoreHealth, TaskBuffer
from app_taskflow.runner import MAX_ERROR_MESSAGE_CHARS, Runner, decide_outcome, safe_text
from app_taskflow.stores.base import TaskStore
from app_taskflow.tasks import TaskRegistry
from app_taskflow.timeline import TaskTimeline

T = TypeVar("T")

_BUFFER_BATCH = 500
_MAX_CLAIM = 100
"""Maximum number of tasks that one ``claim_next`` call claims."""
_CLAIM_BATCH_DIVISOR = 2
"""Under a backlog, the poll loop claims once half the slots (at most ``_MAX_CLAIM``) are free."""
_CLAIM_COALESCE_DELAY = 0.05
"""Maximum seconds a free slot waits for others to free up, so that one claim fills them all."""
_LEASE_END_MARGIN = 0.01
"""Seconds after the end of a lease at which the recovery loop looks again."""


@dataclass(frozen=True)
class DispatcherSettings:
    """How many tasks run at once, and the timings of leases, polling and shutdown.

    Attributes:
        max_concurrency: tasks of this instance running at once, sync and async together.
        sync_workers: threads for sync task functions.
        heartbeat_interval: seconds between renewals of this instance's lease, and between
            full recovery passes, which also take back tasks whose owner has no lease.
        lease_expiry: seconds a lease lasts without renewal; after that, other instances
            take back this instance's tasks.
        poll_interval: seconds between looks for tasks that no instance owns, and between
            reads of when the next lease ends.
        shutdown_grace: seconds running tasks get to finish at shutdown.
        retry_delay_scale: factor applied to every retry delay (0 makes retries immediate).
        outage_policy: what ``add_task`` does while the store is unreachable: ``raise``
            (the request fails with 503) or ``buffer`` (tasks wait in memory).
        outage_buffer_size: tasks the outage buffer holds; when full, ``raise`` applies.
        retention_max_age: seconds a finished task is kept; ``None`` keeps them all.
        retention_max_count: finished tasks kept at most; ``None`` for no limit.
        retention_interval: seconds between two prunes.
    """

    max_concurrency: int = 100
    sync_workers: int = 8
    heartbeat_interval: float = 5.0
    lease_expiry: float = 30.0
    poll_interval: float = 1.0
    shutdown_grace: float = 10.0
    retry_delay_scale: float = 1.0
    outage_policy: Literal["raise", "buffer"] = "raise"
    outage_buffer_size: int = 10_000
    retention_max_age: float | None = 14 * 24 * 3600.0
    retention_max_count: int | None = None
    retention_interval: float = 60.0


_STORE_FAILURE_TYPE = "app_taskflow.errors.StoreError"


def _internal_failure(
    error: BaseException, finished_at: datetime, duration: float = 0.0
) -> AttemptOutcome:
    """Return a FAILED outcome for an error of the library or the store, not of the task."""
    error_type = type(error)
    return AttemptOutcome(
        status=TaskStatus.FAILED,
        finished_at=finished_at,
        duration=duration,
        error_type=_STORE_FAILURE_TYPE
        if isinstance(error, StoreError)
        else f"{error_type.__module__}.{error_type.__qualname__}",
        error_message=safe_text(str(error), MAX_ERROR_MESSAGE_CHARS),
    )


def _add_batch(report: RecoveryReport, batch: RecoveryReport) -> bool:
    """Add the tasks of one ``recover_expired`` call to ``report``; return whether it had any."""
    report.released.extend(batch.released)
    report.requeued.extend(batch.requeued)
    report.interrupted.extend(batch.interrupted)
    return bool(batch.released or batch.requeued or batch.interrupted)


def new_instance_id() -> str:
    """Return an id for this app instance: host, process id and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Dispatcher:
    """Claims tasks in the store and runs them, at most ``max_concurrency`` at a time.

    A task runs only after ``store.claim`` gave it to this instance. Retry waits are timers
    on the event loop, so a waiting task takes no thread and no concurrency slot.
    """

    def __init__(
        self,
        store: TaskStore,
        registry: TaskRegistry,
        runner: Runner,
        settings: DispatcherSettings,
        instance_id: str,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self._registry = registry
        self._runner = runner
        self._settings = settings
        self._clock = clock
        self._queue: deque[tuple[str, str]] = deque()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._contexts: dict[str, TaskContext] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._names: dict[str, str] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.health = StoreHealth()
        self._store_call = StoreCaller(self.health, lambda: self._stopping)
        self.timeline = TaskTimeline(instance_id)
        self._buffer = TaskBuffer(settings.outage_buffer_size)
        self._buffer_ready = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._claim_batch_size = max(
            1, min(settings.max_concurrency, _MAX_CLAIM) // _CLAIM_BATCH_DIVISOR
        )
        self._poll_now = asyncio.Event()
        self._lease_valid_until = 0.0
        """Loop time until which this instance's lease lasts at least, from its last renewal."""

    @property
    def running_count(self) -> int:
        """Number of tasks being claimed or run by this instance."""
        return len(self._active)

    async def start(self) -> None:
        """Take the lease, recover orphaned tasks and start the background loops."""
        await self._renew_lease()
        recovered = RecoveryReport()
        while _add_batch(recovered, await self.store.recover_expired(self._clock())):
            pass
        self._log_recovery(recovered)
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name="app-taskflow-heartbeat"),
            asyncio.create_task(self._recovery_loop(), name="app-taskflow-recovery"),
            asyncio.create_task(self._poll_loop(), name="app-taskflow-poll"),
            asyncio.create_task(self._buffer_loop(), name="app-taskflow-buffer"),
            asyncio.create_task(self._retention_loop(), name="app-taskflow-retention"),
        ]
        # The first poll runs at once, for the tasks handed back by a previous run.
        self._poll_now.set()
        log.info("Dispatcher started as instance {}", self.instance_id)

    def submit(self, task_id: str, name: str) -> None:
        """Queue a stored PENDING task to be claimed and run by this instance."""
        if self._stopping:
            return
        self._names[task_id] = name
        self._queue.append((task_id, name))
        self._pump()

    def request_cancel(self, task_id: str) -> bool:
        """Ask a task that this instance is running to stop; return whether it runs here.

        An async task is cancelled at once. A sync task cannot be stopped in its thread, so it
        reads ``current_task().cancel_requested`` and ends when its function returns.
        """
        context = self._contexts.get(task_id)
        if context is None:
            return False
        context.request_cancel()
        task = self._active.get(task_id)
        definition = self._registry.get(context.task_name)
        if task is not None and definition is not None and definition.is_async:
            task.cancel()
        return True

    async def stop(self) -> None:
        """Stop claiming, give running tasks the grace period, then hand the rest back."""
        self._stopping = True
        # The loops also end when they see _stopping, because a store call may swallow the
        # cancellation: on Python 3.11, asyncio.wait_for (which redis-py uses for socket
        # timeouts) returns the outcome of an inner call that ended as the cancel arrived.
        for loop_task in self._loops:
            loop_task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.clear()

        still_running: set[asyncio.Task[None]] = set()
        if self._active:
            log.info(
                "Waiting up to {} s for {} running task(s) to finish",
                self._settings.shutdown_grace,
                len(self._active),
            )
            _, still_running = await asyncio.wait(
                list(self._active.values()), timeout=self._settings.shutdown_grace
            )
        await self._flush_logs()
        await self._store_buffered()
        for record in self._buffer.peek(len(self._buffer)):
            bind_task(record.id, record.name, instance_id=self.instance_id, tags=record.tags).error(
                "Task {} [{}] is lost: it was buffered during a store outage that lasted "
                "past shutdown",
                record.name,
                record.id,
            )

        report = await self._store_call(
            "release tasks at shutdown", lambda: self.store.release(self.instance_id, self._clock())
        )
        if report is not None:
            self._log_release(report)
        for task in still_running:
            task.cancel()
        if still_running:
            await asyncio.wait(still_running, timeout=1.0)
        log.info("Dispatcher of instance {} stopped", self.instance_id)

    def _pump(self) -> None:
        while self._queue and len(self._active) < self._settings.max_concurrency:
            task_id, _ = self._queue.popleft()
            if task_id not in self._active:
                self._spawn(task_id, None)

    def _spawn(self, task_id: str, record: TaskRecord | None) -> None:
        task = asyncio.create_task(self._process(task_id, record))
        self._active[task_id] = task
        task.add_done_callback(lambda _: self._on_done(task_id))

    def _on_done(self, task_id: str) -> None:
        self._active.pop(task_id, None)
        if task_id not in self._timers:
            self._names.pop(task_id, None)
            self._tags.pop(task_id, None)
        if not self._stopping:
            self._pump()
        # Under a backlog the poll loop waits for a first free slot, then for a batch.
        free = self._free_slots()
        if free == 1 or free >= self._claim_batch_size:
            self._slot_freed.set()

    async def _process(self, task_id: str, record: TaskRecord | None) -> None:
        if record is None:
            record = await self._store_call(
                f"claim task {task_id}",
                lambda: self.store.claim(task_id, self.instance_id, self._clock()),
            )
            if record is None:
                record = await self._claimed_by_lost_reply(task_id)
            if record is None:
                return  # Cancelled, finished, or claimed by another instance.
        self._names[record.id] = record.name
        if record.tags:
            self._tags[record.id] = record.tags
        try:
            await self._execute(record)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # A bug in the library must not leave the task RUNNING: end it as FAILED.
            log.opt(exception=error).error(
                "Internal error while running task {} [{}]", record.name, record.id
            )
            await self._finish(record, _internal_failure(error, self._clock()))

    async def _claimed_by_lost_reply(self, task_id: str) -> TaskRecord | None:
        """Return the task if an earlier try of this claim went through unseen.

        When a claim times out on a hung store, the store may still run it later, so the
        retry finds the task RUNNING under this very instance and refuses it. Such a task
        runs nowhere else, so this instance runs the attempt it claimed.
        """
        current = await self._store_call(f"read task {task_id}", partial(self.store.get, task_id))
        if (
            current is not None
            and current.status is TaskStatus.RUNNING
            and current.owner == self.instance_id
            and task_id not in self._contexts
        ):
            return current
        return None

    async def _execute(self, record: TaskRecord) -> None:
        definition = self._registry.get(record.name)
        if definition is None:
            message = (
                f"No task named {record.name!r} is registered in this app, so it cannot run; "
                f"known tasks: {', '.join(self._registry.names()) or 'none'}."
            )
            self.timeline.not_registered(record, message)
            outcome = AttemptOutcome(
                status=TaskStatus.FAILED,
                finished_at=self._clock(),
                duration=0.0,
                error_type="app_taskflow.errors.TaskDefinitionError",
                error_message=message,
            )
            await self._finish(record, outcome)
            return

        context = TaskContext(
            task_id=record.id,
            task_name=record.name,
            attempt=record.attempts,
            max_attempts=record.max_attempts,
            instance_id=self.instance_id,
        )
        self._contexts[record.id] = context
        self.timeline.started(record)
        try:
            result = await self._runner.run(definition, record, context)
        finally:
            self._contexts.pop(record.id, None)

        outcome = decide_outcome(
            definition,
            record,
            result,
            context,
            self._clock(),
            self._settings.retry_delay_scale,
        )
        logs = context.take_logs()
        if logs:
            await self._store_call(
                f"save logs of task {record.id}", lambda: self.store.append_logs(record.id, logs)
            )
        await self._finish(record, outcome)

    async def _finish(self, record: TaskRecord, outcome: AttemptOutcome) -> None:
        """Persist an attempt's outcome, log the transition and arm the retry timer."""
        written = await self._store_call(
            f"finish task {record.id}",
            lambda: self.store.finish(record.id, self.instance_id, record.attempts, outcome),
        )
        if written is None and outcome.error_type != _STORE_FAILURE_TYPE:
            # The store rejected this outcome (not an outage: that is waited out). A plainer
            # outcome may still be accepted, and keeps the task from staying RUNNING.
            outcome = _internal_failure(
                StoreError(
                    f"The {outcome.status.value} outcome of attempt {record.attempts} could "
                    "not be stored; the instance's log has the error."
                ),
                outcome.finished_at,
                outcome.duration,
            )
            written = await self._store_call(
                f"finish task {record.id} after a failed write",
                lambda: self.store.finish(record.id, self.instance_id, record.attempts, outcome),
            )
        if written is None:
            bind_task(record.id, record.name, instance_id=self.instance_id, tags=record.tags).error(
                "Task {} [{}] stays RUNNING: its outcome could not be stored; it is taken "
                "back when this instance stops",
                record.name,
                record.id,
            )
            return
        if not written:
            self.timeline.result_discarded(record, outcome)
            return

        if outcome.status is TaskStatus.SUCCESS:
            self.timeline.succeeded(record, outcome)
        elif outcome.status is TaskStatus.PENDING:
            assert outcome.scheduled_at is not None
            delay = max(0.0, (outcome.scheduled_at - self._clock()).total_seconds())
            self.timeline.retrying(record, outcome, delay)
            self._arm_retry(record, delay)
        elif outcome.status is TaskStatus.CANCELLED:
            self.timeline.cancelled(record, outcome)
        else:
            self.timeline.failed(record, outcome)

    def _arm_retry(self, record: TaskRecord, delay: float) -> None:
        loop = asyncio.get_running_loop()
        # The store compares scheduled_at with the wall clock, which may lag the loop's
        # monotonic clock by a hair; the extra millisecond keeps the claim from being early.
        self._timers[record.id] = loop.call_later(
            delay + 0.001, self._on_retry_due, record.id, record.name
        )

    def _on_retry_due(self, task_id: str, name: str) -> None:
        self._timers.pop(task_id, None)
        self.submit(task_id, name)

    async def _heartbeat_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._settings.heartbeat_interval)
            cancel_ids = await self._store_call("renew the lease", self._renew_lease)
            for task_id in cancel_ids or []:
                self.request_cancel(task_id)

    async def _recovery_loop(self) -> None:
        """Take back the tasks of expired instances soon after their lease ends.

        Every poll interval, one small query reads when the next lease ends. The tasks are
        taken back once that time is past, and the loop sleeps until just after it when it
        comes before the next look. A full pass runs every heartbeat interval whatever the
        leases, because it also takes back tasks whose owner has no lease at all. Such a
        task was stored by an instance after it handed its tasks back, or skipped by a pass
        because another transaction held it.
        """
        settings = self._settings
        loop = asyncio.get_running_loop()
        interval = min(settings.poll_interval, settings.heartbeat_interval)
        full_pass_at = loop.time() + settings.heartbeat_interval
        wait = 0.0  # start() has just recovered, but the first read of the leases is due.
        while not self._stopping:
            await asyncio.sleep(wait)
            wait = interval
            if self._recovery_may_take_live_tasks():
                continue
            if loop.time() < full_pass_at:
                lease_end = await self._store_call(
                    "read when the next lease ends",
                    self.store.earliest_lease_end,
                    wait_out_outage=False,
                )
                if lease_end is None:
                    continue
                # A lease that ends at this very moment has not expired yet.
                remaining = (lease_end - self._clock()).total_seconds()
                if remaining >= 0:
                    wait = min(interval, remaining + _LEASE_END_MARGIN)
                    continue
                # The read may be the first call to succeed after an outage, after which
                # every instance, this one included, renews its lease before any recovery.
                if self._recovery_may_take_live_tasks():
                    continue
            full_pass_at = loop.time() + settings.heartbeat_interval
            await self._recover_expired()

    async def _recover_expired(self) -> None:
        """Take back the tasks of expired instances, a batch per store call, and log them."""
        recovered = RecoveryReport()
        while not self._recovery_may_take_live_tasks():
            # A recovery retried through an outage would run as the store comes back,
            # before the leases are renewed, so an outage ends this pass.
            batch = await self._store_call(
                "recover tasks of expired instances",
                lambda: self.store.recover_expired(self._clock()),
                wait_out_outage=False,
            )
            if batch is None or not _add_batch(recovered, batch):
                break
            if batch.released or batch.requeued:
                # The poll loop claims the first batch while the next ones are taken back.
                self._poll_now.set()
        self._log_recovery(recovered)

    def _recovery_may_take_live_tasks(self) -> bool:
        """Return whether a recovery now might take back the tasks of a live instance.

        That is so while the store is unreachable, and while other instances may lag after
        an outage. It is also so while this instance's own lease may have expired, after a
        pause longer than the lease expiry, until the heartbeat renews it.
        """
        if self.health.is_down or self._other_instances_may_lag():
            return True
        return asyncio.get_running_loop().time() >= self._lease_valid_until

    def _other_instances_may_lag(self) -> bool:
        """Return whether other instances may not have renewed their leases since an outage.

        After an outage longer than the lease expiry, every lease in the store has expired.
        The other instances renew theirs within one backoff step plus a heartbeat of the
        store's return; recovering before then would interrupt their running tasks.
        """
        back_since = self.health.back_since
        if back_since is None:
            return False
        wait = MAX_BACKOFF + self._settings.heartbeat_interval
        return time.monotonic() - back_since < wait

    async def _renew_lease(self) -> list[str]:
        # The lease end is computed at each try: a try that succeeds after an outage longer
        # than the expiry would otherwise store an end already past, and the recovery that
        # follows would take this instance's own tasks back.
        now = self._clock()
        valid_until = asyncio.get_running_loop().time() + self._settings.lease_expiry
        cancel_ids = await self.store.heartbeat(self.instance_id, now, self._lease_end(now))
        self._lease_valid_until = valid_until
        return cancel_ids

    async def _poll_loop(self) -> None:
        backlog = False
        while not self._stopping:
            if backlog:
                # The last poll filled every free slot, so more ownerless tasks may wait
                # (after a recovery, thousands): poll again as soon as slots free up.
                await self._wait_for_free_slots()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poll_now.wait(), self._settings.poll_interval)
                self._poll_now.clear()
            await self._flush_logs()
            free = self._free_slots()
            if free <= 0:
                continue
            requested = min(free, _MAX_CLAIM)
            records = await self._store_call(
                "claim ownerless tasks",
                partial(
                    self.store.claim_next,
                    self.instance_id,
                    self._clock(),
                    requested,
                    self._registry.names(),
                ),
            )
            backlog = records is not None and len(records) == requested
            if records:
                log.bind(instance_id=self.instance_id).debug(
                    "Claimed {} task(s) that no instance owned", len(records)
                )
            for record in records or []:
                self._spawn(record.id, record)

    async def _wait_for_free_slots(self) -> None:
        """Wait until a batch of slots is free, or a poll interval passed.

        Slots free up one task at a time, and claiming at the first would claim one task
        per store call. So once a slot is free, this waits up to ``_CLAIM_COALESCE_DELAY``
        for a batch of slots to be free, and the next claim fills them in one call.
        """
        loop = asyncio.get_running_loop()
        # The poll loop also saves task logs, so it waits at most one poll interval.
        deadline = loop.time() + self._settings.poll_interval
        coalescing = False
        while not self._stopping:
            free = self._free_slots()
            if free >= self._claim_batch_size:
                return
            if free > 0 and not coalescing:
                coalescing = True
                deadline = min(deadline, loop.time() + _CLAIM_COALESCE_DELAY)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._slot_freed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._slot_freed.wait()
            except TimeoutError:
                return

    def _free_slots(self) -> int:
        return self._settings.max_concurrency - len(self._active) - len(self._queue)

    async def _retention_loop(self) -> None:
        settings = self._settings
        if settings.retention_max_age is None and settings.retention_max_count is None:
            return
        while not self._stopping:
            await asyncio.sleep(settings.retention_interval)
            pruned = 0
            while not self._stopping:
                # Stores prune one bounded batch per call, so requests and claims get the
                # store between batches.
                batch = await self._store_call(
                    "prune finished tasks",
                    partial(
                        self.store.prune,
                        self._clock(),
                        settings.retention_max_age,
                        settings.retention_max_count,
                    ),
                )
                if not batch:
                    break
                pruned += batch
                await asyncio.sleep(0)
            if pruned:
                log.bind(instance_id=self.instance_id).info(
                    "Pruned {} finished task(s) past the retention limits", pruned
                )

    async def _flush_logs(self) -> None:
        for task_id, context in list(self._contexts.items()):
            entries = context.take_logs()
            if entries:
                await self._store_call(
                    f"save logs of task {task_id}",
                    partial(self.store.append_logs, task_id, entries),
                )

    def buffer_tasks(self, records: list[TaskRecord]) -> bool:
        """Keep tasks added while the store is unreachable; return False if the buffer is full.

        They are stored and then run once the store responds again. Only the ``buffer``
        outage policy uses this.
        """
        if self._stopping or not self._buffer.offer(records):
            return False
        self.health.buffered_during_outage += len(records)
        for record in records:
            bind_task(record.id, record.name, instance_id=self.instance_id, tags=record.tags).debug(
                "Task {} [{}] buffered until the store answers", record.name, record.id
            )
        self._buffer_ready.set()
        return True

    async def _buffer_loop(self) -> None:
        while not self._stopping:
            await self._buffer_ready.wait()
            await self._store_buffered()
            self._buffer_ready.clear()

    async def _store_buffered(self) -> None:
        while len(self._buffer):
            batch = self._buffer.peek(_BUFFER_BATCH)
            ids = await self._store_call(
                f"store {len(batch)} buffered task(s)", partial(self.store.create, batch)
            )
            if ids is None:
                return
            self._buffer.drop(len(batch))
            self.timeline.added(
                record for record, task_id in zip(batch, ids, strict=True) if task_id == record.id
            )
            for record, task_id in zip(batch, ids, strict=True):
                if task_id == record.id:
                    self.submit(task_id, record.name)

    def _lease_end(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self._settings.lease_expiry)

    def _log_recovery(self, report: RecoveryReport) -> None:
        self.timeline.recovered(report.interrupted, report.requeued, len(report.released))

    def _log_release(self, report: RecoveryReport) -> None:
        self.timeline.left_at_shutdown(
            self._names, report.interrupted, report.requeued, report.released, self._tags
        )
