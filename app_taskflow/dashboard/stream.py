"""The dashboard's Server-Sent Events stream: task changes and log entries as they happen.

Events, each with ``data`` as one line of JSON:

- ``ready``: sent first; ``{"resumed": true}`` when the stream continues after the
  browser's ``Last-Event-ID``, ``false`` when the browser must load its data afresh.
- ``task``: a task's summary after a change (as listed by ``GET /tasks``).
- ``log``: ``{"task_id": ..., "entry": {...}}`` for a new log entry.
- ``resync``: events were missed; the browser reloads its data.
- ``reconnect``: the server ends the stream (``stream_lifetime``); the browser
  reconnects by itself and resumes.

Every event but ``reconnect`` carries an ``id``; a comment line (``: ping``) is sent after
``ping_interval`` seconds without an event.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncGenerator, Iterable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app_taskflow.dashboard.hub import DashboardHub, HubEvent, Signal
from app_taskflow.logs import log


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that always closes its event generator.

    Starlette stops iterating when the client goes away but leaves the generator to the
    garbage collector. Closing it here runs its ``finally`` blocks at once, so the client's
    subscription is removed even when the disconnect came while a message was being sent.
    """

    def __init__(self, events: AsyncGenerator[str, None], headers: Mapping[str, str]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._events.aclose()


def format_event(event: str, data: str, event_id: str | None = None) -> str:
    """Return one SSE message; ``data`` must be a single line, as JSON text is."""
    id_line = f"id: {event_id}\n" if event_id is not None else ""
    return f"{id_line}event: {event}\ndata: {data}\n\n"


def format_change(hub: DashboardHub, event: HubEvent) -> str:
    """Return the SSE message of one hub event."""
    change = event.change
    event_id = hub.event_id(event.sequence)
    if change.resync:
        return format_event("resync", "{}", event_id)
    if change.log is not None:
        entry = change.log.model_dump_json()
        return format_event(
            "log", f'{{"task_id":{json.dumps(change.task_id)},"entry":{entry}}}', event_id
        )
    if change.summary is not None:
        return format_event("task", change.summary.model_dump_json(), event_id)
    return format_event("resync", "{}", event_id)


def coalesce(events: Iterable[HubEvent]) -> list[HubEvent]:
    """Keep only the last summary of each task, and every log entry and resync, in order.

    The browser replaces a task's row with each summary, so earlier summaries of the same
    batch would only cost it work. The batch's last event is always kept, so the browser's
    last event id still points at the end of the batch.
    """
    kept: list[HubEvent] = []
    seen: set[str] = set()
    for event in reversed(list(events)):
        change = event.change
        if change.summary is not None and change.log is None and not change.resync:
            if change.task_id in seen:
                continue
            seen.add(change.task_id)
        kept.append(event)
    kept.reverse()
    return kept


async def event_stream(hub: DashboardHub, last_event_id: str | None) -> AsyncGenerator[str, None]:
    """Yield the SSE messages of one client until the stream's lifetime ends.

    The subscription is removed when the client goes away: the response's task is then
    cancelled, and ``EventStreamResponse`` closes this generator, which leaves
    ``async with``.
    """
    settings = hub.settings
    loop = asyncio.get_running_loop()
    lifetime_end = (
        loop.time() + settings.stream_lifetime if settings.stream_lifetime > 0 else math.inf
    )
    async with hub.subscribe(last_event_id) as subscription:
        log.debug(
            "Dashboard client connected ({} connected, resumed: {})",
            hub.clients,
            subscription.resumed,
        )
        try:
            yield f"retry: {round(settings.reconnect_delay * 1000)}\n\n"
            ready = json.dumps({"resumed": subscription.resumed})
            yield format_event("ready", ready, hub.event_id(subscription.cursor))
            last_write = loop.time()

            while True:
                now = loop.time()
                if now >= lifetime_end:
                    yield format_event("reconnect", "{}")
                    return
                timeout = min(last_write + settings.ping_interval, lifetime_end) - now
                batch = await subscription.wait(timeout)
                if batch is Signal.CLOSED:
                    return
                if batch is Signal.RESYNC:
                    yield format_event("resync", "{}", hub.event_id(subscription.cursor))
                elif batch:
                    yield "".join(format_change(hub, event) for event in coalesce(batch))
                elif loop.time() - last_write >= settings.ping_interval:
                    yield ": ping\n\n"
                else:
                    continue
                last_write = loop.time()
        finally:
            log.debug("Dashboard client disconnected ({} left)", hub.clients - 1)
