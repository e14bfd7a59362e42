"""TaskflowRoute: task functions added to a plain BackgroundTasks are tracked."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, BackgroundTasks
from fastapi.responses import JSONResponse
from integration_fixtures import MakeApp
from integration_fixtures import make_app as make_app  # registers the fixture
from starlette.background import BackgroundTask

from app_taskflow import TaskflowRoute, TaskStatus
from app_taskflow.models import TaskQuery


async def test_routing_tracks_task(make_app: MakeApp) -> None:
    running = await make_app()
    router = APIRouter(route_class=TaskflowRoute)
    calls: list[str] = []
    plain_calls: list[str] = []

    @running.taskflow.task(name="send_email", retries=1)
    def send_email(address: str) -> None:
        calls.append(address)
        if len(calls) == 1:
            raise ConnectionError("mail server unavailable")

    def audit(event: str) -> None:
        plain_calls.append(event)

    @router.post("/signup")
    def signup(email: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_email, email)
        background_tasks.add_task(audit, "signup")
        return {"status": "ok"}

    running.app.include_router(router)
    response = await running.client.post("/signup", params={"email": "ada@example.com"})
    listed = (await running.client.get("/tasks")).json()["items"]
    task_id = listed[0]["id"]
    record = await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert response.status_code == 200
    assert plain_calls == ["signup"]
    assert len(listed) == 1
    assert listed[0]["name"] == "send_email"
    assert record.kwargs == {"address": "ada@example.com"}
    assert record.attempts == 2
    assert calls == ["ada@example.com", "ada@example.com"]


async def test_routing_single_background_task(make_app: MakeApp) -> None:
    running = await make_app()
    router = APIRouter(route_class=TaskflowRoute)
    calls: list[int] = []

    @running.taskflow.task
    async def rebuild_index(shard: int) -> None:
        calls.append(shard)

    @router.post("/rebuild")
    async def rebuild() -> JSONResponse:
        return JSONResponse({"status": "queued"}, background=BackgroundTask(rebuild_index, 3))

    running.app.include_router(router)
    response = await running.client.post("/rebuild")
    page = await running.store.list(TaskQuery())
    record = await running.wait_for_status(page.items[0].id, TaskStatus.SUCCESS)

    assert response.json() == {"status": "queued"}
    assert record.kwargs == {"shard": 3}
    assert calls == [3]


async def test_routing_plain_background_task(make_app: MakeApp) -> None:
    running = await make_app()
    router = APIRouter(route_class=TaskflowRoute)
    plain_calls: list[str] = []

    async def audit(event: str) -> None:
        plain_calls.append(event)

    @router.post("/audit")
    async def add_audit() -> JSONResponse:
        return JSONResponse({"status": "ok"}, background=BackgroundTask(audit, "login"))

    running.app.include_router(router)
    await running.client.post("/audit")
    page = await running.store.list(TaskQuery())

    assert plain_calls == ["login"]
    assert page.items == []


async def test_routing_error_drops_task(make_app: MakeApp) -> None:
    running = await make_app()
    router = APIRouter(route_class=TaskflowRoute)
    calls: list[str] = []

    @running.taskflow.task
    def send_email(address: str) -> None:
        calls.append(address)

    @router.post("/signup")
    def signup(email: str, background_tasks: BackgroundTasks) -> JSONResponse:
        background_tasks.add_task(send_email, email)
        return JSONResponse({"detail": "email already registered"}, status_code=409)

    running.app.include_router(router)
    response = await running.client.post("/signup", params={"email": "ada@example.com"})
    await asyncio.sleep(0.2)
    page = await running.store.list(TaskQuery())

    assert response.status_code == 409
    assert page.items == []
    assert calls == []


async def test_routing_plain_route_untracked(make_app: MakeApp) -> None:
    running = await make_app()
    calls: list[str] = []

    @running.taskflow.task
    def send_email(address: str) -> None:
        calls.append(address)

    @running.app.post("/signup")
    def signup(email: str, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(send_email, email)
        return {"status": "ok"}

    await running.client.post("/signup", params={"email": "ada@example.com"})
    page = await running.store.list(TaskQuery())

    assert calls == ["ada@example.com"]
    assert page.items == []
