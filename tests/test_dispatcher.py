"""The dispatcher inside a running app: lifecycle, retries with backoff, concurrency, threads."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends
from integration_fixtures import MakeApp, wait_for_status
from integration_fixtures import make_app as make_app  # registers the fixture

from app_taskflow import TaskflowTasks, TaskStatus, task_log
from app_taskflow import dispatcher as dispatcher_module
from app_taskflow.dispatcher import DispatcherSettings
from app_taskflow.models import TaskRecord, new_task_id, utcnow
from app_taskflow.stores import MemoryStore, SqlStore, TaskStore, sql_operations
from app_taskflow.taskflow import Taskflow

Tasks = Annotated[TaskflowTasks, Depends()]

GATE_TIMEOUT = 5.0
"""Seconds a blocked test task waits for its gate before it gives up by itself."""


class ReportError(Exception):
    """The error the failing tasks of this module raise."""


async def test_dispatcher_lifecycle(make_app: MakeApp) -> None:
    running = await make_app(max_concurrency=1)
    gate = asyncio.Event()

    @running.taskflow.task
    async def blocker() -> None:
        await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)

    @running.taskflow.task
    async def quick() -> None:
        pass

    @running.app.post("/jobs")
    def add_jobs(tasks: Tasks) -> list[str]:
        return [tasks.add_task(blocker), tasks.add_task(quick)]

    blocker_id, quick_id = (await running.client.post("/jobs")).json()
    await running.wait_for_status(blocker_id, TaskStatus.RUNNING)
    blocker_running = (await running.client.get(f"/tasks/{blocker_id}")).json()
    quick_pending = (await running.client.get(f"/tasks/{quick_id}")).json()
    gate.set()
    await running.wait_for_status(quick_id, TaskStatus.SUCCESS)
    blocker_done = (await running.client.get(f"/tasks/{blocker_id}")).json()
    quick_done = (await running.client.get(f"/tasks/{quick_id}")).json()

    assert blocker_running["status"] == "RUNNING"
    assert blocker_running["attempts"] == 1
    assert blocker_running["started_at"] is not None
    assert blocker_running["owner"] == running.taskflow.instance_id
    assert quick_pending["status"] == "PENDING"
    assert quick_pending["attempts"] == 0
    assert blocker_done["status"] == "SUCCESS"
    assert blocker_done["finished_at"] is not None
    assert blocker_done["duration"] > 0
    assert quick_done["status"] == "SUCCESS"
    assert quick_done["error_type"] is None


async def test_dispatcher_failed_task_details(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task(retries=1)
    def send_report(recipient: str) -> None:
        task_log(f"Building the report for {recipient}", rows=0)
        raise ReportError(f"No data for {recipient}")

    @running.app.post("/reports")
    def add_report(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_report, "ada")}

    task_id = (await running.client.post("/reports")).json()["task_id"]
    await running.wait_for_status(task_id, TaskStatus.FAILED)
    body = (await running.client.get(f"/tasks/{task_id}")).json()
    history = body["attempt_history"]

    assert body["status"] == "FAILED"
    assert body["error_type"] == f"{__name__}.ReportError"
    assert body["error_message"] == "No data for ada"
    assert 'raise ReportError(f"No data for {recipient}")' in body["traceback"]
    assert "ReportError: No data for ada" in body["traceback"]
    assert body["attempts"] == 2
    assert body["max_attempts"] == 2
    assert body["finished_at"] is not None
    assert [entry["message"] for entry in body["logs"]] == ["Building the report for ada"] * 2
    assert [entry["attempt"] for entry in body["logs"]] == [1, 2]
    assert body["logs"][0]["extra"] == {"rows": 0}
    assert [attempt["number"] for attempt in history] == [1, 2]
    assert [attempt["status"] for attempt in history] == ["FAILED", "FAILED"]
    assert [attempt["error_message"] for attempt in history] == ["No data for ada"] * 2
    assert all(attempt["finished_at"] is not None for attempt in history)


async def test_dispatcher_waiting_task_shows_schedule(make_app: MakeApp) -> None:
    running = await make_app(retry_delay_scale=1.0)

    @running.taskflow.task(retries=1, delay=1.0)
    async def flaky() -> None:
        raise ReportError("not yet")

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(flaky)}

    task_id = (await running.client.post("/jobs")).json()["task_id"]
    await running.wait_for_attempts(task_id, 1)
    await running.wait_for_status(task_id, TaskStatus.PENDING)
    response = await running.client.get(f"/tasks/{task_id}")
    record = TaskRecord.model_validate(response.json())

    assert record.status is TaskStatus.PENDING
    assert record.attempts == 1
    assert record.max_attempts == 2
    assert record.scheduled_at is not None
    assert record.attempt_history[0].finished_at is not None
    assert record.scheduled_at - record.attempt_history[0].finished_at == timedelta(seconds=1)
    assert record.error_message == "not yet"
    assert record.finished_at is None


@pytest.mark.parametrize("store_kind", ["memory", "sqlite"])
async def test_dispatcher_retries_with_backoff(make_app: MakeApp, store_kind: str) -> None:
    running = await make_app(store_kind=store_kind, retry_delay_scale=1.0)
    calls: list[float] = []

    @running.taskflow.task(retries=2, delay=0.05, backoff=2)
    def always_fails() -> None:
        calls.append(time.monotonic())
        raise ConnectionError("upstream unavailable")

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(always_fails)}

    task_id = (await running.client.post("/jobs")).json()["task_id"]
    record = await running.wait_for_status(task_id, TaskStatus.FAILED)
    gaps = [later - earlier for earlier, later in pairwise(calls)]
    history = record.attempt_history
    stored_gaps = [
        (later.started_at - earlier.finished_at).total_seconds()
        for earlier, later in pairwise(history)
        if earlier.finished_at is not None
    ]

    assert len(calls) == 3
    assert record.attempts == 3
    assert 0.045 <= gaps[0] < 0.5
    assert 0.095 <= gaps[1] < 0.5
    assert gaps[1] > gaps[0]
    assert len(stored_gaps) == 2
    assert stored_gaps[0] >= 0.045
    assert stored_gaps[1] >= 0.095
    assert [attempt.status for attempt in history] == [TaskStatus.FAILED] * 3
    assert record.error_type == "ConnectionError"
    assert record.traceback is not None
    assert 'raise ConnectionError("upstream unavailable")' in record.traceback


async def test_dispatcher_retry_wait_holds_no_slot(make_app: MakeApp) -> None:
    running = await make_app(max_concurrency=1, retry_delay_scale=1.0)

    @running.taskflow.task(retries=1, delay=1.0)
    async def flaky() -> None:
        raise ReportError("not yet")

    @running.taskflow.task
    async def quick() -> None:
        pass

    @running.app.post("/flaky")
    def add_flaky(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(flaky)}

    @running.app.post("/quick")
    def add_quick(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(quick)}

    flaky_id = (await running.client.post("/flaky")).json()["task_id"]
    await running.wait_for_attempts(flaky_id, 1)
    await running.wait_for_status(flaky_id, TaskStatus.PENDING)
    quick_id = (await running.client.post("/quick")).json()["task_id"]
    # The retry is due 1 s after the first attempt; the quick task must be done before it.
    await running.wait_for_status(quick_id, TaskStatus.SUCCESS, within=0.9)
    waiting = await running.store.get(flaky_id)

    assert waiting is not None
    assert waiting.status is TaskStatus.PENDING
    assert waiting.attempts == 1


async def test_dispatcher_max_concurrency_queues(make_app: MakeApp) -> None:
    running = await make_app(max_concurrency=2)
    gate = asyncio.Event()
    peak = 0
    active = 0

    @running.taskflow.task
    async def job() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)
        active -= 1

    @running.app.post("/jobs")
    def add_jobs(tasks: Tasks) -> list[str]:
        return [tasks.add_task(job) for _ in range(5)]

    task_ids = (await running.client.post("/jobs")).json()
    await running.wait_for_status(task_ids[1], TaskStatus.RUNNING)
    await asyncio.sleep(0.05)
    pending = [await running.store.get(task_id) for task_id in task_ids[2:]]
    gate.set()
    for task_id in task_ids:
        await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert [record.status for record in pending if record] == [TaskStatus.PENDING] * 3
    assert peak == 2


async def test_dispatcher_slow_sync_task_blocks_nothing(make_app: MakeApp) -> None:
    running = await make_app()
    gate = threading.Event()

    @running.taskflow.task
    def slow() -> None:
        gate.wait(GATE_TIMEOUT)

    @running.taskflow.task
    async def quick() -> None:
        pass

    @running.app.post("/slow")
    def add_slow(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(slow)}

    @running.app.post("/quick")
    async def add_quick(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(quick)}

    try:
        slow_id = (await running.client.post("/slow")).json()["task_id"]
        await running.wait_for_status(slow_id, TaskStatus.RUNNING)
        quick_id = (await running.client.post("/quick")).json()["task_id"]
        quick_done = await running.wait_for_status(quick_id, TaskStatus.SUCCESS)
        slow_response = await running.client.get(f"/tasks/{slow_id}")
    finally:
        gate.set()
    slow_done = await running.wait_for_status(slow_id, TaskStatus.SUCCESS)

    assert quick_done.status is TaskStatus.SUCCESS
    assert slow_response.json()["status"] == "RUNNING"
    assert slow_done.status is TaskStatus.SUCCESS


async def test_dispatcher_sync_task_off_loop_thread(make_app: MakeApp) -> None:
    running = await make_app()
    threads: dict[str, threading.Thread] = {}

    @running.taskflow.task
    def sync_job() -> None:
        threads["sync"] = threading.current_thread()

    @running.taskflow.task
    async def async_job() -> None:
        threads["async"] = threading.current_thread()

    @running.app.post("/jobs")
    def add_jobs(tasks: Tasks) -> list[str]:
        return [tasks.add_task(sync_job), tasks.add_task(async_job)]

    for task_id in (await running.client.post("/jobs")).json():
        await running.wait_for_status(task_id, TaskStatus.SUCCESS)
    loop_thread = threading.current_thread()

    assert threads["sync"] is not loop_thread
    assert threads["sync"].name.startswith("app-taskflow-worker")
    assert threads["async"] is loop_thread


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("error_type", [KeyboardInterrupt, SystemExit], ids=lambda t: t.__name__)
async def test_dispatcher_base_exception(
    make_app: MakeApp, kind: str, error_type: type[BaseException]
) -> None:
    running = await make_app()

    @running.taskflow.task(retries=2)
    def sync_job() -> None:
        raise error_type("stop")

    @running.taskflow.task(retries=2)
    async def async_job() -> None:
        raise error_type("stop")

    @running.taskflow.task
    async def after() -> None:
        pass

    job = sync_job if kind == "sync" else async_job

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(job)}

    @running.app.post("/after")
    async def add_after(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(after)}

    task_id = (await running.client.post("/jobs")).json()["task_id"]
    record = await running.wait_for_status(task_id, TaskStatus.FAILED)
    after_id = (await running.client.post("/after")).json()["task_id"]
    after_record = await running.wait_for_status(after_id, TaskStatus.SUCCESS)

    assert record.error_type == error_type.__name__
    assert record.error_message == "stop"
    assert record.attempts == 1
    assert record.traceback is not None
    assert 'raise error_type("stop")' in record.traceback
    assert after_record.status is TaskStatus.SUCCESS


async def test_dispatcher_attempt_timeout(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task(timeout=0.05)
    async def hangs() -> None:
        await asyncio.sleep(GATE_TIMEOUT)

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(hangs)}

    task_id = (await running.client.post("/jobs")).json()["task_id"]
    record = await running.wait_for_status(task_id, TaskStatus.FAILED)

    assert record.error_type == "TimeoutError"


async def test_dispatcher_unknown_task_name(make_app: MakeApp) -> None:
    running = await make_app()
    record = TaskRecord(
        id=new_task_id(),
        name="billing.removed_task",
        status=TaskStatus.PENDING,
        created_at=running.taskflow.now(),
        owner=running.taskflow.instance_id,
    )
    await running.store.create([record])
    running.taskflow.dispatcher.submit(record.id, record.name)
    failed = await running.wait_for_status(record.id, TaskStatus.FAILED)

    assert failed.error_type == "app_taskflow.errors.TaskDefinitionError"
    assert failed.error_message is not None
    assert "'billing.removed_task' is registered" in failed.error_message


async def test_dispatcher_claims_ownerless_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []

    @running.taskflow.task
    async def orphan(label: str) -> None:
        ran.append(label)

    record = running.taskflow.build_record(orphan, ("left over",), {})
    await running.store.create([record.model_copy(update={"owner": None})])
    done = await running.wait_for_status(record.id, TaskStatus.SUCCESS)

    assert done.owner == running.taskflow.instance_id
    assert ran == ["left over"]


# Recovery and claims of ownerless tasks. A poll interval of an hour shows that what a test
# waits for does not come from the regular poll.

HOUR = 3600.0


class FrozenClock:
    """A clock that does not move until a test advances it."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ClaimRecordingStore(MemoryStore):
    """A MemoryStore that records how many tasks each ``claim_next`` call claimed."""

    def __init__(self) -> None:
        super().__init__()
        self.claimed_batches: list[int] = []

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> list[TaskRecord]:
        claimed = await super().claim_next(instance_id, now, limit, names)
        if claimed:
            self.claimed_batches.append(len(claimed))
        return claimed


