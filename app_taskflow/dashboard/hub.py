"""DashboardHub: one store subscription per app, fanned out to the dashboard's SSE clients."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType

import anyio

from app_taskflow.events import ChangeFanout
from app_taskflow.logs import log
from app_taskflow.models import TaskChange
from app_taskflow.stores.base import TaskStore

MAX_RETRY_DELAY = 30.0
"""Seconds, at most, between two attempts to subscribe to a failing store."""

SETTLE_DELAY = 1.0
"""Seconds after a new store subscription at which clients get a resync and reload once.

A store's subscription may take a moment to be live (a first read of its change journal,
or a LISTEN connection), and changes made meanwhile reach no one. Browsers that loaded
their data in that moment read it again after this resync.
"""


@dataclass(frozen=True)
class DashboardSettings:
    """Timings and bounds of the dashboard's event stream. Durations are in seconds.

    Attributes:
        ping_interval: idle time after which a stream sends a comment line, so that proxies
            and the browser keep an idle connection open.
        stream_lifetime: time after which the server ends a stream; the browser reconnects
            after ``reconnect_delay`` and resumes from its last event id. It bounds how
            long a stopping or reloading uvicorn waits for open dashboards, because uvicorn
            waits for every open response before the app's shutdown. 0 keeps streams open
            until the client leaves. While it is below ``ping_interval``, no ping is sent.
        reconnect_delay: the ``retry`` the browser waits before it reconnects.
        history: recent events kept so that a reconnecting browser catches up; one that
            missed more gets a ``resync`` event and reloads its data.
        client_buffer: changes queued for one client before it reads the history instead.
        linger: time the store subscription stays open after the last client left, so
            that a browser reconnecting in that time resumes without a reload.
    """

    ping_interval: float = 15.0
    stream_lifetime: float = 10.0
    reconnect_delay: float = 1.0
    history: int = 1000
    client_buffer: int = 256
    linger: float = 30.0

    def __post_init__(self) -> None:
        for name in ("ping_interval", "reconnect_delay"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be above 0.")
        for name in ("stream_lifetime", "linger"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be 0 or more.")
        for name in ("history", "client_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name} {getattr(self, name)!r}: must be 1 or more.")


@dataclass(frozen=True)
class HubEvent:
    """A store change with its place in the hub's sequence (1, 2, ...)."""

    sequence: int
    change: TaskChange


class Signal(enum.Enum):
    """A result of ``Subscription.wait`` other than events."""

    RESYNC = "resync"
    """The client missed events that are no longer kept: it must reload its data."""
    CLOSED = "closed"
    """The hub was closed: the stream must end."""


Batch = list[HubEvent] | Signal


