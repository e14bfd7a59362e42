"""A reader of the dashboard's Server-Sent Events stream that behaves like a browser tab."""

from __future__ import annotations

import asyncio
import contextlib
from time import perf_counter

import httpx

DASHBOARD_EVENTS_PATH = "/tasks/dashboard/events"


async def find_event_stream(client: httpx.AsyncClient) -> str | None:
    """Return the path of the dashboard's event stream, or ``None`` when the app has none."""
    try:
        async with client.stream("GET", DASHBOARD_EVENTS_PATH, timeout=5.0) as response:
            content_type = response.headers.get("content-type", "")
            if response.status_code == 200 and content_type.startswith("text/event-stream"):
                return DASHBOARD_EVENTS_PATH
    except httpx.HTTPError:
        pass
    return None


class EventStreamReader:
    """A reader that counts the stream's events until stopped, reconnecting as a browser does.

    When the server ends a stream, the reader waits the ``retry`` time the server sent and
    reconnects with ``Last-Event-ID``, as an ``EventSource`` does.
    """

    def __init__(self, client: httpx.AsyncClient, path: str) -> None:
        self._client = client
        self._path = path
        self.events = 0
        self.connections = 0
        self._last_event_id: str | None = None
        self._retry = 1.0
        self.first_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start reading in a background task."""
        self._task = asyncio.create_task(self._read_forever())

    async def stop(self) -> None:
        """Stop reading and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read_forever(self) -> None:
        while True:
            headers = {"Last-Event-ID": self._last_event_id} if self._last_event_id else {}
            try:
                async with self._client.stream(
                    "GET", self._path, headers=headers, timeout=None
                ) as response:
                    self.connections += 1
                    async for line in response.aiter_lines():
                        self._read_line(line)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(self._retry)

    def _read_line(self, line: str) -> None:
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self.events += 1
            self.first_event.set()
        elif field == "id":
            self._last_event_id = value
        elif field == "retry" and value.isdigit():
            self._retry = int(value) / 1000


async def time_to_first_event(client: httpx.AsyncClient, path: str) -> float:
    """Open a new stream and return the seconds until its first complete event arrived."""
    started = perf_counter()
    async with client.stream("GET", path, timeout=30.0) as response:
        response.raise_for_status()
        seen_event = False
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                seen_event = True
            elif seen_event and line == "":
                return perf_counter() - started
    raise RuntimeError(f"The stream at {path} ended before its first event.")
