"""The watch() part of the TaskStore contract: a change per write, for every watcher.

Stores may deliver changes through a poll loop or a pub/sub channel, so a watcher is ready
only once a change made after it started has reached it. ``watch_changes`` waits for that
with a probe task before a test makes its own changes. Each test then ends its changes with
a marker log entry per task: changes of one task arrive in order, so the changes of a task
before its marker are exactly the ones the test caused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from contract_support import (
    INSTANCE_A,
    INSTANCE_B,
    TASK_NAMES,
    Clock,
    RecordFactory,
    create_in_status,
    create_running,
    create_task,
    failure,
    log_entry,
    make_outcome,
)
from loguru import logger

from app_taskflow.models import LogEntry, TaskChange, TaskStatus, new_task_id
from app_taskflow.stores.base import TaskStore

CHANGE_TIMEOUT = 5.0
"""Seconds to wait for one change. Polling stores deliver within about a second."""

PROBE_TIMEOUTS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Seconds to wait for each probe change before sending the next one.

A pub/sub store subscribes within milliseconds and a polling store within a poll interval,
so short waits come first and the long ones cover a slow poll.
"""

PROBE_NAME = "watch_probe"
"""Name of the task whose log entries show that a watcher is ready; no test claims it."""


class ChangeReader:
    """Reads a store's ``watch()`` with a timeout per change.

    A timeout does not cancel the pending read, because cancelling it would close the
    iterator; the next call waits for the same read.
    """

    def __init__(self, store: TaskStore) -> None:
        self.changes = store.watch()
        self._next: asyncio.Future[TaskChange] | None = None

    def start(self) -> None:
        """Start reading, which subscribes the watcher."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self.changes))

    # asyncio.timeout() would cancel the read and so close the iterator.
    async def next(self, timeout: float = CHANGE_TIMEOUT) -> TaskChange:  # noqa: ASYNC109
        """Return the next change; raise ``TimeoutError`` when none came within ``timeout``."""
        self.start()
        assert self._next is not None
        done, _ = await asyncio.wait({self._next}, timeout=timeout)
        if not done:
            raise TimeoutError(f"No change arrived within {timeout} s.")
        change = self._next.result()
        self._next = None
        return change

    async def aclose(self) -> None:
        """Cancel a pending read and close the iterator."""
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None
        await self.changes.aclose()


WatchOpener = Callable[[], Awaitable[ChangeReader]]


@pytest.fixture
async def watch_changes(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> AsyncIterator[WatchOpener]:
    """Yield a function that returns a ready reader of ``store.watch()``.

    The readers are closed after the test.
    """
    probe_id = await create_task(store, make_record(name=PROBE_NAME))
    readers: list[ChangeReader] = []

    async def open_reader() -> ChangeReader:
        reader = ChangeReader(store)
        readers.append(reader)
        reader.start()
        await asyncio.sleep(0)
        for round_number, timeout in enumerate(PROBE_TIMEOUTS):
            message = f"probe {round_number}"
            await store.append_logs(probe_id, [LogEntry(timestamp=clock(0), message=message)])
            if await _probe_arrived(reader, probe_id, message, timeout):
                return reader
        raise AssertionError(
            f"The watcher received none of {len(PROBE_TIMEOUTS)} probe log entries within "
            f"{sum(PROBE_TIMEOUTS)} s."
        )

    yield open_reader
    for reader in readers:
        await reader.aclose()


async def _probe_arrived(
    reader: ChangeReader, probe_id: str, message: str, wait_seconds: float
) -> bool:
    # Earlier probes that arrive late are skipped: only the last one sent proves that no
    # probe will arrive after this function returns.
    while True:
        try:
            change = await reader.next(wait_seconds)
        except TimeoutError:
            return False
        if change.task_id == probe_id and change.log is not None and change.log.message == message:
            return True


async def append_markers(store: TaskStore, task_ids: list[str], clock: Clock) -> dict[str, str]:
    """Append a marker log entry to each task; return the marker messages by task id."""
    markers = {task_id: f"marker {new_task_id()}" for task_id in task_ids}
    for task_id, message in markers.items():
        await store.append_logs(task_id, [LogEntry(timestamp=clock(999), message=message)])
    return markers


async def changes_before_markers(
    reader: ChangeReader, markers: dict[str, str]
) -> dict[str, list[TaskChange]]:
    """Return the changes of each task in ``markers`` that arrive before its marker.

    Changes of other tasks are skipped. A resync marker fails the test, since no test here
    makes enough changes to fill a watcher's buffer.
    """
    changes: dict[str, list[TaskChange]] = {task_id: [] for task_id in markers}
    waiting = set(markers)
    while waiting:
        change = await reader.next()
        assert not change.resync
        if change.task_id not in waiting:
            continue
        if change.log is not None and change.log.message == markers[change.task_id]:
            waiting.discard(change.task_id)
        else:
            changes[change.task_id].append(change)
    return changes


async def read_changes(
    reader: ChangeReader, store: TaskStore, task_ids: list[str], clock: Clock
) -> dict[str, list[TaskChange]]:
    """Return the changes of each task in ``task_ids`` up to a marker appended now."""
    markers = await append_markers(store, task_ids, clock)
    return await changes_before_markers(reader, markers)


def describe(change: TaskChange) -> str:
    """Return a change as text: its task's status and cancel flag, or its log message."""
    if change.log is not None:
        return f"log {change.log.message}"
    if change.summary is None:
        return "empty change"
    if change.summary.cancel_requested:
        return f"{change.summary.status.value} cancel requested"
    return change.summary.status.value


def describe_all(changes: list[TaskChange]) -> list[str]:
    return [describe(change) for change in changes]


