"""Fixtures of the in-process integration tests: a started app per test, reached over ASGI.

A test module registers the ``make_app`` fixture by importing it from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI

from app_taskflow import TaskflowContainer, TaskRecord, TaskStatus
from app_taskflow.stores import MemoryStore, SqlStore, TaskStore
from app_taskflow.taskflow import Taskflow

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"
"""The repository's folder of configuration files. The tests use its ``test.yaml``."""

FAST_SETTINGS: dict[str, Any] = {"shutdown_grace": 0.5}
"""Dispatcher settings every test app gets unless a test passes its own."""


def build_container(
    store_kind: str = "memory", database: Path | None = None, **settings: Any
) -> TaskflowContainer:
    """Return the ``test`` container with its store swapped and dispatcher settings changed.

    Args:
        store_kind: ``memory`` for a ``MemoryStore``, ``sqlite`` for a ``SqlStore`` file.
        database: the SQLite file, required with ``store_kind="sqlite"``.
        **settings: fields of ``DispatcherSettings`` to change, for example
            ``max_concurrency=1`` or ``retry_delay_scale=1.0`` for real retry delays.
    """
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)
    if store_kind == "memory":
        container.store.override(providers.Singleton(MemoryStore))
    elif store_kind == "sqlite":
        assert database is not None, "a sqlite store needs database="
        container.store.override(providers.Singleton(SqlStore, url=f"sqlite:///{database}"))
    else:
        raise ValueError(f"Invalid store_kind {store_kind!r}: expected 'memory' or 'sqlite'.")

    changed = dataclasses.replace(container.dispatcher_settings(), **settings)
    container.dispatcher_settings.override(providers.Object(changed))
    return container


def asgi_client(app: FastAPI, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    """Return a client that sends requests to ``app`` in process.

    It sends ``X-Taskflow-Request: 1``, as the dashboard does, so that the REST API's
    actions accept its POST requests.
    """
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"X-Taskflow-Request": "1"}
    )


@dataclasses.dataclass
class RunningApp:
    """A FastAPI app with the taskflow installed and its lifespan entered.

    A test declares its tasks on ``taskflow`` and its routes on ``app`` after the start.
    Both are looked up at call time, so that works.
    """

    app: FastAPI
    taskflow: Taskflow
    container: TaskflowContainer
    client: httpx.AsyncClient
    store_kind: str
    database: Path
    _lifespan: AsyncExitStack

    @property
    def store(self) -> TaskStore:
        """The started store; use ``read_after_stop`` once the app is stopped."""
        return self.taskflow.store

    async def stop(self) -> None:
        """Leave the lifespan: the dispatcher shuts down and the store closes."""
        await self._lifespan.aclose()

    async def read_after_stop(self, task_id: str) -> TaskRecord | None:
        """Read a task of the stopped app: from its memory store, or a new SQLite connection."""
        if self.store_kind == "memory":
            memory_store: TaskStore = self.container.store()
            return await memory_store.get(task_id)

        sql_store = SqlStore(f"sqlite:///{self.database}")
        await sql_store.open()
        try:
            return await sql_store.get(task_id)
        finally:
            await sql_store.close()

    async def wait_for_status(
        self, task_id: str, *statuses: TaskStatus, within: float = 5.0
    ) -> TaskRecord:
        """Poll the store until the task has one of ``statuses``, and return it."""
        return await wait_for_status(self.store, task_id, *statuses, within=within)

    async def wait_for_attempts(self, task_id: str, attempts: int, within: float = 5.0) -> None:
        """Poll the store until the task has started ``attempts`` attempts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            record = await self.store.get(task_id)
            if record is not None and record.attempts >= attempts:
                return
            if loop.time() > deadline:
                seen = None if record is None else record.attempts
                raise AssertionError(
                    f"Task {task_id} did not reach {attempts} attempt(s) within {within} s; "
                    f"last seen: {seen}."
                )
            await asyncio.sleep(0.01)


async def wait_for_status(
    store: TaskStore, task_id: str, *statuses: TaskStatus, within: float = 5.0
) -> TaskRecord:
    """Poll ``store`` until the task has one of ``statuses``, and return it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        record = await store.get(task_id)
        if record is not None and record.status in statuses:
            return record
        if loop.time() > deadline:
            seen = None if record is None else record.status.value
            expected = ", ".join(status.value for status in statuses)
            raise AssertionError(
                f"Task {task_id} did not reach {expected} within {within} s; last seen: {seen}."
            )
        await asyncio.sleep(0.01)


class MakeApp(Protocol):
    """The signature of the ``make_app`` fixture."""

    def __call__(
        self,
        *,
        store_kind: str = "memory",
        install: bool = True,
        **settings: Any,
    ) -> Awaitable[RunningApp]: ...


@pytest.fixture
async def make_app(tmp_path: Path) -> AsyncIterator[MakeApp]:
    """Return a factory of started apps; each is stopped and its client closed afterwards.

    The factory takes ``store_kind`` (``memory`` or ``sqlite``), ``install`` (whether to call
    ``taskflow.install(app)``) and ``DispatcherSettings`` fields, on top of ``FAST_SETTINGS``.
    Every SQLite app of one test shares one database file, as instances of one app would.
    """
    async with AsyncExitStack() as cleanup:

        async def make(
            *, store_kind: str = "memory", install: bool = True, **settings: Any
        ) -> RunningApp:
            database = tmp_path / "tasks.db"
            container = build_container(store_kind, database, **{**FAST_SETTINGS, **settings})
            taskflow = container.taskflow()
            app = FastAPI(lifespan=taskflow.lifespan)
            if install:
                taskflow.install(app)
            client = await cleanup.enter_async_context(asgi_client(app))

            lifespan = AsyncExitStack()
            await lifespan.enter_async_context(taskflow.lifespan(app))
            cleanup.push_async_callback(lifespan.aclose)
            return RunningApp(app, taskflow, container, client, store_kind, database, lifespan)

        yield make
