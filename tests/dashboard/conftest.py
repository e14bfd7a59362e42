"""Fixtures of the dashboard tests: a started app with the dashboard, reached in process."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI
from integration_fixtures import FAST_SETTINGS, build_container

from app_taskflow import TaskflowContainer
from app_taskflow.dashboard import DashboardHub, DashboardSettings
from app_taskflow.taskflow import Taskflow

from .support import CountingStore, EventReader, StreamingTransport

QUIET_SETTINGS = DashboardSettings(ping_interval=30.0, stream_lifetime=0, linger=0)
"""Settings without ping, end of stream or linger, for tests that do not need them."""

EVENTS = "/tasks/dashboard/events"
ACTION_HEADERS = {"X-Taskflow-Request": "1"}


@dataclasses.dataclass
class Dashboard:
    """An app with the taskflow and its dashboard installed, its lifespan entered."""

    app: FastAPI
    taskflow: Taskflow
    container: TaskflowContainer
    client: httpx.AsyncClient

    @property
    def hub(self) -> DashboardHub:
        """The dashboard's event hub."""
        assert self.taskflow.dashboard_hub is not None
        return self.taskflow.dashboard_hub

    @property
    def store(self) -> CountingStore:
        """The started store."""
        store = self.taskflow.store
        assert isinstance(store, CountingStore)
        return store

    @asynccontextmanager
    async def events(self, last_event_id: str | None = None) -> AsyncIterator[EventReader]:
        """Open the event stream; leaving the block disconnects, as a closed tab does."""
        headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        async with self.client.stream("GET", EVENTS, headers=headers) as response:
            assert response.status_code == 200
            yield EventReader(response)


class MakeDashboard(Protocol):
    """The signature of the ``make_dashboard`` fixture."""

    async def __call__(
        self, settings: DashboardSettings = QUIET_SETTINGS, **dispatcher_settings: Any
    ) -> Dashboard: ...


@pytest.fixture
async def make_dashboard() -> AsyncIterator[MakeDashboard]:
    """Return a factory of started apps on a ``CountingStore``, stopped after the test."""
    async with AsyncExitStack() as cleanup:

        async def make(
            settings: DashboardSettings = QUIET_SETTINGS, **dispatcher_settings: Any
        ) -> Dashboard:
            container = build_container("memory", **{**FAST_SETTINGS, **dispatcher_settings})
            container.store.override(providers.Singleton(CountingStore))
            taskflow = container.taskflow()
            app = FastAPI(lifespan=taskflow.lifespan)
            taskflow.install(app, dashboard=settings)
            client = httpx.AsyncClient(
                transport=StreamingTransport(app), base_url="http://testserver"
            )
            await cleanup.enter_async_context(client)
            await cleanup.enter_async_context(taskflow.lifespan(app))
            return Dashboard(app, taskflow, container, client)

        yield make
