"""TaskflowMiddleware: tasks stored before the response, started after it, dropped on errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from integration_fixtures import MakeApp, RunningApp, asgi_client
from integration_fixtures import make_app as make_app  # registers the fixture
from starlette.middleware.base import RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app_taskflow import TaskflowTasks, TaskStatus
from app_taskflow.models import TaskQuery

Tasks = Annotated[TaskflowTasks, Depends()]

NOT_RUN_WAIT = 0.2
"""Seconds a test waits before it checks that a dropped task did not run."""


class ResponseRecorder:
    """Wraps an app like a server would, and records what the store contains as the response goes.

    ``stored_at_start`` maps the id of each stored task to its status at the moment the
    response starts. ``events`` gets ``"response sent"`` once the last body part was sent.
    """

    def __init__(self, running: RunningApp, events: list[str]) -> None:
        self.app: ASGIApp = running.app
        self.running = running
        self.events = events
        self.stored_at_start: dict[str, TaskStatus] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                page = await self.running.store.list(TaskQuery())
                self.stored_at_start = {item.id: item.status for item in page.items}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.events.append("response sent")

        await self.app(scope, receive, record)


def recorder_client(recorder: ResponseRecorder) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=recorder)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_middleware_stores_before_response(make_app: MakeApp, kind: str) -> None:
    running = await make_app()
    events: list[str] = []

    @running.taskflow.task
    def sync_job() -> None:
        events.append("task started")

    @running.taskflow.task
    async def async_job() -> None:
        events.append("task started")

    job = sync_job if kind == "sync" else async_job

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(job)}

    recorder = ResponseRecorder(running, events)
    async with recorder_client(recorder) as client:
        response = await client.post("/jobs")
    task_id = response.json()["task_id"]
    stored = await running.store.get(task_id)
    await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert stored is not None
    assert recorder.stored_at_start == {task_id: TaskStatus.PENDING}
    assert events == ["response sent", "task started"]


async def test_middleware_async_route_starts_after_response(make_app: MakeApp) -> None:
    running = await make_app()
    events: list[str] = []

    @running.taskflow.task
    async def job() -> None:
        events.append("task started")

    @running.app.post("/jobs")
    async def add_job(tasks: Tasks) -> dict[str, str]:
        task_id = tasks.add_task(job)
        await asyncio.sleep(0.05)  # The task must not start while the route still runs.
        events.append("route returned")
        return {"task_id": task_id}

    recorder = ResponseRecorder(running, events)
    async with recorder_client(recorder) as client:
        response = await client.post("/jobs")
    task_id = response.json()["task_id"]
    await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert recorder.stored_at_start == {task_id: TaskStatus.PENDING}
    assert events == ["route returned", "response sent", "task started"]


async def test_middleware_streaming_response(make_app: MakeApp) -> None:
    running = await make_app()
    events: list[str] = []

    @running.taskflow.task
    async def job(label: str) -> None:
        events.append(f"task {label} started")

    @running.app.get("/stream")
    async def stream(tasks: Tasks) -> StreamingResponse:
        tasks.add_task(job, "before")

        async def body() -> AsyncIterator[bytes]:
            yield b"one "
            tasks.add_task(job, "during")
            await asyncio.sleep(0.05)
            yield b"two"

        return StreamingResponse(body(), media_type="text/plain")

    recorder = ResponseRecorder(running, events)
    async with recorder_client(recorder) as client:
        response = await client.get("/stream")
    page = await running.store.list(TaskQuery())
    for item in page.items:
        await running.wait_for_status(item.id, TaskStatus.SUCCESS)

    assert response.text == "one two"
    assert list(recorder.stored_at_start.values()) == [TaskStatus.PENDING]
    assert len(page.items) == 2
    assert events[0] == "response sent"
    assert sorted(events[1:]) == ["task before started", "task during started"]


async def test_middleware_route_error_drops_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []

    @running.taskflow.task
    def job() -> None:
        ran.append("job")

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        tasks.add_task(job)
        raise RuntimeError("the route failed after add_task")

    async with asgi_client(running.app, raise_app_exceptions=False) as client:
        response = await client.post("/jobs")
    await asyncio.sleep(NOT_RUN_WAIT)
    page = await running.store.list(TaskQuery())

    assert response.status_code == 500
    assert page.items == []
    assert ran == []


async def test_middleware_route_error_raised(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    def job() -> None:
        pass

    @running.app.post("/jobs")
    async def add_job(tasks: Tasks) -> dict[str, str]:
        tasks.add_task(job)
        raise RuntimeError("the route failed after add_task")

    with pytest.raises(RuntimeError, match="the route failed after add_task"):
        await running.client.post("/jobs")

    page = await running.store.list(TaskQuery())
    assert page.items == []


async def test_middleware_http_exception_drops_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []

    @running.taskflow.task
    def job() -> None:
        ran.append("job")

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        tasks.add_task(job)
        raise HTTPException(status_code=400, detail="invalid order")

    response = await running.client.post("/jobs")
    await asyncio.sleep(NOT_RUN_WAIT)
    page = await running.store.list(TaskQuery())

    assert response.status_code == 400
    assert response.json() == {"detail": "invalid order"}
    assert page.items == []
    assert ran == []


async def test_middleware_error_status_drops_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []

    @running.taskflow.task
    async def job() -> None:
        ran.append("job")

    @running.app.post("/jobs")
    async def add_job(tasks: Tasks) -> JSONResponse:
        tasks.add_task(job)
        return JSONResponse({"detail": "unprocessable"}, status_code=422)

    response = await running.client.post("/jobs")
    await asyncio.sleep(NOT_RUN_WAIT)
    page = await running.store.list(TaskQuery())

    assert response.status_code == 422
    assert page.items == []
    assert ran == []


async def test_middleware_error_cancels_stored_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []
    task_ids: list[str] = []

    @running.taskflow.task
    async def job() -> None:
        ran.append("job")

    @running.app.post("/jobs")
    async def add_job(tasks: Tasks) -> dict[str, str]:
        task_ids.append(await tasks.add_task_async(job))
        raise HTTPException(status_code=409, detail="conflict")

    response = await running.client.post("/jobs")
    await asyncio.sleep(NOT_RUN_WAIT)
    record = await running.store.get(task_ids[0])

    assert response.status_code == 409
    assert record is not None
    assert record.status is TaskStatus.CANCELLED
    assert record.attempts == 0
    assert ran == []


async def test_middleware_error_frees_idempotency_key(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[int] = []

    @running.taskflow.task
    async def charge(order_id: int) -> None:
        ran.append(order_id)

    @running.app.post("/charge")
    async def add_charge(fail: bool, tasks: Tasks) -> dict[str, str]:
        task_id = await tasks.add_task_async(charge, 7, idempotency_key="charge-7")
        if fail:
            raise HTTPException(status_code=503, detail="payment provider down")
        return {"task_id": task_id}

    failed = await running.client.post("/charge", params={"fail": True})
    succeeded = await running.client.post("/charge", params={"fail": False})
    task_id = succeeded.json()["task_id"]
    await running.wait_for_status(task_id, TaskStatus.SUCCESS)
    page = await running.store.list(TaskQuery(statuses=[TaskStatus.CANCELLED]))

    assert failed.status_code == 503
    assert succeeded.status_code == 200
    assert ran == [7]
    assert len(page.items) == 1
    assert page.items[0].id != task_id


async def test_middleware_request_without_tasks(make_app: MakeApp) -> None:
    running = await make_app()

    @running.app.get("/plain")
    def plain() -> dict[str, str]:
        return {"status": "ok"}

    response = await running.client.get("/plain")
    page = await running.store.list(TaskQuery())

    assert response.json() == {"status": "ok"}
    assert page.items == []


async def test_middleware_dependency_exit_adds_task(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[str] = []

    @running.taskflow.task
    async def job(label: str) -> None:
        ran.append(label)

    async def audit(tasks: Tasks) -> AsyncIterator[None]:
        yield
        tasks.add_task(job, "dependency exit")

    @running.app.post("/jobs", dependencies=[Depends(audit)])
    async def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(job, "route")}

    await running.client.post("/jobs")
    page = await running.store.list(TaskQuery())
    for item in page.items:
        await running.wait_for_status(item.id, TaskStatus.SUCCESS)

    assert len(page.items) == 2
    assert sorted(ran) == ["dependency exit", "route"]


@pytest.mark.parametrize("order", ["installed first", "installed last"])
async def test_middleware_with_http_middleware(make_app: MakeApp, order: str) -> None:
    running = await make_app(install=False)
    ran: list[str] = []

    async def add_header(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["X-Seen"] = "yes"
        return response

    if order == "installed first":
        running.taskflow.install(running.app)
        running.app.middleware("http")(add_header)
    else:
        running.app.middleware("http")(add_header)
        running.taskflow.install(running.app)

    @running.taskflow.task
    async def job() -> None:
        ran.append("job")

    @running.app.post("/jobs")
    def add_job(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(job)}

    response = await running.client.post("/jobs")
    await running.wait_for_status(response.json()["task_id"], TaskStatus.SUCCESS)

    assert response.headers["X-Seen"] == "yes"
    assert ran == ["job"]
