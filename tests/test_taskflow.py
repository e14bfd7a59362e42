"""Taskflow: lifespan, shutdown with a grace period, and tasks added outside a request."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi import FastAPI
from integration_fixtures import MakeApp, build_container
from integration_fixtures import make_app as make_app  # registers the fixture

from app_taskflow import TaskflowError, TaskStatus

GATE_TIMEOUT = 5.0
"""Seconds a blocked test task waits for its gate before it gives up by itself."""

STORE_KINDS = ["memory", "sqlite"]


async def test_taskflow_not_started() -> None:
    taskflow = build_container().taskflow()

    with pytest.raises(TaskflowError, match=r"FastAPI\(lifespan=taskflow\.lifespan\)"):
        _ = taskflow.store
    assert taskflow.started is False


async def test_taskflow_app_lifespan() -> None:
    taskflow = build_container(shutdown_grace=0.5).taskflow()
    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)

    async with app.router.lifespan_context(app):
        started = taskflow.started
    stopped = taskflow.started

    assert started is True
    assert stopped is False


@pytest.mark.parametrize("store_kind", STORE_KINDS)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_taskflow_shutdown_interrupts_task(
    make_app: MakeApp, store_kind: str, kind: str
) -> None:
    grace = 0.2
    running = await make_app(store_kind=store_kind, shutdown_grace=grace)
    gate = threading.Event()

    @running.taskflow.task(retries=3)
    def sync_job() -> None:
        gate.wait(GATE_TIMEOUT)

    @running.taskflow.task(retries=3)
    async def async_job() -> None:
        await asyncio.sleep(GATE_TIMEOUT)

    try:
        task_id = await running.taskflow.add_task(sync_job if kind == "sync" else async_job)
        await running.wait_for_status(task_id, TaskStatus.RUNNING)
        started = time.monotonic()
        await running.stop()
        elapsed = time.monotonic() - started
    finally:
        gate.set()
    record = await running.read_after_stop(task_id)

    assert elapsed >= grace
    assert elapsed < grace + 5
    assert record is not None
    assert record.status is TaskStatus.INTERRUPTED
    assert record.owner is None
    assert record.finished_at is not None
    assert record.attempts == 1
    assert record.attempt_history[0].status is TaskStatus.INTERRUPTED


@pytest.mark.parametrize("store_kind", STORE_KINDS)
async def test_taskflow_shutdown_requeues_task(make_app: MakeApp, store_kind: str) -> None:
    running = await make_app(store_kind=store_kind, shutdown_grace=0.1)

    @running.taskflow.task(requeue_on_interrupt=True)
    async def rebuild_index() -> None:
        await asyncio.sleep(GATE_TIMEOUT)

    task_id = await running.taskflow.add_task(rebuild_index)
    await running.wait_for_status(task_id, TaskStatus.RUNNING)
    await running.stop()
    record = await running.read_after_stop(task_id)

    assert record is not None
    assert record.status is TaskStatus.PENDING
    assert record.owner is None
    assert record.finished_at is None
    assert record.attempts == 1
    assert record.attempt_history[0].status is TaskStatus.INTERRUPTED


async def test_taskflow_requeued_task_runs_after_restart(make_app: MakeApp) -> None:
    calls: list[int] = []

    async def rebuild_index() -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            await asyncio.sleep(GATE_TIMEOUT)

    first = await make_app(store_kind="sqlite", shutdown_grace=0.1)
    first_task = first.taskflow.task(name="rebuild_index", requeue_on_interrupt=True)(rebuild_index)
    task_id = await first.taskflow.add_task(first_task)
    await first.wait_for_status(task_id, TaskStatus.RUNNING)
    await first.stop()

    # The task is registered before the poll loop's first claim, which waits poll_interval.
    second = await make_app(store_kind="sqlite")
    second.taskflow.task(name="rebuild_index", requeue_on_interrupt=True)(rebuild_index)
    record = await second.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert calls == [1, 2]
    assert record.attempts == 2
    assert record.owner == second.taskflow.instance_id
    assert [attempt.status for attempt in record.attempt_history] == [
        TaskStatus.INTERRUPTED,
        TaskStatus.SUCCESS,
    ]


async def test_taskflow_shutdown_waits_for_task(make_app: MakeApp) -> None:
    running = await make_app(shutdown_grace=3.0)

    @running.taskflow.task
    async def short_job() -> None:
        await asyncio.sleep(0.2)

    task_id = await running.taskflow.add_task(short_job)
    await running.wait_for_status(task_id, TaskStatus.RUNNING)
    started = time.monotonic()
    await running.stop()
    elapsed = time.monotonic() - started
    record = await running.read_after_stop(task_id)

    assert record is not None
    assert record.status is TaskStatus.SUCCESS
    assert elapsed < 2.0


async def test_taskflow_shutdown_releases_pending(make_app: MakeApp) -> None:
    running = await make_app(max_concurrency=1, shutdown_grace=0.1, retry_delay_scale=1.0)

    @running.taskflow.task
    async def blocker() -> None:
        await asyncio.sleep(GATE_TIMEOUT)

    @running.taskflow.task(retries=1, delay=10.0)
    async def flaky() -> None:
        raise ConnectionError("not yet")

    flaky_id = await running.taskflow.add_task(flaky)
    await running.wait_for_attempts(flaky_id, 1)
    waiting = await running.wait_for_status(flaky_id, TaskStatus.PENDING)
    blocker_id = await running.taskflow.add_task(blocker)
    await running.wait_for_status(blocker_id, TaskStatus.RUNNING)
    queued_id = await running.taskflow.add_task(blocker)
    await running.stop()
    queued = await running.read_after_stop(queued_id)
    released = await running.read_after_stop(flaky_id)

    assert queued is not None
    assert queued.status is TaskStatus.PENDING
    assert queued.owner is None
    assert queued.attempts == 0
    assert released is not None
    assert released.status is TaskStatus.PENDING
    assert released.owner is None
    assert released.scheduled_at == waiting.scheduled_at


async def test_taskflow_add_task_outside_request(make_app: MakeApp) -> None:
    running = await make_app()
    received: list[str] = []

    @running.taskflow.task
    def notify(address: str) -> None:
        received.append(address)

    @running.taskflow.task
    async def fan_out(addresses: list[str]) -> None:
        for address in addresses:
            await running.taskflow.add_task(notify, address)

    task_id = await running.taskflow.add_task(fan_out, ["ada@example.com", "grace@example.com"])
    await running.wait_for_status(task_id, TaskStatus.SUCCESS)
    for _ in range(500):
        if len(received) == 2:
            break
        await asyncio.sleep(0.01)

    assert sorted(received) == ["ada@example.com", "grace@example.com"]


async def test_taskflow_add_task_idempotency_key(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def charge(order_id: int) -> None:
        pass

    first = await running.taskflow.add_task(charge, 5, idempotency_key="charge-5")
    await running.wait_for_status(first, TaskStatus.SUCCESS)
    second = await running.taskflow.add_task(charge, 5, idempotency_key="charge-5")

    assert second == first