def build_taskflow(store: TaskStore, clock: FrozenClock | None = None, **settings: Any) -> Taskflow:
    """Return a taskflow on ``store`` whose heartbeat and poll come once an hour."""
    fields: dict[str, Any] = {
        "heartbeat_interval": HOUR,
        "lease_expiry": 2 * HOUR,
        "poll_interval": HOUR,
        "shutdown_grace": 0.5,
        **settings,
    }
    return Taskflow(
        store_factory=lambda: store,
        settings=DispatcherSettings(**fields),
        clock=clock or utcnow,
    )


async def create_ownerless(
    taskflow: Taskflow, store: TaskStore, task: Any, count: int
) -> list[str]:
    records = [
        taskflow.build_record(task, (number,), {}).model_copy(update={"owner": None})
        for number in range(count)
    ]
    return await store.create(records)


async def test_dispatcher_recovers_soon_after_expiry() -> None:
    clock = FrozenClock()
    store = MemoryStore()
    # Only the look at the leases every poll interval can find the expiry: the heartbeat,
    # with its full recovery pass, does not come within the test.
    taskflow = build_taskflow(store, clock, poll_interval=0.02)

    @taskflow.task(name="recovery.orphan")
    async def orphan() -> None:
        pass

    async with taskflow.lifespan():
        await store.heartbeat("instance-gone", clock(), clock() + timedelta(seconds=30))
        record = taskflow.build_record(orphan, (), {}).model_copy(update={"owner": "instance-gone"})
        await store.create([record])
        await asyncio.sleep(0.2)
        before_expiry = await store.get(record.id)
        clock.advance(31)
        done = await wait_for_status(store, record.id, TaskStatus.SUCCESS, within=GATE_TIMEOUT)

    assert before_expiry is not None
    assert before_expiry.owner == "instance-gone"
    assert done.owner == taskflow.instance_id


