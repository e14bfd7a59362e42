"""The two apps under test, with the same routes: plain ``BackgroundTasks`` and app-taskflow.

Both apps have ``POST /add?count=N&kind=async|sync``, which adds ``N`` trivial tasks and
returns ``{"added": N}``, and ``GET /ping``, an unrelated route that adds nothing. The
app-taskflow app also has the library's REST API and dashboard under ``/tasks``.
"""

import os
import threading
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, Query
from loguru import logger

if TYPE_CHECKING:
    from app_taskflow import Taskflow
    from app_taskflow.stores.base import TaskStore

ADD_PATH = "/add"
PING_PATH = "/ping"
ASYNC_TASK_NAME = "bench.trivial_async"
SYNC_TASK_NAME = "bench.trivial_sync"

TaskKind = Literal["async", "sync"]


class CallCounter:
    """A count of the trivial tasks' calls, so a benchmark can pace itself without the store."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def increment(self) -> None:
        """Add one call. Safe to call from worker threads."""
        with self._lock:
            self.value += 1


task_calls = CallCounter()
"""Calls of ``trivial_async`` and ``trivial_sync`` in this process, in either app."""


async def trivial_async() -> None:
    """Count the call and return: an async task whose own cost is next to nothing."""
    task_calls.increment()


def trivial_sync() -> None:
    """Count the call and return: a sync task whose own cost is next to nothing."""
    task_calls.increment()


def send_library_logs_to_devnull(level: str = "INFO") -> None:
    """Replace loguru's sinks with one at ``level`` that writes to ``os.devnull``.

    The library logs each task's transitions (added, started, succeeded) at INFO, so at
    INFO the figures include formatting those lines, as an app that keeps its logs pays for
    them, but not the speed of a terminal. At WARNING loguru drops the lines unformatted.
    """
    logger.remove()
    logger.add(open(os.devnull, "w"), level=level)  # noqa: SIM115 - lives as long as the process


def build_plain_app() -> FastAPI:
    """Return the baseline app, whose route adds its tasks to FastAPI's ``BackgroundTasks``."""
    app = FastAPI()

    @app.post(ADD_PATH)
    async def add(
        background_tasks: BackgroundTasks,
        count: Annotated[int, Query(ge=1)] = 1,
        kind: TaskKind = "async",
    ) -> dict[str, int]:
        function = trivial_async if kind == "async" else trivial_sync
        for _ in range(count):
            background_tasks.add_task(function)
        return {"added": count}

    _add_ping(app)
    return app


def build_taskflow_app(
    store: dict[str, Any],
    settings: dict[str, Any] | None = None,
    store_instance: "TaskStore | None" = None,
) -> tuple[FastAPI, "Taskflow"]:
    """Return an app whose route adds tracked tasks, and its taskflow (not started yet).

    Args:
        store: the ``store`` section of the configuration, such as ``{"kind": "memory"}``.
        settings: other sections of the configuration (``runner``, ``leases``, ...);
            sections left out keep the library's defaults.
        store_instance: a store object to use instead of building one from ``store``, so
            that two taskflows in one process can share a ``MemoryStore``.
    """
    # Imported here, so that the plain app's process never imports the library and its
    # start-up time is that of FastAPI alone. The module has no "from __future__ import
    # annotations", so FastAPI reads the route's annotations from these local names.
    from app_taskflow import TaskflowContainer, TaskflowTasks
    from app_taskflow.config import parse_settings

    configuration = {**(settings or {}), "store": store}
    container = TaskflowContainer.from_settings(parse_settings(configuration, source="benchmark"))
    if store_instance is not None:
        from dependency_injector import providers

        container.store.override(providers.Object(store_instance))
    taskflow = container.taskflow()
    async_task = taskflow.task(name=ASYNC_TASK_NAME)(trivial_async)
    sync_task = taskflow.task(name=SYNC_TASK_NAME)(trivial_sync)

    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)

    @app.post(ADD_PATH)
    async def add(
        tasks: Annotated[TaskflowTasks, Depends()],
        count: Annotated[int, Query(ge=1)] = 1,
        kind: TaskKind = "async",
    ) -> dict[str, int]:
        for _ in range(count):
            if kind == "async":
                tasks.add_task(async_task)
            else:
                tasks.add_task(sync_task)
        return {"added": count}

    _add_ping(app)
    return app, taskflow


def _add_ping(app: FastAPI) -> None:
    @app.get(PING_PATH)
    async def ping() -> dict[str, bool]:
        return {"ok": True}
