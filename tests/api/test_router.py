"""The REST API under /tasks: listing, reading, metrics, retry, cancel and the schema."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from integration_fixtures import MakeApp, RunningApp
from integration_fixtures import make_app as make_app  # registers the fixture

from app_taskflow import TaskStatus, current_task

GATE_TIMEOUT = 5.0
"""Seconds a blocked test task waits for its gate before it gives up by itself."""


class ReportError(Exception):
    """The error the failing tasks of this module raise."""


async def add_and_wait(running: RunningApp, func: Any, *args: Any, status: TaskStatus) -> str:
    """Add a task outside any request, wait until it has ``status`` and return its id."""
    task_id = await running.taskflow.add_task(func, *args)
    await running.wait_for_status(task_id, status)
    return task_id


async def test_list_tasks_filters(make_app: MakeApp) -> None:
    running = await make_app()
    gate = asyncio.Event()

    @running.taskflow.task(name="ok")
    async def ok(number: int) -> None:
        pass

    @running.taskflow.task(name="bad")
    async def bad() -> None:
        raise ReportError("no data")

    @running.taskflow.task
    async def held() -> None:
        await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)

    ok_first = await add_and_wait(running, ok, 1, status=TaskStatus.SUCCESS)
    bad_id = await add_and_wait(running, bad, status=TaskStatus.FAILED)
    ok_second = await add_and_wait(running, ok, 2, status=TaskStatus.SUCCESS)
    held_id = await add_and_wait(running, held, status=TaskStatus.RUNNING)

    async def listed_ids(**params: Any) -> list[str]:
        response = await running.client.get("/tasks", params=params)
        assert response.status_code == 200
        return [item["id"] for item in response.json()["items"]]

    try:
        everything = await listed_ids()
        failed = await listed_ids(status="FAILED")
        failed_or_running = await listed_ids(status=["FAILED", "RUNNING"])
        named_ok = await listed_ids(name="ok")
        named_ok_failed = await listed_ids(name="ok", status="FAILED")
        unknown_name = await listed_ids(name="no.such.task")
    finally:
        gate.set()

    assert everything == [held_id, ok_second, bad_id, ok_first]
    assert failed == [bad_id]
    assert failed_or_running == [held_id, bad_id]
    assert named_ok == [ok_second, ok_first]
    assert named_ok_failed == []
    assert unknown_name == []


async def test_list_tasks_pages(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def ok(number: int) -> None:
        pass

    created = [
        await add_and_wait(running, ok, number, status=TaskStatus.SUCCESS) for number in range(5)
    ]
    newest_first = created[::-1]

    first = (await running.client.get("/tasks", params={"limit": 2})).json()
    second = (await running.client.get("/tasks", params={"limit": 2, "offset": 2})).json()
    last = (await running.client.get("/tasks", params={"limit": 2, "offset": 4})).json()
    beyond = (await running.client.get("/tasks", params={"limit": 2, "offset": 5})).json()

    assert [item["id"] for item in first["items"]] == newest_first[:2]
    assert first["has_more"] is True
    assert first["limit"] == 2
    assert first["offset"] == 0
    assert [item["id"] for item in second["items"]] == newest_first[2:4]
    assert second["has_more"] is True
    assert [item["id"] for item in last["items"]] == newest_first[4:]
    assert last["has_more"] is False
    assert beyond["items"] == []
    assert beyond["has_more"] is False


async def test_list_tasks_summaries(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def bad() -> None:
        raise ReportError("no data")

    await add_and_wait(running, bad, status=TaskStatus.FAILED)
    [item] = (await running.client.get("/tasks")).json()["items"]

    assert item["status"] == "FAILED"
    assert item["error_message"] == "no data"
    assert "traceback" not in item
    assert "logs" not in item
    assert "attempt_history" not in item


@pytest.mark.parametrize(
    "params",
    [{"status": "DONE"}, {"limit": 0}, {"limit": 1001}, {"offset": -1}],
    ids=["unknown status", "limit 0", "limit 1001", "negative offset"],
)
async def test_list_tasks_invalid_query(make_app: MakeApp, params: dict[str, Any]) -> None:
    running = await make_app()

    response = await running.client.get("/tasks", params=params)

    assert response.status_code == 422


async def test_read_task_unknown(make_app: MakeApp) -> None:
    running = await make_app()

    response = await running.client.get("/tasks/no-such-id")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"detail": "No task has id 'no-such-id'."}


async def test_read_metrics(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task(name="ok")
    async def ok() -> None:
        await asyncio.sleep(0.01)

    @running.taskflow.task(name="bad")
    async def bad() -> None:
        raise ReportError("no data")

    await add_and_wait(running, ok, status=TaskStatus.SUCCESS)
    await add_and_wait(running, ok, status=TaskStatus.SUCCESS)
    await add_and_wait(running, bad, status=TaskStatus.FAILED)
    metrics = (await running.client.get("/tasks/metrics")).json()
    ok_metrics = metrics["by_name"]["ok"]
    bad_metrics = metrics["by_name"]["bad"]

    assert metrics["counts"]["SUCCESS"] == 2
    assert metrics["counts"]["FAILED"] == 1
    assert metrics["counts"]["RUNNING"] == 0
    assert metrics["success_rate"] == pytest.approx(2 / 3)
    assert metrics["duration"]["count"] == 3
    assert metrics["duration"]["p95"] >= 0.01
    assert sorted(metrics["by_name"]) == ["bad", "ok"]
    assert ok_metrics["counts"]["SUCCESS"] == 2
    assert ok_metrics["success_rate"] == 1.0
    assert ok_metrics["duration"]["count"] == 2
    assert ok_metrics["duration"]["mean"] >= 0.01
    assert bad_metrics["counts"]["FAILED"] == 1
    assert bad_metrics["success_rate"] == 0.0


async def test_read_metrics_empty(make_app: MakeApp) -> None:
    running = await make_app()

    metrics = (await running.client.get("/tasks/metrics")).json()

    assert set(metrics["counts"].values()) == {0}
    assert metrics["success_rate"] is None
    assert metrics["duration"]["count"] == 0
    assert metrics["by_name"] == {}


async def test_retry_failed_task(make_app: MakeApp) -> None:
    running = await make_app()
    calls: list[int] = []

    @running.taskflow.task
    async def flaky() -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            raise ReportError("first call fails")

    task_id = await add_and_wait(running, flaky, status=TaskStatus.FAILED)
    response = await running.client.post(f"/tasks/{task_id}/retry")
    queued = response.json()
    record = await running.wait_for_status(task_id, TaskStatus.SUCCESS)
    history = record.attempt_history

    assert response.status_code == 200
    assert queued["status"] in ("PENDING", "RUNNING")
    assert queued["max_attempts"] == 2
    assert calls == [1, 2]
    assert record.attempts == 2
    assert record.error_type is None
    assert [attempt.number for attempt in history] == [1, 2]
    assert [attempt.status for attempt in history] == [TaskStatus.FAILED, TaskStatus.SUCCESS]
    assert history[0].error_message == "first call fails"


async def test_retry_interrupted_task(make_app: MakeApp) -> None:
    calls: list[int] = []

    async def rebuild_index() -> None:
        calls.append(len(calls) + 1)
        if len(calls) == 1:
            await asyncio.sleep(GATE_TIMEOUT)

    first = await make_app(store_kind="sqlite", shutdown_grace=0.1)
    first_task = first.taskflow.task(name="rebuild_index")(rebuild_index)
    task_id = await add_and_wait(first, first_task, status=TaskStatus.RUNNING)
    await first.stop()
    second = await make_app(store_kind="sqlite")
    second.taskflow.task(name="rebuild_index")(rebuild_index)
    interrupted = (await second.client.get(f"/tasks/{task_id}")).json()
    response = await second.client.post(f"/tasks/{task_id}/retry")
    record = await second.wait_for_status(task_id, TaskStatus.SUCCESS)

    assert interrupted["status"] == "INTERRUPTED"
    assert response.status_code == 200
    assert calls == [1, 2]
    assert [attempt.status for attempt in record.attempt_history] == [
        TaskStatus.INTERRUPTED,
        TaskStatus.SUCCESS,
    ]


async def test_retry_success_conflict(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def ok() -> None:
        pass

    task_id = await add_and_wait(running, ok, status=TaskStatus.SUCCESS)
    response = await running.client.post(f"/tasks/{task_id}/retry")

    assert response.status_code == 409
    assert "only FAILED or INTERRUPTED tasks can be retried" in response.json()["detail"]


async def test_retry_unknown_task(make_app: MakeApp) -> None:
    running = await make_app()

    response = await running.client.post("/tasks/no-such-id/retry")

    assert response.status_code == 404
    assert response.json() == {"detail": "No task has id 'no-such-id'."}


async def test_cancel_waiting_task(make_app: MakeApp) -> None:
    running = await make_app(retry_delay_scale=1.0)
    calls: list[float] = []

    @running.taskflow.task(retries=1, delay=0.3)
    async def flaky() -> None:
        calls.append(time.monotonic())
        raise ReportError("not yet")

    task_id = await running.taskflow.add_task(flaky)
    await running.wait_for_attempts(task_id, 1)
    await running.wait_for_status(task_id, TaskStatus.PENDING)
    response = await running.client.post(f"/tasks/{task_id}/cancel")
    await asyncio.sleep(0.5)  # Past the retry time: the cancelled task must not run.
    record = await running.store.get(task_id)

    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    assert record is not None
    assert record.status is TaskStatus.CANCELLED
    assert record.attempts == 1
    assert record.finished_at is not None
    assert len(calls) == 1


async def test_cancel_running_async_task(make_app: MakeApp) -> None:
    running = await make_app()
    seen: list[str] = []

    @running.taskflow.task(retries=2)
    async def hangs() -> None:
        try:
            await asyncio.sleep(GATE_TIMEOUT)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task_id = await add_and_wait(running, hangs, status=TaskStatus.RUNNING)
    response = await running.client.post(f"/tasks/{task_id}/cancel")
    record = await running.wait_for_status(task_id, TaskStatus.CANCELLED)

    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    assert seen == ["cancelled"]
    assert record.attempts == 1
    assert record.cancel_requested is False
    assert record.attempt_history[0].status is TaskStatus.CANCELLED


async def test_cancel_running_sync_task(make_app: MakeApp) -> None:
    running = await make_app()
    seen_cancel = threading.Event()
    proceed = threading.Event()

    @running.taskflow.task(retries=2)
    def export() -> None:
        context = current_task()
        assert context is not None
        deadline = time.monotonic() + GATE_TIMEOUT
        while not context.cancel_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        if context.cancel_requested:
            seen_cancel.set()
        proceed.wait(GATE_TIMEOUT)
        raise ReportError("export stopped early")

    try:
        task_id = await add_and_wait(running, export, status=TaskStatus.RUNNING)
        response = await running.client.post(f"/tasks/{task_id}/cancel")
        await asyncio.to_thread(seen_cancel.wait, GATE_TIMEOUT)
        while_running = (await running.client.get(f"/tasks/{task_id}")).json()
    finally:
        proceed.set()
    record = await running.wait_for_status(task_id, TaskStatus.CANCELLED)

    assert response.status_code == 200
    assert response.json()["status"] == "RUNNING"
    assert response.json()["cancel_requested"] is True
    assert seen_cancel.is_set()
    assert while_running["status"] == "RUNNING"
    assert while_running["cancel_requested"] is True
    assert record.attempts == 1
    assert record.error_message == "export stopped early"


async def test_cancel_running_sync_task_returns(make_app: MakeApp) -> None:
    running = await make_app()
    started = threading.Event()

    @running.taskflow.task
    def export() -> None:
        context = current_task()
        assert context is not None
        started.set()
        deadline = time.monotonic() + GATE_TIMEOUT
        while not context.cancel_requested and time.monotonic() < deadline:
            time.sleep(0.01)

    task_id = await running.taskflow.add_task(export)
    await asyncio.to_thread(started.wait, GATE_TIMEOUT)
    response = await running.client.post(f"/tasks/{task_id}/cancel")
    record = await running.wait_for_status(task_id, TaskStatus.SUCCESS, TaskStatus.CANCELLED)

    assert response.status_code == 200
    # A sync function that returns normally after a cancel request has done its work.
    assert record.status is TaskStatus.SUCCESS
    assert record.cancel_requested is False


async def test_cancel_finished_task_conflict(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    async def ok() -> None:
        pass

    task_id = await add_and_wait(running, ok, status=TaskStatus.SUCCESS)
    response = await running.client.post(f"/tasks/{task_id}/cancel")

    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Task {task_id} cannot be cancelled: it is already SUCCESS."
    }


async def test_cancel_unknown_task(make_app: MakeApp) -> None:
    running = await make_app()

    response = await running.client.post("/tasks/no-such-id/cancel")

    assert response.status_code == 404
    assert response.json() == {"detail": "No task has id 'no-such-id'."}


async def test_openapi_schema(make_app: MakeApp) -> None:
    running = await make_app()

    schema = (await running.client.get("/openapi.json")).json()
    models = schema["components"]["schemas"]
    paths = schema["paths"]

    assert "TaskPage" in models
    assert "TaskRecord" in models
    assert "TaskMetrics" in models
    assert "ErrorBody" in models
    assert set(paths) >= {
        "/tasks",
        "/tasks/metrics",
        "/tasks/{task_id}",
        "/tasks/{task_id}/retry",
        "/tasks/{task_id}/cancel",
    }
    assert "404" in paths["/tasks/{task_id}"]["get"]["responses"]
    assert "409" in paths["/tasks/{task_id}/retry"]["post"]["responses"]
