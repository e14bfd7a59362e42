"""TaskflowTasks: the tracked task queue a route receives with ``Depends()``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Mapping
from typing import Any, ClassVar, Self

import anyio.from_thread
from fastapi import Request

from app_taskflow.errors import TaskflowError
from app_taskflow.middleware import request_tasks


class TaskflowTasks:
    """The tracked task queue of one request.

    Declare it in a route as ``tasks: TaskflowTasks = Depends()``. Tasks added here are
    stored before the response starts and run after it is sent, like ``BackgroundTasks``,
    but with an id, retries, logs and history.
    """

    # FastAPI runs a class dependency in a worker thread, but a callable whose
    # ``__wrapped__`` is a coroutine function on the event loop, awaiting its result. So
    # ``__wrapped__`` names ``_from_request`` and an instance awaits to itself, which saves
    # the thread hop on every request. NOTE: this follows how FastAPI 0.165 classifies
    # dependencies; a version that ignores ``__wrapped__`` runs the class in a thread.
    __wrapped__: ClassVar[Callable[[Request], Any]]

    def __init__(self, request: Request) -> None:
        self._tasks = request_tasks(request.scope)
        self._taskflow = self._tasks.taskflow

    def __await__(self) -> Generator[None, None, Self]:
        yield from ()
        return self

    def add_task(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Add a call of task ``func`` and return its id (a UUID string).

        With an ``idempotency_key`` held by a PENDING, RUNNING or SUCCESS task, nothing is
        added and that task's id is returned. A keyed call reads the store at once, so in
        an ``async def`` route it needs ``await add_task_async(...)`` instead.

        ``tags`` are labels stored with the task, shown in its log lines and the dashboard,
        and filtered on by ``GET /tasks?tag=key:value``: at most 20, each key matching
        ``[A-Za-z_][A-Za-z0-9_.-]{0,63}`` and each value a string of at most 256
        characters. The task also records the request's method, path and request id
        header as its ``origin``. ``idempotency_key`` and ``tags`` are keywords of
        ``add_task`` itself, so they never reach ``func``.

        Raises:
            NotATaskError: ``func`` is not decorated with ``@taskflow.task()``.
            TaskArgumentError: an argument cannot be stored and restored with its type, or
                a tag is invalid.
            TypeError: ``idempotency_key`` or ``tags`` has the wrong type.
            IdempotencyConflictError: the key is held by a call with other arguments.
        """
        record = self._taskflow.build_record(
            func, args, kwargs, idempotency_key, tags, self._tasks.origin
        )
        if idempotency_key is None:
            self._tasks.add(record)
            return record.id

        if _on_event_loop():
            raise TaskflowError(
                f"add_task(..., idempotency_key={idempotency_key!r}) must read the store, "
                "which would block the event loop in an async route; use "
                "'await tasks.add_task_async(...)' there."
            )
        task_id: str = anyio.from_thread.run(self._tasks.add_now, record)
        return task_id

    async def add_task_async(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Store a call of task ``func`` now and return its id; it runs after the response.

        Takes the same arguments and raises the same errors as ``add_task``.
        """
        record = self._taskflow.build_record(
            func, args, kwargs, idempotency_key, tags, self._tasks.origin
        )
        return await self._tasks.add_now(record)


async def _from_request(request: Request) -> TaskflowTasks:
    return TaskflowTasks(request)


TaskflowTasks.__wrapped__ = _from_request


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
