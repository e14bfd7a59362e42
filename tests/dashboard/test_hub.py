"""DashboardHub, its subscriptions and the SSE formatting, without HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from app_taskflow.dashboard.hub import (
    SETTLE_DELAY,
    DashboardHub,
    DashboardSettings,
    HubEvent,
    Signal,
)
from app_taskflow.dashboard.stream import coalesce, format_change, format_event
from app_taskflow.models import LogEntry, TaskChange, TaskStatus, TaskSummary
from app_taskflow.stores.base import TaskStore

from .support import CountingStore, wait_until

CREATED = datetime(2025, 1, 1, tzinfo=UTC)


def summary(task_id: str, status: TaskStatus = TaskStatus.PENDING) -> TaskChange:
    task = TaskSummary(id=task_id, name="report", status=status, created_at=CREATED)
    return TaskChange(task_id=task_id, summary=task)


def log_change(task_id: str, message: str) -> TaskChange:
    return TaskChange(task_id=task_id, log=LogEntry(timestamp=CREATED, message=message))


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


def make_hub(store: TaskStore, **settings: Any) -> DashboardHub:
    defaults: dict[str, Any] = {"linger": 0}
    return DashboardHub(lambda: store, DashboardSettings(**{**defaults, **settings}))


async def test_hub_events_after(store: CountingStore) -> None:
    hub = make_hub(store, history=3)
    for number in range(5):
        hub._append(summary(f"task-{number}"))

    assert [event.sequence for event in hub.events_after(3) or []] == [4, 5]
    assert hub.events_after(2) is not None
    assert hub.events_after(1) is None
    assert hub.events_after(5) == []


def test_hub_parse_event_id(store: CountingStore) -> None:
    hub = make_hub(store)
    hub._append(summary("task-1"))

    assert hub.parse_event_id(hub.event_id(1)) == 1
    assert hub.parse_event_id(hub.event_id(0)) == 0
    assert hub.parse_event_id(hub.event_id(2)) is None
    assert hub.parse_event_id("other-1") is None
    assert hub.parse_event_id(f"{hub.epoch}-x") is None
    assert hub.parse_event_id(None) is None


async def test_subscription_receives_changes(store: CountingStore) -> None:
    hub = make_hub(store)

    async with hub.subscribe() as subscription:
        await wait_until(lambda: store.open_watches == 1, what="the store watch")
        hub._append(summary("task-1"))
        batch = await subscription.wait(1.0)

    assert isinstance(batch, list)
    assert [event.change.task_id for event in batch] == ["task-1"]
    assert subscription.cursor == hub.latest


async def test_subscription_idle_returns_empty(store: CountingStore) -> None:
    hub = make_hub(store)

    async with hub.subscribe() as subscription:
        batch = await subscription.wait(0.05)

    assert batch == []


async def test_subscription_behind_history_resyncs(store: CountingStore) -> None:
    hub = make_hub(store, history=2)

    async with hub.subscribe() as subscription:
        for number in range(3):
            hub._append(summary(f"task-{number}"))
        batch = await subscription.wait(1.0)
        after = await subscription.wait(0.01)

    assert batch is Signal.RESYNC
    assert after == []


async def test_subscription_resumes_after_event_id(store: CountingStore) -> None:
    hub = make_hub(store, linger=30)
    async with hub.subscribe() as first:
        last_id = hub.event_id(first.cursor)
    hub._append(summary("task-1"))

    async with hub.subscribe(last_id) as second:
        batch = await second.wait(1.0)

    assert second.resumed is True
    assert isinstance(batch, list)
    assert [event.change.task_id for event in batch] == ["task-1"]
    await hub.close()


async def test_subscription_closed_hub(store: CountingStore) -> None:
    hub = make_hub(store)

    async with hub.subscribe() as subscription:
        waiting = asyncio.ensure_future(subscription.wait(5.0))
        await asyncio.sleep(0.01)
        await hub.close()
        batch = await waiting

    assert batch is Signal.CLOSED


async def test_hub_linger_keeps_watch(store: CountingStore) -> None:
    hub = make_hub(store, linger=0.2)

    async with hub.subscribe():
        await wait_until(lambda: store.open_watches == 1, what="the store watch")
    still_subscribed = hub.subscribed
    async with hub.subscribe():
        pass
    await wait_until(lambda: store.open_watches == 0, what="the watch to end after linger")

    assert still_subscribed is True
    assert store.watch_calls == 1
    assert hub.subscribed is False


async def test_hub_restart_marks_gap(store: CountingStore) -> None:
    hub = make_hub(store)
    async with hub.subscribe() as first:
        last_id = hub.event_id(first.cursor)
    hub_latest = hub.latest

    async with hub.subscribe(last_id) as second:
        batch = await second.wait(1.0)

    # The store was not watched in between, so the client learns it may have missed changes.
    assert isinstance(batch, list)
    assert [event.change.resync for event in batch] == [True]
    assert hub.latest == hub_latest + 1


async def test_hub_new_watch_resyncs_once_settled(store: CountingStore) -> None:
    hub = make_hub(store)

    async with hub.subscribe() as subscription:
        first = await subscription.wait(SETTLE_DELAY + 2.0)
        second = await subscription.wait(SETTLE_DELAY + 0.2)

    # Browsers that loaded before the store's subscription was live reload once.
    assert isinstance(first, list)
    assert [event.change.resync for event in first] == [True]
    assert second == []


class FailingStore(CountingStore):
    """A store whose first watch fails once ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = asyncio.Event()

    async def watch(self) -> AsyncIterator[TaskChange]:  # type: ignore[override]
        if self.watch_calls == 0:
            self.watch_calls += 1
            await self.fail.wait()
            raise ConnectionError("database unreachable")
        async for change in super().watch():
            yield change