async def test_dispatcher_recovers_at_lease_end() -> None:
    store = MemoryStore()
    # The poll comes once an hour, so only a wake-up at the lease's end can recover in time.
    taskflow = build_taskflow(store)

    @taskflow.task(name="recovery.orphan")
    async def orphan() -> None:
        pass

    now = utcnow()
    await store.heartbeat("instance-gone", now, now + timedelta(seconds=0.5))
    record = taskflow.build_record(orphan, (), {}).model_copy(update={"owner": "instance-gone"})
    await store.create([record])
    async with taskflow.lifespan():
        done = await wait_for_status(store, record.id, TaskStatus.SUCCESS, within=GATE_TIMEOUT)

    assert done.owner == taskflow.instance_id


async def test_dispatcher_recovers_every_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_operations, "RECOVERY_BATCH", 3)
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    # With the poll and the full pass an hour away, only the recovery that follows the
    # lease's end, batch after batch, takes the ten tasks back and has them claimed.
    taskflow = build_taskflow(SqlStore(url))

    @taskflow.task(name="recovery.orphan")
    async def orphan(number: int) -> None:
        del number

    records = [
        taskflow.build_record(orphan, (number,), {}).model_copy(update={"owner": "instance-gone"})
        for number in range(10)
    ]
    gone_store = SqlStore(url)
    await gone_store.open()
    now = utcnow()
    await gone_store.heartbeat("instance-gone", now, now + timedelta(seconds=0.5))
    await gone_store.create(records)
    await gone_store.close()

    async with taskflow.lifespan():
        for record in records:
            await wait_for_status(
                taskflow.store, record.id, TaskStatus.SUCCESS, within=GATE_TIMEOUT
            )


