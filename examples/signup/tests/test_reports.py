"""Tests of the report route: random failures, retries and the idempotency key."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx

WaitUntilDone = Callable[[str], Awaitable[dict[str, Any]]]
ScriptChance = Callable[..., None]

# build_report fails when the number drawn is below failure_rate (0.5 by default).
FAIL = 0.0
PASS = 0.9


async def test_build_report_retries_until_success(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(FAIL, FAIL, PASS)

    response = await client.post("/reports/march")
    record = await wait_until_done(response.json()["task_id"])

    assert record["status"] == "SUCCESS"
    assert record["attempts"] == 3
    assert record["logs"][-1]["message"] == "Report march is ready"


async def test_build_report_fails_after_retries(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(FAIL, FAIL, FAIL, FAIL)

    response = await client.post("/reports/march")
    record = await wait_until_done(response.json()["task_id"])

    assert record["status"] == "FAILED"
    assert record["attempts"] == 4
    assert record["error_type"] == "examples.signup.tasks.ReportSourceError"
    assert record["error_message"] == "The data source of report march did not respond."


async def test_build_report_never_fails_at_rate_zero(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(FAIL)

    response = await client.post("/reports/march", params={"failure_rate": 0})
    record = await wait_until_done(response.json()["task_id"])

    assert record["status"] == "SUCCESS"
    assert record["attempts"] == 1


async def test_retry_route_runs_failed_report(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(FAIL, FAIL, FAIL, FAIL, PASS)
    response = await client.post("/reports/march")
    task_id = response.json()["task_id"]
    await wait_until_done(task_id)

    retried = await client.post(f"/tasks/{task_id}/retry", headers={"X-Taskflow-Request": "1"})
    record = await wait_until_done(task_id)

    assert retried.status_code == 200
    assert record["status"] == "SUCCESS"
    assert record["attempts"] == 5


async def test_request_report_twice_returns_same_task(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(PASS)

    first = await client.post("/reports/march")
    await wait_until_done(first.json()["task_id"])
    second = await client.post("/reports/march")
    tasks = await client.get("/tasks")

    assert second.json()["task_id"] == first.json()["task_id"]
    assert len(tasks.json()["items"]) == 1


async def test_request_report_after_failure_adds_task(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(FAIL, FAIL, FAIL, FAIL, PASS)
    first = await client.post("/reports/march")
    await wait_until_done(first.json()["task_id"])

    second = await client.post("/reports/march")
    record = await wait_until_done(second.json()["task_id"])

    assert second.json()["task_id"] != first.json()["task_id"]
    assert record["status"] == "SUCCESS"


async def test_request_report_conflict_returns_409(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone, script_chance: ScriptChance
) -> None:
    script_chance(PASS)
    first = await client.post("/reports/march")
    await wait_until_done(first.json()["task_id"])

    response = await client.post("/reports/march", params={"failure_rate": 0.1})

    assert response.status_code == 409
    assert "report:march" in response.json()["detail"]


async def test_request_report_rejects_invalid_rate(client: httpx.AsyncClient) -> None:
    response = await client.post("/reports/march", params={"failure_rate": 2})

    assert response.status_code == 422
