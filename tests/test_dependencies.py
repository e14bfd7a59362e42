"""TaskflowTasks in sync and async routes: ids, argument checks and idempotency keys."""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from integration_fixtures import MakeApp, asgi_client, build_container, wait_for_status
from integration_fixtures import make_app as make_app  # registers the fixture

from app_taskflow import (
    IdempotencyConflictError,
    NotATaskError,
    TaskArgumentError,
    TaskflowError,
    TaskflowTasks,
    TaskStatus,
    task_log,
)
from app_taskflow.errors import NotInstalledError
from app_taskflow.models import TaskQuery

STORE_KINDS = ["memory", "sqlite"]

Tasks = Annotated[TaskflowTasks, Depends()]


@pytest.mark.parametrize("store_kind", STORE_KINDS)
async def test_add_task_user_snippet(store_kind: str, tmp_path: Path) -> None:
    container = build_container(store_kind, tmp_path / "tasks.db", shutdown_grace=0.5)
    taskflow = container.taskflow()
    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)

    @taskflow.task(retries=3, delay=1.0, backoff=2.0)
    def send_email(address: str) -> None:
        task_log(f"Sending to {address}")

    @app.post("/signup")
    def signup(email: str, tasks: Tasks):  # type: ignore[no-untyped-def]
        task_id = tasks.add_task(send_email, address=email)
        return {"task_id": task_id}

    async with taskflow.lifespan(app), asgi_client(app) as client:
        response = await client.post("/signup", params={"email": "ada@example.com"})
        task_id = response.json()["task_id"]
        stored = await taskflow.store.get(task_id)
        record = await wait_for_status(taskflow.store, task_id, TaskStatus.SUCCESS)

    assert response.status_code == 200
    assert str(uuid.UUID(task_id)) == task_id
    assert stored is not None
    assert record.kwargs == {"address": "ada@example.com"}
    assert record.attempts == 1
    assert record.max_attempts == 4
    assert [entry.message for entry in record.logs] == ["Sending to ada@example.com"]


async def test_add_task_async_route(make_app: MakeApp) -> None:
    running = await make_app()
    received: list[int] = []

    @running.taskflow.task
    async def count(number: int) -> None:
        received.append(number)

    @running.app.post("/count")
    async def add_count(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(count, 7)}

    response = await running.client.post("/count")
    task_id = response.json()["task_id"]
    stored = await running.store.get(task_id)
    record = await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert response.status_code == 200
    assert str(uuid.UUID(task_id)) == task_id
    assert stored is not None
    assert record.kwargs == {"number": 7}
    assert received == [7]


async def test_add_task_several_in_one_request(make_app: MakeApp) -> None:
    running = await make_app()
    received: list[str] = []

    @running.taskflow.task
    def greet(name: str) -> None:
        received.append(name)

    @running.app.post("/greet")
    def greet_all(tasks: Tasks) -> list[str]:
        return [tasks.add_task(greet, name) for name in ("ada", "grace", "linus")]

    task_ids = (await running.client.post("/greet")).json()
    for task_id in task_ids:
        await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert len(set(task_ids)) == 3
    assert sorted(received) == ["ada", "grace", "linus"]


async def test_add_task_plain_function(make_app: MakeApp) -> None:
    running = await make_app()

    def send_plain(address: str) -> None:
        pass

    @running.app.post("/plain")
    def add_plain(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_plain, "ada@example.com")}

    expected = r"send_plain is not a task: decorate it with @taskflow\.task\(\)"
    with pytest.raises(NotATaskError, match=expected):
        await running.client.post("/plain")

    page = await running.store.list(TaskQuery())
    assert page.items == []


async def test_add_task_task_of_other_taskflow(make_app: MakeApp) -> None:
    running = await make_app()
    other = await make_app()

    @other.taskflow.task
    def foreign() -> None:
        pass

    @running.app.post("/foreign")
    def add_foreign(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(foreign)}

    with pytest.raises(NotATaskError, match="declared with another Taskflow"):
        await running.client.post("/foreign")


async def test_add_task_unserializable_argument(make_app: MakeApp) -> None:
    running = await make_app()
    ran: list[Any] = []

    @running.taskflow.task
    def store_payload(payload: Any) -> None:
        ran.append(payload)

    @running.app.post("/payload")
    def add_payload(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(store_payload, payload=object())}

    with pytest.raises(TaskArgumentError, match="Argument 'payload' of task"):
        await running.client.post("/payload")

    page = await running.store.list(TaskQuery())
    assert page.items == []
    assert ran == []


async def test_add_task_wrong_arguments(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    def send_email(address: str) -> None:
        pass

    @running.app.post("/send")
    def add_send(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_email, recipient="ada@example.com")}

    with pytest.raises(TaskArgumentError, match="Invalid arguments for task"):
        await running.client.post("/send")


