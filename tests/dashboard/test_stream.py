"""The dashboard's event stream over HTTP: events, resume, pings, and clean disconnects."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from starlette.types import Message

from app_taskflow import task_log

from .conftest import EVENTS, QUIET_SETTINGS, MakeDashboard
from .support import wait_until


async def test_events_response_headers(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    async with dashboard.client.stream("GET", EVENTS) as response:
        headers = response.headers

    assert response.status_code == 200
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in headers["content-security-policy"]


async def test_events_ready_first(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    async with dashboard.events() as reader:
        first = await reader.next()
        ready = await reader.next()

    assert first.retry == 1000
    assert ready.event == "ready"
    assert ready.json() == {"resumed": False}
    assert ready.id == dashboard.hub.event_id(dashboard.hub.latest)


async def test_events_task_lifecycle(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    @dashboard.taskflow.task(name="greet")
    def greet(name: str) -> None:
        task_log(f"Hello {name}", level="warning")

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        task_id = await dashboard.taskflow.add_task(greet, "Ada")
        statuses: list[str] = []
        logs: list[dict[str, object]] = []
        ids: list[str | None] = []
        while not statuses or statuses[-1] != "SUCCESS":
            message = await reader.next_event("task", "log")
            ids.append(message.id)
            if message.event == "task":
                assert message.json()["id"] == task_id
                statuses.append(message.json()["status"])
            else:
                logs.append(message.json())

    assert statuses[-1] == "SUCCESS"
    assert set(statuses) <= {"PENDING", "RUNNING", "SUCCESS"}
    assert len(logs) == 1
    assert logs[0]["task_id"] == task_id
    assert logs[0]["entry"]["message"] == "Hello Ada"  # type: ignore[index]
    assert logs[0]["entry"]["level"] == "WARNING"  # type: ignore[index]
    assert None not in ids
    assert len(set(ids)) == len(ids)


async def test_events_disconnect_removes_client(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    hub = dashboard.hub

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        connected = (hub.clients, hub.has_client_queues, dashboard.store.open_watches)

    await wait_until(lambda: dashboard.store.open_watches == 0, what="the store watch to close")
    assert connected == (1, True, 1)
    assert hub.clients == 0
    assert hub.has_client_queues is False
    assert hub.subscribed is False


async def test_events_hundred_cycles_leave_nothing(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    hub = dashboard.hub

    for _ in range(100):
        async with dashboard.events() as reader:
            await reader.next_event("ready")

    await wait_until(lambda: dashboard.store.open_watches == 0, what="the store watch to close")
    assert hub.clients == 0
    assert hub.has_client_queues is False
    assert hub.subscribed is False
    assert dashboard.store.watch_calls == 100


async def test_events_clients_share_one_watch(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    async with dashboard.events() as first, dashboard.events() as second:
        await first.next_event("ready")
        await second.next_event("ready")
        open_watches = dashboard.store.open_watches
        clients = dashboard.hub.clients

    assert open_watches == 1
    assert clients == 2


async def test_events_last_event_id_resumes(make_dashboard: MakeDashboard) -> None:
    settings = dataclasses.replace(QUIET_SETTINGS, linger=30.0)
    dashboard = await make_dashboard(settings)

    @dashboard.taskflow.task(name="noop")
    def noop() -> None:
        pass

    async with dashboard.events() as reader:
        ready = await reader.next_event("ready")
    # Changes made while no client is connected: the lingering subscription keeps them.
    task_id = await dashboard.taskflow.add_task(noop)
    await wait_until(lambda: dashboard.hub.latest >= 4, what="the hub to record the task")

    async with dashboard.events(last_event_id=ready.id) as reader:
        resumed = await reader.next_event("ready")
        caught_up = await reader.next_event("task")

    assert resumed.json() == {"resumed": True}
    assert caught_up.json()["id"] == task_id


async def test_events_unknown_event_id_reloads(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    async with dashboard.events(last_event_id="0123456789ab-5") as reader:
        ready = await reader.next_event("ready")

    assert ready.json() == {"resumed": False}


async def test_events_old_event_id_reloads(make_dashboard: MakeDashboard) -> None:
    settings = dataclasses.replace(QUIET_SETTINGS, linger=30.0, history=3)
    dashboard = await make_dashboard(settings)

    @dashboard.taskflow.task(name="noop")
    def noop() -> None:
        pass

    async with dashboard.events() as reader:
        ready = await reader.next_event("ready")
    for _ in range(2):
        await dashboard.taskflow.add_task(noop)
    await wait_until(lambda: dashboard.hub.latest >= 7, what="more events than the history")

    async with dashboard.events(last_event_id=ready.id) as reader:
        resumed = await reader.next_event("ready")

    assert resumed.json() == {"resumed": False}


async def test_events_store_resync_forwarded(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    @dashboard.taskflow.task(name="noop")
    def noop() -> None:
        pass

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        dashboard.store.resync_before_next = True
        await dashboard.taskflow.add_task(noop)
        resync = await reader.next_event("resync", "task")

    assert resync.event == "resync"
    assert resync.id is not None


async def test_events_ping_when_idle(make_dashboard: MakeDashboard) -> None:
    settings = dataclasses.replace(QUIET_SETTINGS, ping_interval=0.05)
    dashboard = await make_dashboard(settings)

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        comments = [await reader.next(within=2.0) for _ in range(3)]

    assert [comment.comment for comment in comments] == ["ping", "ping", "ping"]


async def test_events_lifetime_ends_stream(make_dashboard: MakeDashboard) -> None:
    settings = dataclasses.replace(QUIET_SETTINGS, stream_lifetime=0.2)
    dashboard = await make_dashboard(settings)

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        last = await reader.next_event("reconnect", within=3.0)
        try:
            await reader.next(within=3.0)
        except EOFError:
            ended = True
        else:
            ended = False

    assert last.event == "reconnect"
    assert ended is True


async def test_events_close_ends_streams(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    async with dashboard.events() as reader:
        await reader.next_event("ready")
        await dashboard.hub.close()
        try:
            await reader.next(within=3.0)
        except EOFError:
            ended = True
        else:
            ended = False

    assert ended is True


async def test_events_not_started_unavailable(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    await dashboard.taskflow.stop()

    response = await dashboard.client.get(EVENTS)

    assert response.status_code == 503
    assert response.json() == {"detail": "The taskflow is not started yet."}


async def test_events_send_failure_removes_client(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    messages: list[Message] = []

    async def receive() -> Message:
        await asyncio.Event().wait()  # The client never sends a disconnect itself.
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.append(message)
        if len(messages) == 3:
            # As a server does when the connection broke while it wrote the body.
            raise OSError("connection reset by peer")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": EVENTS,
        "raw_path": EVENTS.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
    }
    with pytest.raises(OSError, match="connection reset"):
        await dashboard.app(scope, receive, send)

    assert len(messages) == 3
    assert dashboard.hub.clients == 0
    assert dashboard.hub.has_client_queues is False
