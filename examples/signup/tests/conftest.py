"""Fixtures of the signup example's tests: the app on a fresh memory store, and a client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import respx
from dependency_injector import providers

from app_taskflow.models import TERMINAL_STATUSES, TaskStatus
from app_taskflow.stores import MemoryStore

# The example reads its configuration when it is imported, so the test environment
# (containers/test.yaml: retries without waiting) must be set before that import. It is
# restored right after, so other test suites see the process environment unchanged.
with pytest.MonkeyPatch.context() as patch:
    patch.setenv("APP_TASKFLOW_ENV", "test")
    from examples.signup import app as signup_app
    from examples.signup import tasks as signup_tasks

SETTLE_TIMEOUT = 10.0
"""Seconds a test waits for a task to end before it fails."""


@pytest.fixture
async def client(respx_mock: respx.MockRouter) -> AsyncIterator[httpx.AsyncClient]:
    """Yield a client of the example app, started on a fresh memory store.

    ``respx_mock`` stays active until the app has stopped, so a task never reaches the
    network: a request that no route of the test mocks fails.
    """
    signup_app.received_events.clear()
    with signup_tasks.container.store.override(providers.Singleton(MemoryStore)):
        async with signup_tasks.taskflow.lifespan(signup_app.app):
            transport = httpx.ASGITransport(app=signup_app.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://example") as api:
                yield api


@pytest.fixture
def wait_until_done(client: httpx.AsyncClient) -> Callable[[str], Awaitable[dict[str, Any]]]:
    """Return a coroutine function that polls ``GET /tasks/{id}`` until the task has ended."""

    async def wait(task_id: str) -> dict[str, Any]:
        async with asyncio.timeout(SETTLE_TIMEOUT):
            while True:
                response = await client.get(f"/tasks/{task_id}")
                response.raise_for_status()
                record: dict[str, Any] = response.json()
                if TaskStatus(record["status"]) in TERMINAL_STATUSES:
                    return record
                await asyncio.sleep(0.01)

    return wait


@pytest.fixture
def script_chance(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Return a function that makes ``build_report`` draw the given numbers, in order."""

    def script(*numbers: float) -> None:
        monkeypatch.setattr(signup_tasks, "chance", iter(numbers).__next__)

    return script
