"""Tests of the signup route: the welcome email and the webhook, mocked with respx."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import respx

from examples.signup import app as signup_app

WaitUntilDone = Callable[[str], Awaitable[dict[str, Any]]]


async def test_signup_returns_task_ids(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    respx_mock.post(signup_app.WEBHOOK_URL).mock(return_value=httpx.Response(204))

    response = await client.post("/signup", params={"email": "ada@example.com"})
    body = response.json()
    await wait_until_done(body["webhook_task_id"])

    assert response.status_code == 200
    assert set(body) == {"task_id", "webhook_task_id"}
    assert body["task_id"] != body["webhook_task_id"]


async def test_send_email_logs_address(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    respx_mock.post(signup_app.WEBHOOK_URL).mock(return_value=httpx.Response(204))

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["task_id"])

    assert record["status"] == "SUCCESS"
    assert record["name"] == "examples.signup.tasks.send_email"
    assert [entry["message"] for entry in record["logs"]] == ["Sending to ada@example.com"]


async def test_call_webhook_posts_event(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    webhook = respx_mock.post(signup_app.WEBHOOK_URL).mock(return_value=httpx.Response(204))

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["webhook_task_id"])

    assert record["status"] == "SUCCESS"
    assert webhook.call_count == 1
    sent = webhook.calls.last.request
    assert httpx.Response(200, content=sent.content).json() == {
        "event": "signup",
        "email": "ada@example.com",
    }


async def test_call_webhook_retries_error_status(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    webhook = respx_mock.post(signup_app.WEBHOOK_URL).mock(
        side_effect=[httpx.Response(503), httpx.Response(204)]
    )

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["webhook_task_id"])

    assert record["status"] == "SUCCESS"
    assert record["attempts"] == 2
    assert webhook.call_count == 2


async def test_call_webhook_retries_connect_error(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    respx_mock.post(signup_app.WEBHOOK_URL).mock(
        side_effect=[httpx.ConnectError("Connection refused"), httpx.Response(204)]
    )

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["webhook_task_id"])

    assert record["status"] == "SUCCESS"
    assert record["attempts"] == 2


async def test_call_webhook_fails_after_retries(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    webhook = respx_mock.post(signup_app.WEBHOOK_URL).mock(return_value=httpx.Response(503))

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["webhook_task_id"])

    assert record["status"] == "FAILED"
    assert record["attempts"] == 5
    assert webhook.call_count == 5
    assert record["error_type"] == "httpx.HTTPStatusError"


async def test_signup_delivers_event_to_receiver(
    client: httpx.AsyncClient, respx_mock: respx.MockRouter, wait_until_done: WaitUntilDone
) -> None:
    # The webhook task's own HTTP client reaches the example app in-process, as the demo
    # reaches it over loopback.
    respx_mock.post(signup_app.WEBHOOK_URL).mock(side_effect=respx.ASGIHandler(signup_app.app))

    response = await client.post("/signup", params={"email": "ada@example.com"})
    record = await wait_until_done(response.json()["webhook_task_id"])
    events = await client.get("/webhooks/signup")

    assert record["status"] == "SUCCESS"
    assert events.json() == [{"event": "signup", "email": "ada@example.com"}]


async def test_signup_rejects_missing_email(client: httpx.AsyncClient) -> None:
    response = await client.post("/signup")
    tasks = await client.get("/tasks")

    assert response.status_code == 422
    assert tasks.json()["items"] == []


async def test_newsletter_tracks_background_task(
    client: httpx.AsyncClient, wait_until_done: WaitUntilDone
) -> None:
    response = await client.post("/newsletter", params={"email": "ada@example.com"})
    [task] = (await client.get("/tasks")).json()["items"]
    record = await wait_until_done(task["id"])

    assert response.json() == {"status": "subscribed"}
    assert record["name"] == "examples.signup.tasks.send_email"
    assert record["status"] == "SUCCESS"
