"""Helpers of the dashboard tests: a streaming ASGI transport, an SSE reader, a counting store.

``httpx.ASGITransport`` (httpx 0.29) runs the app until the response is complete before it
returns it, so an endless event stream never comes back through it. ``StreamingTransport``
returns the response as soon as it starts and streams its body. Closing the response sends
``http.disconnect`` to the app, as a client that went away does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.types import ASGIApp, Message

from app_taskflow.models import TaskChange
from app_taskflow.stores.memory import MemoryStore

APP_EXIT_TIMEOUT = 5.0
"""Seconds the app gets to end its response after the client went away."""


class _BodyStream(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue[bytes | None], on_close: Any) -> None:
        self._chunks = chunks
        self._on_close = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        await self._on_close()


class StreamingTransport(httpx.AsyncBaseTransport):
    """Send requests to an ASGI app in process and stream the responses back."""

    def __init__(self, app: ASGIApp, root_path: str = "") -> None:
        self.app = app
        self.root_path = root_path

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        started: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        request_sent = False

        async def receive() -> Message:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set_result(message)
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    chunks.put_nowait(message["body"])
                if not message.get("more_body", False):
                    chunks.put_nowait(None)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(key.lower(), value) for key, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": ("127.0.0.1", 50000),
            "root_path": self.root_path,
        }

        async def run_app() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                chunks.put_nowait(None)

        app_task = asyncio.create_task(run_app())
        waiter = asyncio.ensure_future(started)
        first: set[asyncio.Future[Any]] = {waiter, app_task}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            app_task.result()  # Raises what the app raised before it started a response.
            raise AssertionError("The app ended without starting a response.")

        async def close() -> None:
            disconnected.set()
            async with asyncio.timeout(APP_EXIT_TIMEOUT):
                with contextlib.suppress(asyncio.CancelledError):
                    await app_task

        start = waiter.result()
        return httpx.Response(
            start["status"], headers=start.get("headers", []), stream=_BodyStream(chunks, close)
        )


@dataclass
class ServerSentEvent:
    """One message of an event stream; a comment line is kept as ``comment``."""

    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    def json(self) -> Any:
        """Return ``data`` parsed as JSON."""
        return json.loads(self.data)


@dataclass
class EventReader:
    """Parses an event stream into messages, one ``next()`` at a time."""

    response: httpx.Response
    _lines: AsyncIterator[str] | None = field(default=None, init=False)

    async def next(self, within: float = 5.0) -> ServerSentEvent:
        """Return the next message or comment.

        Raises:
            TimeoutError: none arrived within ``within`` seconds.
            EOFError: the stream ended.
        """
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        message = ServerSentEvent()
        seen_field = False
        async with asyncio.timeout(within):
            async for line in self._lines:
                if line == "":
                    if seen_field:
                        return message
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    return ServerSentEvent(event="", comment=value)
                seen_field = True
                if name == "event":
                    message.event = value
                elif name == "data":
                    message.data = f"{message.data}\n{value}" if message.data else value
                elif name == "id":
                    message.id = value
                elif name == "retry":
                    message.retry = int(value)
        raise EOFError("The event stream ended.")

    async def next_event(self, *names: str, within: float = 5.0) -> ServerSentEvent:
        """Return the next message named one of ``names``, skipping comments and others."""
        async with asyncio.timeout(within):
            while True:
                message = await self.next(within)
                if message.event in names:
                    return message


class CountingStore(MemoryStore):
    """A memory store that counts its open ``watch()`` iterators and can fake a resync."""

    def __init__(self) -> None:
        super().__init__()
        self.open_watches = 0
        self.watch_calls = 0
        self.resync_before_next = False
        """When set, the next change is preceded by a resync, as a store that lost changes."""

    async def watch(self) -> AsyncIterator[TaskChange]:  # type: ignore[override]
        self.watch_calls += 1
        self.open_watches += 1
        try:
            async for change in super().watch():
                if self.resync_before_next:
                    self.resync_before_next = False
                    yield TaskChange(resync=True)
                yield change
        finally:
            self.open_watches -= 1


async def wait_until(check: Any, within: float = 5.0, what: str = "the condition") -> None:
    """Poll ``check()`` every 10 ms until it is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"Timed out after {within} s waiting for {what}.")
        await asyncio.sleep(0.01)
