"""Store outages in process: a store that can be switched off, results written once it is back."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from dependency_injector import providers
from fastapi import Depends, FastAPI
from integration_fixtures import CONTAINERS, asgi_client, wait_for_status
from loguru import logger

from app_taskflow import TaskflowContainer, TaskflowTasks, TaskStatus
from app_taskflow.errors import StoreUnavailableError
from app_taskflow.models import TaskQuery
from app_taskflow.stores import MemoryStore

DOWN_MESSAGE = "connection refused (test outage)"


class SwitchableStore(MemoryStore):
    """A MemoryStore whose every call raises StoreUnavailableError while ``down`` is set.

    While ``heartbeat_down`` is set, ``heartbeat`` alone raises it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.heartbeat_down = False
        self.failed_calls = 0

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name.startswith("_") or name in ("down", "failed_calls", "watch", "open", "close"):
            return attribute
        if not callable(attribute) or not asyncio.iscoroutinefunction(attribute):
            return attribute

        async def guarded(*args: Any, **kwargs: Any) -> Any:
            if self.down or (name == "heartbeat" and self.heartbeat_down):
                self.failed_calls += 1
                raise StoreUnavailableError(DOWN_MESSAGE)
            return await attribute(*args, **kwargs)

        return guarded


@dataclasses.dataclass
class OutageApp:
    """An app on a SwitchableStore, with a route that adds one task."""

    store: SwitchableStore
    client: httpx.AsyncClient
    gate: asyncio.Event
    runs: list[str]


async def start_outage_app(
    policy: str,
    buffer_size: int = 100,
    heartbeat_interval: float = 0.05,
    lease_expiry: float = 30.0,
) -> AsyncIterator[OutageApp]:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)
    store = SwitchableStore()
    container.store.override(providers.Object(store))
    settings = dataclasses.replace(
        container.dispatcher_settings(),
        outage_policy=policy,
        outage_buffer_size=buffer_size,
        heartbeat_interval=heartbeat_interval,
        lease_expiry=lease_expiry,
        poll_interval=0.05,
        shutdown_grace=0.5,
    )
    container.dispatcher_settings.override(providers.Object(settings))
    taskflow = container.taskflow()
    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)
    gate = asyncio.Event()
    runs: list[str] = []

    @taskflow.task(name="outage.gated")
    async def gated(label: str) -> None:
        await gate.wait()
        runs.append(label)

    @app.post("/add")
    async def add(label: str, tasks: TaskflowTasks = Depends()) -> dict[str, str]:
        return {"task_id": tasks.add_task(gated, label)}

    async with taskflow.lifespan(app), asgi_client(app, raise_app_exceptions=False) as client:
        yield OutageApp(store, client, gate, runs)


@pytest.fixture
def captured_warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="WARNING")
    yield lines
    logger.remove(sink)


async def test_outage_result_written_after_store_returns() -> None:
    async for running in start_outage_app("raise"):
        response = await running.client.post("/add", params={"label": "a"})
        task_id = response.json()["task_id"]
        await wait_for_status(running.store, task_id, TaskStatus.RUNNING)

        running.store.down = True
        running.gate.set()
        await asyncio.sleep(0.3)
        assert running.runs == ["a"]
        assert running.store.failed_calls > 0

        running.store.down = False
        record = await wait_for_status(running.store, task_id, TaskStatus.SUCCESS, within=10)
        assert record.attempts == 1


# With a heartbeat as frequent as the poll, every recovery is a full pass. With a slower
# one, most recoveries follow a look at the leases.
@pytest.mark.parametrize("heartbeat_interval", [0.05, 0.2], ids=["full-pass", "lease-look"])
async def test_outage_longer_than_lease_keeps_tasks(heartbeat_interval: float) -> None:
    # The instance's own lease expires during the outage. Once the store responds, the lease
    # must be renewed before any recovery, or the instance takes back its own running task.
    # The renewal comes last here, after every other call that waited out the outage.
    async for running in start_outage_app(
        "raise", heartbeat_interval=heartbeat_interval, lease_expiry=0.3
    ):
        response = await running.client.post("/add", params={"label": "a"})
        task_id = response.json()["task_id"]
        await wait_for_status(running.store, task_id, TaskStatus.RUNNING)

        running.store.down = True
        running.store.heartbeat_down = True
        await asyncio.sleep(0.6)
        running.store.down = False
        await asyncio.sleep(0.5)
        running.store.heartbeat_down = False
        await asyncio.sleep(0.2)
        running.gate.set()
        record = await wait_for_status(running.store, task_id, TaskStatus.SUCCESS, within=10)

        assert record.attempts == 1
        assert running.runs == ["a"]


async def test_outage_raise_policy_answers_503() -> None:
    async for running in start_outage_app("raise"):
        running.store.down = True
        response = await running.client.post("/add", params={"label": "a"})

        assert response.status_code == 503
        assert "task store is unreachable" in response.json()["detail"]
        assert response.headers["retry-after"] == "5"
        running.store.down = False
        page = await running.store.list(TaskQuery())
        assert page.items == []


async def test_outage_buffer_policy_stores_later() -> None:
    async for running in start_outage_app("buffer"):
        running.gate.set()
        running.store.down = True
        response = await running.client.post("/add", params={"label": "buffered"})
        assert response.status_code == 200
        task_id = response.json()["task_id"]

        await asyncio.sleep(0.2)
        running.store.down = False
        await wait_for_status(running.store, task_id, TaskStatus.SUCCESS, within=10)
        assert running.runs == ["buffered"]


async def test_outage_full_buffer_answers_503() -> None:
    async for running in start_outage_app("buffer", buffer_size=1):
        running.store.down = True
        first = await running.client.post("/add", params={"label": "kept"})
        second = await running.client.post("/add", params={"label": "refused"})

        assert first.status_code == 200
        assert second.status_code == 503
        running.store.down = False


async def test_outage_logs_one_warning_each_way(captured_warnings: list[str]) -> None:
    async for running in start_outage_app("buffer"):
        running.gate.set()
        running.store.down = True
        for label in ("a", "b", "c"):
            await running.client.post("/add", params={"label": label})
        await asyncio.sleep(0.5)
        running.store.down = False
        await asyncio.sleep(0.5)

        unreachable = [line for line in captured_warnings if "Store unreachable" in line]
        reachable = [line for line in captured_warnings if "Store reachable again" in line]
        assert running.store.failed_calls > 3
        assert len(unreachable) == 1
        assert len(reachable) == 1
        assert "3 task(s) were buffered" in reachable[0]


async def test_outage_api_read_answers_503() -> None:
    async for running in start_outage_app("raise"):
        running.store.down = True
        response = await running.client.get("/tasks")
        running.store.down = False

        assert response.status_code == 503
        assert DOWN_MESSAGE in response.json()["detail"]