async def test_taskflow_tasks_not_installed(make_app: MakeApp) -> None:
    running = await make_app(install=False)

    @running.taskflow.task
    def send_email(address: str) -> None:
        pass

    @running.app.post("/send")
    def add_send(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_email, "ada@example.com")}

    with pytest.raises(NotInstalledError, match=re.escape("call taskflow.install(app)")):
        await running.client.post("/send")


async def test_add_task_taskflow_not_started() -> None:
    taskflow = build_container().taskflow()
    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)

    @taskflow.task
    def send_email(address: str) -> None:
        pass

    @app.post("/send")
    def add_send(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_email, "ada@example.com")}

    async with asgi_client(app) as client:
        with pytest.raises(TaskflowError, match="The taskflow is not started"):
            await client.post("/send")


@pytest.mark.parametrize("store_kind", STORE_KINDS)
async def test_add_task_idempotency_key_sync_route(make_app: MakeApp, store_kind: str) -> None:
    running = await make_app(store_kind=store_kind)
    charged: list[int] = []

    @running.taskflow.task
    def charge(order_id: int) -> None:
        charged.append(order_id)

    @running.app.post("/orders/{order_id}/charge")
    def add_charge(order_id: int, tasks: Tasks) -> dict[str, str]:
        task_id = tasks.add_task(charge, order_id, idempotency_key=f"charge-{order_id}")
        return {"task_id": task_id}

    first = (await running.client.post("/orders/42/charge")).json()["task_id"]
    await running.wait_for_status(first, TaskStatus.SUCCESS)
    second = (await running.client.post("/orders/42/charge")).json()["task_id"]
    page = await running.store.list(TaskQuery())

    assert second == first
    assert charged == [42]
    assert len(page.items) == 1


async def test_add_task_idempotency_key_async_route(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def charge(order_id: int) -> None:
        pass

    @running.app.post("/charge")
    async def add_charge(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(charge, 42, idempotency_key="charge-42")}

    with pytest.raises(TaskflowError, match=re.escape("await tasks.add_task_async(...)")):
        await running.client.post("/charge")

    page = await running.store.list(TaskQuery())
    assert page.items == []


@pytest.mark.parametrize("store_kind", STORE_KINDS)
async def test_add_task_async_idempotency_key(make_app: MakeApp, store_kind: str) -> None:
    running = await make_app(store_kind=store_kind)
    charged: list[int] = []

    @running.taskflow.task
    async def charge(order_id: int) -> None:
        charged.append(order_id)

    @running.app.post("/charge")
    async def add_charge(tasks: Tasks) -> dict[str, str]:
        task_id = await tasks.add_task_async(charge, 42, idempotency_key="charge-42")
        return {"task_id": task_id}

    first = (await running.client.post("/charge")).json()["task_id"]
    second = (await running.client.post("/charge")).json()["task_id"]
    await running.wait_for_status(first, TaskStatus.SUCCESS)

    assert second == first
    assert charged == [42]


async def test_add_task_async_without_key(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def charge(order_id: int) -> None:
        pass

    @running.app.post("/charge")
    async def add_charge(tasks: Tasks) -> dict[str, str]:
        return {"task_id": await tasks.add_task_async(charge, 42)}

    task_id = (await running.client.post("/charge")).json()["task_id"]
    record = await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert record.idempotency_key is None


async def test_add_task_idempotency_conflict(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    def charge(order_id: int) -> None:
        pass

    @running.app.post("/orders/{order_id}/charge")
    def add_charge(order_id: int, tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(charge, order_id, idempotency_key="same-key")}

    first = (await running.client.post("/orders/1/charge")).json()["task_id"]
    with pytest.raises(IdempotencyConflictError, match=f"already used by task {first}"):
        await running.client.post("/orders/2/charge")

    page = await running.store.list(TaskQuery())
    assert [item.id for item in page.items] == [first]


async def test_add_task_idempotency_key_not_string(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    def charge(order_id: int) -> None:
        pass

    @running.app.post("/charge")
    def add_charge(tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(charge, 1, idempotency_key=42)}  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="Invalid idempotency_key 42"):
        await running.client.post("/charge")


async def test_dependency_is_built_on_the_event_loop_thread(
    make_app: MakeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await make_app()
    threads: list[int] = []
    original_init = TaskflowTasks.__init__

    def recording_init(self: TaskflowTasks, request: Any) -> None:
        threads.append(threading.get_ident())
        original_init(self, request)

    monkeypatch.setattr(TaskflowTasks, "__init__", recording_init)

    @running.app.post("/nothing")
    async def add_nothing(tasks: Tasks) -> dict[str, bool]:
        return {"same_thread": threads == [threading.get_ident()]}

    response = await running.client.post("/nothing")

    assert response.json() == {"same_thread": True}


async def test_dependency_instance_awaits_to_itself(make_app: MakeApp) -> None:
    running = await make_app()
    seen: list[bool] = []

    @running.app.post("/await")
    async def await_tasks(tasks: Tasks) -> dict[str, bool]:
        seen.append(await tasks is tasks)
        return {}

    await running.client.post("/await")

    assert seen == [True]
