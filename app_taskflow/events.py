"""ChangeFanout: hands each task change to every watcher through a bounded queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable

from app_taskflow.logs import log
from app_taskflow.models import TaskChange

WATCH_BUFFER = 10_000
"""Changes a watcher may fall behind by before it receives a resync marker instead."""

_RESYNC = TaskChange(resync=True)


class ChangeFanout:
    """Delivers task changes to any number of watchers, each through its own bounded queue.

    A store publishes each change once, and ``watch()`` gives every consumer its own iterator.
    An optional ``feed`` coroutine (for example a poll loop over a shared database, or a
    pub/sub listener) runs while at least one watcher is subscribed, and is cancelled when
    the last one leaves, so an idle store does no work for watchers it does not have.
    """

    def __init__(
        self,
        feed: Callable[[ChangeFanout], Awaitable[None]] | None = None,
        buffer: int = WATCH_BUFFER,
    ) -> None:
        self._feed = feed
        self._buffer = buffer
        self._queues: set[asyncio.Queue[TaskChange]] = set()
        self._feed_task: asyncio.Task[None] | None = None

    @property
    def has_watchers(self) -> bool:
        """Whether anyone is watching; a publisher may skip building changes otherwise."""
        return bool(self._queues)

    def publish(self, change: TaskChange) -> None:
        """Queue ``change`` for every watcher; one that is full gets a resync marker."""
        for queue in self._queues:
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                # Drop what it has not read. The resync marker makes it read the store again.
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(_RESYNC)

    async def watch(self) -> AsyncGenerator[TaskChange, None]:
        """Yield the changes published from now on until the caller stops iterating."""
        queue: asyncio.Queue[TaskChange] = asyncio.Queue(maxsize=self._buffer)
        self._queues.add(queue)
        self._start_feed()
        try:
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)
            if not self._queues:
                await self._stop_feed()

    async def close(self) -> None:
        """Stop the feed; watchers already iterating wait for changes that never come."""
        await self._stop_feed()

    def _start_feed(self) -> None:
        if self._feed is None or self._feed_task is not None:
            return
        self._feed_task = asyncio.create_task(self._run_feed(), name="app-taskflow-watch")

    async def _run_feed(self) -> None:
        assert self._feed is not None
        try:
            await self._feed(self)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.opt(exception=error).error("The change feed of the store stopped")
            self.publish(_RESYNC)
        finally:
            self._feed_task = None

    async def _stop_feed(self) -> None:
        task, self._feed_task = self._feed_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