async def test_dispatcher_claims_ownerless_at_start() -> None:
    store = MemoryStore()
    taskflow = build_taskflow(store)

    @taskflow.task(name="recovery.left_over")
    async def left_over(number: int) -> None:
        del number

    [task_id] = await create_ownerless(taskflow, store, left_over, 1)
    async with taskflow.lifespan():
        done = await wait_for_status(store, task_id, TaskStatus.SUCCESS, within=GATE_TIMEOUT)

    assert done.owner == taskflow.instance_id


async def test_dispatcher_claims_in_batches_under_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    # With no coalescing delay, a claim waits until a batch of the 20 slots are free.
    monkeypatch.setattr(dispatcher_module, "_CLAIM_COALESCE_DELAY", HOUR)
    store = ClaimRecordingStore()
    taskflow = build_taskflow(store, max_concurrency=20)
    tickets = asyncio.Semaphore(0)

    @taskflow.task(name="recovery.gated")
    async def gated(number: int) -> None:
        del number
        await asyncio.wait_for(tickets.acquire(), GATE_TIMEOUT)

    await create_ownerless(taskflow, store, gated, 60)
    async with taskflow.lifespan():
        # Tasks end one at a time, so slots free up one at a time.
        for ended in range(1, 61):
            tickets.release()
            await wait_for_success_count(store, ended)

    assert sum(store.claimed_batches) == 60
    assert store.claimed_batches[0] == 20
    batch_size = 20 // dispatcher_module._CLAIM_BATCH_DIVISOR
    assert min(store.claimed_batches[1:-1]) >= batch_size


async def test_dispatcher_claims_for_one_free_slot() -> None:
    store = ClaimRecordingStore()
    taskflow = build_taskflow(store, max_concurrency=20)
    tickets = asyncio.Semaphore(0)

    @taskflow.task(name="recovery.gated")
    async def gated(number: int) -> None:
        del number
        await asyncio.wait_for(tickets.acquire(), GATE_TIMEOUT)

    task_ids = await create_ownerless(taskflow, store, gated, 21)
    async with taskflow.lifespan():
        await wait_for_status(store, task_ids[19], TaskStatus.RUNNING, within=GATE_TIMEOUT)
        tickets.release()
        # One slot is free, fewer than a batch: the claim comes after the coalescing delay.
        last = await wait_for_status(store, task_ids[20], TaskStatus.RUNNING, within=GATE_TIMEOUT)
        for _ in range(20):
            tickets.release()

    assert last.owner == taskflow.instance_id
    assert store.claimed_batches == [20, 1]


async def wait_for_success_count(store: TaskStore, count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GATE_TIMEOUT
    while (await store.metrics()).counts[TaskStatus.SUCCESS] < count:
        assert loop.time() < deadline, f"fewer than {count} tasks succeeded in time"
        await asyncio.sleep(0.005)
