"""Actions: the cross-site check on every POST, and retrying every match of a filter."""

from __future__ import annotations

import pytest
from integration_fixtures import wait_for_status

from app_taskflow import TaskStatus

from .conftest import ACTION_HEADERS, Dashboard, MakeDashboard


class ReportError(Exception):
    """The error the failing tasks of this module raise."""


async def failed_tasks(dashboard: Dashboard, count: int, name: str = "report") -> list[str]:
    """Add ``count`` tasks named ``name`` that fail, and return their ids once FAILED."""

    @dashboard.taskflow.task(name=name)
    def failing(number: int) -> None:
        raise ReportError(f"report {number} failed")

    task_ids = [await dashboard.taskflow.add_task(failing, number) for number in range(count)]
    for task_id in task_ids:
        await wait_for_status(dashboard.store, task_id, TaskStatus.FAILED)
    return task_ids


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "it lacks the X-Taskflow-Request header"),
        ({**ACTION_HEADERS, "Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site: cross-site"),
        ({**ACTION_HEADERS, "Origin": "https://evil.example"}, "its Origin 'https://evil.example'"),
        ({**ACTION_HEADERS, "Origin": "null"}, "its Origin 'null'"),
    ],
    ids=["no-header", "cross-site", "other-origin", "null-origin"],
)
@pytest.mark.parametrize("action", ["retry", "cancel"])
async def test_action_cross_site_rejected(
    make_dashboard: MakeDashboard, headers: dict[str, str], reason: str, action: str
) -> None:
    dashboard = await make_dashboard()
    [task_id] = await failed_tasks(dashboard, 1)

    response = await dashboard.client.post(f"/tasks/{task_id}/{action}", headers=headers)
    record = await dashboard.store.get(task_id)

    assert response.status_code == 403
    assert reason in response.json()["detail"]
    assert record is not None
    assert record.status is TaskStatus.FAILED


async def test_bulk_retry_cross_site_rejected(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    await failed_tasks(dashboard, 1)

    response = await dashboard.client.post("/tasks/retry", headers={"Sec-Fetch-Site": "cross-site"})

    assert response.status_code == 403


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "https://tasks.example.com", "X-Forwarded-Host": "tasks.example.com"},
        {},
    ],
    ids=["same-origin", "forwarded-host", "no-origin"],
)
async def test_action_same_origin_allowed(
    make_dashboard: MakeDashboard, headers: dict[str, str]
) -> None:
    dashboard = await make_dashboard()
    [task_id] = await failed_tasks(dashboard, 1)

    response = await dashboard.client.post(
        f"/tasks/{task_id}/retry", headers={**ACTION_HEADERS, **headers}
    )

    assert response.status_code == 200


async def test_bulk_retry_filters(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    reports = await failed_tasks(dashboard, 3, name="report")
    [invoice] = await failed_tasks(dashboard, 1, name="invoice")

    response = await dashboard.client.post(
        "/tasks/retry", params={"name": "report"}, headers=ACTION_HEADERS
    )
    for task_id in reports:
        await wait_for_status(dashboard.store, task_id, TaskStatus.FAILED)
    invoice_record = await dashboard.store.get(invoice)
    report_records = [await dashboard.store.get(task_id) for task_id in reports]

    assert response.status_code == 200
    assert response.json() == {"retried": 3, "skipped": 0, "next_cursor": None}
    assert [record.attempts for record in report_records if record] == [2, 2, 2]
    assert invoice_record is not None
    assert invoice_record.attempts == 1


async def test_bulk_retry_search(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    await failed_tasks(dashboard, 3)

    response = await dashboard.client.post(
        "/tasks/retry", params={"search": "report 1 failed"}, headers=ACTION_HEADERS
    )

    assert response.json()["retried"] == 1


async def test_bulk_retry_in_batches(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    task_ids = await failed_tasks(dashboard, 5)

    first = await dashboard.client.post("/tasks/retry", params={"limit": 2}, headers=ACTION_HEADERS)
    cursor = first.json()["next_cursor"]
    second = await dashboard.client.post(
        "/tasks/retry", params={"limit": 2, "cursor": cursor}, headers=ACTION_HEADERS
    )
    third = await dashboard.client.post(
        "/tasks/retry",
        params={"limit": 2, "cursor": second.json()["next_cursor"]},
        headers=ACTION_HEADERS,
    )
    for task_id in task_ids:
        await wait_for_status(dashboard.store, task_id, TaskStatus.FAILED)
    attempts = [(await dashboard.store.get(task_id)).attempts for task_id in task_ids]  # type: ignore[union-attr]

    assert first.json()["retried"] == 2
    assert cursor is not None
    assert second.json()["retried"] == 2
    assert third.json() == {"retried": 1, "skipped": 0, "next_cursor": None}
    assert attempts == [2, 2, 2, 2, 2]


@pytest.mark.parametrize("status", ["SUCCESS", "PENDING", "CANCELLED"])
async def test_bulk_retry_other_status_matches_none(
    make_dashboard: MakeDashboard, status: str
) -> None:
    dashboard = await make_dashboard()
    await failed_tasks(dashboard, 2)

    response = await dashboard.client.post(
        "/tasks/retry", params={"status": status}, headers=ACTION_HEADERS
    )

    assert response.json() == {"retried": 0, "skipped": 0, "next_cursor": None}


async def test_bulk_retry_invalid_cursor(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    response = await dashboard.client.post(
        "/tasks/retry", params={"cursor": "nonsense"}, headers=ACTION_HEADERS
    )

    assert response.status_code == 422
    assert "Invalid cursor 'nonsense'" in response.json()["detail"]
