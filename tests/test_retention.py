"""Retention: the dispatcher prunes finished tasks by age and count, in the background."""

from __future__ import annotations

import asyncio

from integration_fixtures import MakeApp, RunningApp
from integration_fixtures import make_app as make_app  # registers the fixture

from app_taskflow import TaskStatus
from app_taskflow.models import TaskQuery


async def finish_tasks(running: RunningApp, count: int) -> list[str]:
    @running.taskflow.task(name=f"retention.noop{count}")
    async def noop(number: int) -> None:
        del number

    task_ids = [await running.taskflow.add_task(noop, number) for number in range(count)]
    for task_id in task_ids:
        await running.wait_for_status(task_id, TaskStatus.SUCCESS)
    return task_ids


async def test_retention_prunes_by_count(make_app: MakeApp) -> None:
    running = await make_app(retention_max_age=None, retention_max_count=2, retention_interval=0.05)
    task_ids = await finish_tasks(running, 5)

    await asyncio.sleep(0.3)
    page = await running.store.list(TaskQuery())

    assert [task.id for task in page.items] == task_ids[:-3:-1]


async def test_retention_prunes_by_age(make_app: MakeApp) -> None:
    running = await make_app(
        retention_max_age=0.1, retention_max_count=None, retention_interval=0.05
    )
    await finish_tasks(running, 3)

    await asyncio.sleep(0.5)
    page = await running.store.list(TaskQuery())

    assert page.items == []


async def test_retention_keeps_active_tasks(make_app: MakeApp) -> None:
    running = await make_app(retention_max_age=0.1, retention_max_count=0, retention_interval=0.05)
    gate = asyncio.Event()

    @running.taskflow.task(name="retention.gated")
    async def gated() -> None:
        await gate.wait()

    task_id = await running.taskflow.add_task(gated)
    await running.wait_for_status(task_id, TaskStatus.RUNNING)
    await asyncio.sleep(0.3)
    record = await running.store.get(task_id)
    gate.set()

    assert record is not None
    assert record.status is TaskStatus.RUNNING


async def test_retention_off_keeps_everything(make_app: MakeApp) -> None:
    running = await make_app(
        retention_max_age=None, retention_max_count=None, retention_interval=0.05
    )
    await finish_tasks(running, 4)

    await asyncio.sleep(0.2)
    page = await running.store.list(TaskQuery())

    assert len(page.items) == 4