async def test_hub_watch_failure_retries() -> None:
    store = FailingStore()
    hub = make_hub(store)

    async with hub.subscribe() as subscription:
        store.fail.set()
        first = await subscription.wait(2.0)
        await wait_until(lambda: store.open_watches == 1, within=5.0, what="a new watch")

    assert isinstance(first, list)
    assert [event.change.resync for event in first] == [True]
    assert store.watch_calls == 2


def test_coalesce_keeps_last_summary() -> None:
    events = [
        HubEvent(1, summary("a", TaskStatus.PENDING)),
        HubEvent(2, summary("b", TaskStatus.PENDING)),
        HubEvent(3, log_change("a", "working")),
        HubEvent(4, summary("a", TaskStatus.RUNNING)),
        HubEvent(5, TaskChange(resync=True)),
        HubEvent(6, summary("a", TaskStatus.SUCCESS)),
    ]

    kept = coalesce(events)

    assert [event.sequence for event in kept] == [2, 3, 5, 6]


def test_format_event_lines() -> None:
    assert format_event("ready", "{}", "e-1") == "id: e-1\nevent: ready\ndata: {}\n\n"
    assert format_event("reconnect", "{}") == "event: reconnect\ndata: {}\n\n"


def test_format_change_keeps_text_on_one_line(store: CountingStore) -> None:
    hub = make_hub(store)
    change = log_change("a", "line one\nline two <script>")

    message = format_change(hub, HubEvent(7, change))

    assert message.count("\n") == 4
    assert message.startswith(f"id: {hub.epoch}-7\nevent: log\ndata: ")
    assert "line one\\nline two <script>" in message


@pytest.mark.parametrize(
    ("name", "value"),
    [("ping_interval", 0), ("reconnect_delay", -1), ("linger", -1), ("history", 0)],
    ids=["ping_interval", "reconnect_delay", "linger", "history"],
)
def test_settings_invalid(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        DashboardSettings(**{name: value})  # type: ignore[arg-type]
