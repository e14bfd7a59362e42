"""The ASGI middleware that stores a request's tasks before its response starts."""

from __future__ import annotations

import json
from functools import cached_property
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app_taskflow.errors import NotInstalledError, StoreUnavailableError
from app_taskflow.logs import bind_task, log
from app_taskflow.models import TaskOrigin, TaskRecord
from app_taskflow.outage import is_unavailable

if TYPE_CHECKING:
    from app_taskflow.taskflow import Taskflow

SCOPE_KEY = "app_taskflow.request_tasks"

MAX_REQUEST_ID_CHARS = 200
"""Characters of a request id header kept in a task's origin; the rest is cut."""


class RequestTasks:
    """The tasks one request added: stored before its response, run after it."""

    def __init__(self, taskflow: Taskflow, scope: Scope | None = None) -> None:
        self.taskflow = taskflow
        self._scope = scope
        self._unsaved: list[TaskRecord] = []
        self._saved: list[TaskRecord] = []

    @cached_property
    def origin(self) -> TaskOrigin | None:
        """The request's method, path and request id header, as its tasks record them."""
        scope = self._scope
        if scope is None:
            return None
        request_id = None
        header = self.taskflow.request_id_header
        if header is not None:
            name = header.lower().encode("latin-1")
            for key, value in scope.get("headers", ()):
                if key == name:
                    request_id = value.decode("latin-1")[:MAX_REQUEST_ID_CHARS]
                    break
        return TaskOrigin(method=scope.get("method", ""), path=scope["path"], request_id=request_id)

    def add(self, record: TaskRecord) -> None:
        """Keep a new task until the response starts. Safe from the route's thread."""
        self._unsaved.append(record)

    async def add_now(self, record: TaskRecord) -> str:
        """Store a task at once and return its id, or the id of the task holding its key."""
        [task_id] = await self.taskflow.store.create([record])
        if task_id == record.id:
            self.taskflow.dispatcher.timeline.added([record])
            self._saved.append(record)
        return task_id

    async def save(self) -> None:
        """Write the tasks added so far to the store in one batch.

        While the store is unreachable, the ``buffer`` outage policy keeps the tasks in
        the dispatcher's buffer instead, which stores and runs them later.

        Raises:
            StoreUnavailableError: the store is unreachable and the tasks were not
                buffered (policy ``raise``, or the buffer is full).
        """
        if not self._unsaved:
            return
        records = list(self._unsaved)
        try:
            await self.taskflow.store.create(records)
        except Exception as error:
            if not is_unavailable(error):
                raise
            dispatcher = self.taskflow.dispatcher
            dispatcher.health.record_failure("store new tasks", error)
            buffering = self.taskflow.settings.outage_policy == "buffer"
            if not (buffering and dispatcher.buffer_tasks(records)):
                raise StoreUnavailableError(
                    f"The task store is unreachable, so the {len(records)} task(s) of this "
                    f"request were not stored ({error})."
                ) from error
        else:
            self.taskflow.dispatcher.timeline.added(records)
            self._saved.extend(records)
        # Removed only once stored or buffered, so that discard() reports a failed write.
        del self._unsaved[: len(records)]

    def start(self) -> None:
        """Hand the stored tasks to the dispatcher."""
        dispatcher = self.taskflow.dispatcher
        for record in self._saved:
            dispatcher.submit(record.id, record.name)
        self._saved.clear()

    async def discard(self, reason: str) -> None:
        """Drop the tasks of a failed request; cancel those already stored."""
        for record in self._unsaved:
            bind_task(record.id, record.name, tags=record.tags).warning(
                "Task {} [{}] was not stored or run: {}", record.name, record.id, reason
            )
        self._unsaved.clear()
        for record in self._saved:
            bind_task(record.id, record.name, tags=record.tags).warning(
                "Task {} [{}] cancelled before it ran: {}", record.name, record.id, reason
            )
            try:
                await self.taskflow.store.cancel(record.id, self.taskflow.now())
            except Exception as error:
                log.opt(exception=error).error("Could not cancel discarded task {}", record.id)
        self._saved.clear()


def request_tasks(scope: Scope) -> RequestTasks:
    """Return the tasks of the request in ``scope``.

    Raises:
        NotInstalledError: the app did not call ``taskflow.install(app)``.
    """
    tasks: RequestTasks | None = scope.get(SCOPE_KEY)
    if tasks is None:
        raise NotInstalledError(
            "Tracked tasks need the app-taskflow middleware: call taskflow.install(app) "
            "after creating the FastAPI app."
        )
    return tasks


class TaskflowMiddleware:
    """Stores the tasks a request added before its response starts, runs them after.

    A request whose response has status 400 or higher, or that raises before its response
    starts, runs none of its tasks: those not stored yet are dropped with a warning, and
    those stored early (by ``add_task_async`` or an idempotency key) are cancelled. If it
    raises after a successful response started, the tasks stored by then still run.
    """

    def __init__(self, app: ASGIApp, taskflow: Taskflow) -> None:
        self.app = app
        self.taskflow = taskflow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        tasks = RequestTasks(self.taskflow, scope)
        scope[SCOPE_KEY] = tasks
        status: int | None = None

        replaced = False

        async def send_after_saving(message: Message) -> None:
            nonlocal status, replaced
            if replaced:
                return  # The app's own response was replaced by a 503.
            if message["type"] == "http.response.start":
                status = int(message["status"])
            if status is not None and status < 400:
                # Stored before promised: the client sees no byte of a response that may
                # carry a task id before that task is in the store, streamed parts included.
                try:
                    await tasks.save()
                except StoreUnavailableError as error:
                    if message["type"] != "http.response.start":
                        raise
                    replaced, status = True, 503
                    await _send_unavailable(send, error)
                    return
            await send(message)
            if _is_last_body(message) and status is not None and status < 400:
                tasks.start()

        try:
            await self.app(scope, receive, send_after_saving)
        except BaseException:
            if status is not None and status < 400:
                # The response had started, so the client may hold the ids of the tasks
                # stored then: those run. Tasks added later were never promised.
                tasks.start()
            await tasks.discard("the request failed with an unhandled error")
            raise
        if status is None or status >= 400:
            await tasks.discard(f"the request ended with status {status}")
            return
        # Tasks added after the last body part: FastAPI (0.165) runs the exit code of a
        # dependency with yield once the response is sent, and that code may add tasks.
        await tasks.save()
        tasks.start()


async def _send_unavailable(send: Send, error: StoreUnavailableError) -> None:
    body = json.dumps({"detail": str(error)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"5"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _is_last_body(message: dict[str, Any] | Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)
