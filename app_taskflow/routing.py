"""TaskflowRoute: tracks task functions added to a plain ``BackgroundTasks``."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.background import BackgroundTask, BackgroundTasks

from app_taskflow.middleware import request_tasks
from app_taskflow.tasks import TaskDefinition


class TaskflowRoute(APIRoute):
    """A route class under which ``background_tasks.add_task(task, ...)`` is tracked.

    Use it for routes that still declare ``background_tasks: BackgroundTasks``::

        router = APIRouter(route_class=TaskflowRoute)

    After the endpoint returns, every background task whose function was declared with
    ``@taskflow.task()`` moves from the response's ``BackgroundTasks`` to app-taskflow, with
    retries, logs and history. Other background functions run as before.

    NOTE: this path returns no task id to the route, and supports no idempotency key and
    no tags: a ``tags=`` keyword here reaches the task function as an argument. Use
    ``TaskflowTasks`` where those are needed. Each task still records the request as its
    ``origin``.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def track_background_tasks(request: Request) -> Response:
            response = await handler(request)
            background = response.background
            if isinstance(background, BackgroundTasks):
                background.tasks = _adopt(request, background.tasks)
            elif isinstance(background, BackgroundTask):
                remaining = _adopt(request, [background])
                response.background = remaining[0] if remaining else None
            return response

        return track_background_tasks


def _adopt(request: Request, background_tasks: list[BackgroundTask]) -> list[BackgroundTask]:
    """Add the task functions among ``background_tasks``; return the other ones."""
    remaining: list[BackgroundTask] = []
    for background_task in background_tasks:
        if not isinstance(background_task.func, TaskDefinition):
            remaining.append(background_task)
            continue
        tasks = request_tasks(request.scope)
        record = tasks.taskflow.build_record(
            background_task.func,
            background_task.args,
            background_task.kwargs,
            origin=tasks.origin,
        )
        tasks.add(record)
    return remaining