class DashboardHub:
    """Shares one subscription to the store's changes among the dashboard's SSE clients.

    Each change gets a sequence number and goes into a bounded history. Every client is
    woken through its own bounded queue of a ``ChangeFanout``, then reads the history from
    its last sequence number on. The store subscription starts with the first client and
    stops ``linger`` seconds after the last one left. A hub belongs to one ``Taskflow``,
    which closes it when it stops.
    """

    def __init__(
        self, store: Callable[[], TaskStore], settings: DashboardSettings | None = None
    ) -> None:
        self.settings = settings or DashboardSettings()
        self.epoch = uuid.uuid4().hex[:12]
        """Prefix of every event id. A reconnecting browser's id with another prefix comes
        from another process, or from before the hub was closed, so it cannot resume."""
        self._store = store
        self._events: deque[HubEvent] = deque(maxlen=self.settings.history)
        self._sequence = 0
        self._wakeups = ChangeFanout(buffer=self.settings.client_buffer)
        self._clients = 0
        self._pump: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._settle: asyncio.TimerHandle | None = None

    @property
    def clients(self) -> int:
        """Number of open subscriptions."""
        return self._clients

    @property
    def has_client_queues(self) -> bool:
        """Whether any client's queue is still registered; false once every client left."""
        return self._wakeups.has_watchers

    @property
    def subscribed(self) -> bool:
        """Whether the hub is subscribed to the store's changes (or retrying to)."""
        return self._pump is not None

    @property
    def latest(self) -> int:
        """Sequence number of the last event, 0 before the first."""
        return self._sequence

    def event_id(self, sequence: int) -> str:
        """Return the SSE event id of a sequence number."""
        return f"{self.epoch}-{sequence}"

    def parse_event_id(self, event_id: str | None) -> int | None:
        """Return the sequence number of one of this hub's event ids, or ``None``."""
        epoch, _, number = (event_id or "").strip().rpartition("-")
        if epoch != self.epoch or not number.isdigit():
            return None
        sequence = int(number)
        return sequence if sequence <= self._sequence else None

    def events_after(self, sequence: int) -> list[HubEvent] | None:
        """Return the events after ``sequence``; ``None`` when some are no longer kept."""
        missing = self._sequence - sequence
        if missing <= 0:
            return []
        if missing > len(self._events):
            return None
        return list(itertools.islice(self._events, len(self._events) - missing, None))

    def subscribe(self, last_event_id: str | None = None) -> Subscription:
        """Return a subscription for one client, to use with ``async with``.

        Args:
            last_event_id: the ``Last-Event-ID`` of a reconnecting browser. The client
                resumes after it when the hub still keeps every later event.
        """
        return Subscription(self, last_event_id)

    async def close(self) -> None:
        """End every open subscription and stop the store subscription.

        The hub may be used again afterwards (the app restarted); it then starts a new
        epoch, so that browsers reload rather than resume.
        """
        self._cancel_linger()
        self._cancel_settle()
        self.epoch = uuid.uuid4().hex[:12]
        self._wakeups.publish(TaskChange(resync=True))
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    def _join(self) -> None:
        self._clients += 1
        self._cancel_linger()
        if self._pump is None:
            # Changes made while nothing watched the store are unknown: a browser resuming
            # from before this point gets this resync and reloads.
            self._append(TaskChange(resync=True))
            self._pump = asyncio.create_task(self._follow_store(), name="app-taskflow-dashboard")
            loop = asyncio.get_running_loop()
            self._settle = loop.call_later(SETTLE_DELAY, self._append, TaskChange(resync=True))
            log.debug("Dashboard subscribed to the store's changes")

    def _leave(self) -> None:
        self._clients -= 1
        if self._clients > 0 or self._pump is None:
            return
        if self.settings.linger > 0:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.settings.linger, self._stop_following)
        else:
            self._stop_following()

    def _cancel_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def _cancel_settle(self) -> None:
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None

    def _stop_following(self) -> None:
        self._linger = None
        self._cancel_settle()
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            log.debug("Dashboard unsubscribed from the store's changes: no client left")

    async def _follow_store(self) -> None:
        failures = 0
        while True:
            try:
                async with contextlib.aclosing(self._store().watch()) as changes:
                    async for change in changes:
                        failures = 0
                        self._append(change)
                raise RuntimeError("the store's watch() ended")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                delay = min(MAX_RETRY_DELAY, 0.5 * 2**failures)
                if failures == 1:
                    log.opt(exception=error).error(
                        "The dashboard's subscription to the store failed; "
                        "subscribing again in {:.0f} s",
                        delay,
                    )
                else:
                    log.warning(
                        "The dashboard's subscription to the store failed again "
                        "({} times in a row: {!r}); subscribing again in {:.0f} s",
                        failures,
                        error,
                        delay,
                    )
            # Changes made until the next subscription are lost: clients reload.
            self._append(TaskChange(resync=True))
            await asyncio.sleep(delay)

    def _append(self, change: TaskChange) -> None:
        self._sequence += 1
        self._events.append(HubEvent(self._sequence, change))
        self._wakeups.publish(change)


class Subscription:
    """One client's view of a hub: the events it has not read yet, and a way to wait."""

    def __init__(self, hub: DashboardHub, last_event_id: str | None) -> None:
        self._hub = hub
        self._last_event_id = last_event_id
        self._epoch = hub.epoch
        self._wakeups: AsyncIterator[TaskChange] | None = None
        self._next_wakeup: asyncio.Future[TaskChange] | None = None
        self.cursor = 0
        """Sequence number of the last event handed to the client."""
        self.resumed = False
        """Whether the client continues after its ``Last-Event-ID`` without a reload."""

    async def __aenter__(self) -> Subscription:
        hub = self._hub
        hub._join()
        try:
            self._wakeups = hub._wakeups.watch()
            self._arm()
            # Let the queue be registered before the history is read below, so that no
            # event can fall between the two.
            await asyncio.sleep(0)
        except BaseException:
            # A client that left at once: `async with` calls no __aexit__ after this.
            await self.__aexit__(None, None, None)
            raise

        resume_after = hub.parse_event_id(self._last_event_id)
        if resume_after is not None and hub.events_after(resume_after) is not None:
            self.cursor = resume_after
            self.resumed = True
        else:
            self.cursor = hub.latest
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Runs when the client went away, while the request's task is being cancelled:
        # the shield lets the queue be removed before this returns.
        with anyio.CancelScope(shield=True):
            if self._next_wakeup is not None:
                self._next_wakeup.cancel()
                await asyncio.gather(self._next_wakeup, return_exceptions=True)
            self._hub._leave()

    async def wait(self, max_wait: float) -> Batch:
        """Return the next events, waiting up to ``max_wait`` seconds for some.

        Returns:
            The events after ``cursor`` (an empty list after ``max_wait``),
            ``Signal.RESYNC`` when some of them are no longer kept, or ``Signal.CLOSED``
            once the hub was closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while True:
            if self._hub.epoch != self._epoch:
                return Signal.CLOSED
            events = self._hub.events_after(self.cursor)
            if events is None:
                self.cursor = self._hub.latest
                return Signal.RESYNC
            if events:
                self.cursor = events[-1].sequence
                return events

            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            assert self._next_wakeup is not None
            done, _ = await asyncio.wait({self._next_wakeup}, timeout=remaining)
            if done:
                # The change itself is read from the history; the queue only wakes us.
                self._arm()

    def _arm(self) -> None:
        assert self._wakeups is not None
        self._next_wakeup = asyncio.ensure_future(anext(self._wakeups))