@pytest.fixture
def logged_errors() -> Iterator[list[str]]:
    """Collect the ERROR records logged through loguru during the test."""
    records: list[str] = []
    sink_id = logger.add(lambda message: records.append(str(message)), level="ERROR")
    yield records
    logger.remove(sink_id)


async def test_watch_task_lifecycle(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    reader = await watch_changes()
    record = make_record(max_attempts=2)
    await store.create([record])
    await store.claim(record.id, INSTANCE_A, clock(1))
    entries = [log_entry(clock, 1.5, "connecting"), log_entry(clock, 1.75, "refused")]
    await store.append_logs(record.id, entries)
    await store.finish(record.id, INSTANCE_A, 1, failure(clock(2), retry_at=clock(3)))
    await store.claim(record.id, INSTANCE_A, clock(3))
    await store.finish(record.id, INSTANCE_A, 2, make_outcome(TaskStatus.SUCCESS, clock(4)))

    changes = (await read_changes(reader, store, [record.id], clock))[record.id]

    assert describe_all(changes) == [
        "PENDING",
        "RUNNING",
        "log connecting",
        "log refused",
        "PENDING",
        "RUNNING",
        "SUCCESS",
    ]
    assert [change.task_id for change in changes] == [record.id] * 7
    assert changes[0].summary == record.summary()
    assert [change.log for change in changes[2:4]] == entries
    stored = await store.get(record.id)
    assert stored is not None
    assert changes[-1].summary == stored.summary()


async def test_watch_create_batch_and_claim_next(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    reader = await watch_changes()
    records = [make_record(), make_record()]
    await store.create(records)
    await store.claim_next(INSTANCE_B, clock(5), limit=10, names=TASK_NAMES)

    changes = await read_changes(reader, store, [record.id for record in records], clock)

    for record in records:
        assert describe_all(changes[record.id]) == ["PENDING", "RUNNING"]
        summary = changes[record.id][-1].summary
        assert summary is not None
        assert summary.owner == INSTANCE_B


async def test_watch_cancel(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record())
    running_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    reader = await watch_changes()
    await store.cancel(pending_id, clock(2))
    await store.cancel(running_id, clock(2))

    changes = await read_changes(reader, store, [pending_id, running_id], clock)

    assert describe_all(changes[pending_id]) == ["CANCELLED"]
    assert describe_all(changes[running_id]) == ["RUNNING cancel requested"]


async def test_watch_retry(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_in_status(store, make_record(), TaskStatus.FAILED, clock)
    reader = await watch_changes()
    await store.retry(task_id, clock(10), extra_attempts=1)

    changes = (await read_changes(reader, store, [task_id], clock))[task_id]

    assert describe_all(changes) == ["PENDING"]
    assert changes[0].summary is not None
    assert changes[0].summary.max_attempts == 2


async def test_watch_recover_and_release(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    expired_pending_id = await create_task(store, make_record(owner=INSTANCE_A))
    expired_running_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    released_id = await create_running(
        store, make_record(requeue_on_interrupt=True), INSTANCE_B, clock(1)
    )
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))
    await store.heartbeat(INSTANCE_B, clock(1), expires_at=clock(1000))
    reader = await watch_changes()
    await store.recover_expired(clock(20))
    await store.release(INSTANCE_B, clock(21))

    task_ids = [expired_pending_id, expired_running_id, released_id]
    changes = await read_changes(reader, store, task_ids, clock)

    assert describe_all(changes[expired_pending_id]) == ["PENDING"]
    assert describe_all(changes[expired_running_id]) == ["INTERRUPTED"]
    assert describe_all(changes[released_id]) == ["PENDING"]
    for task_id in (expired_pending_id, released_id):
        summary = changes[task_id][0].summary
        assert summary is not None
        assert summary.owner is None


async def test_watch_every_watcher_receives(
    store: TaskStore, watch_changes: WatchOpener, make_record: RecordFactory, clock: Clock
) -> None:
    readers = [await watch_changes(), await watch_changes()]
    task_id = await create_task(store, make_record())

    markers = await append_markers(store, [task_id], clock)

    for reader in readers:
        changes = (await changes_before_markers(reader, markers))[task_id]
        assert describe_all(changes) == ["PENDING"]


async def test_watch_other_instance_changes(
    store: TaskStore,
    second_store: TaskStore,
    watch_changes: WatchOpener,
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    reader = await watch_changes()
    task_id = await create_task(second_store, make_record())
    await second_store.claim(task_id, INSTANCE_B, clock(1))
    await second_store.append_logs(task_id, [log_entry(clock, 1.5, "sent")])
    await second_store.finish(task_id, INSTANCE_B, 1, make_outcome(TaskStatus.SUCCESS, clock(2)))

    changes = (await read_changes(reader, second_store, [task_id], clock))[task_id]

    assert describe_all(changes) == ["PENDING", "RUNNING", "log sent", "SUCCESS"]


async def test_watch_aclose_leaves_no_task(
    store: TaskStore,
    watch_changes: WatchOpener,
    make_record: RecordFactory,
    clock: Clock,
    logged_errors: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks_before = asyncio.all_tasks()
    reader = await watch_changes()
    first_id = await create_task(store, make_record())
    await read_changes(reader, store, [first_id], clock)

    await reader.changes.aclose()

    # A cancelled feed may need a few loop turns to finish, so the check waits up to 5 s.
    leftover: set[asyncio.Task[Any]] = set()
    for _ in range(50):
        leftover = {task for task in asyncio.all_tasks() - tasks_before if not task.done()}
        if not leftover:
            break
        await asyncio.sleep(0.1)
    assert leftover == set()

    later = await watch_changes()
    second_id = await create_task(store, make_record())
    changes = (await read_changes(later, store, [second_id], clock))[second_id]
    assert describe_all(changes) == ["PENDING"]
    assert logged_errors == []
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []
