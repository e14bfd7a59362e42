"""The writer thread of SqlStore, which commits the writes that wait in groups.

SQLite lets one connection write at a time, and every commit costs about as much as the
writes in it. So instead of worker threads that queue for the write lock one transaction
each, one thread takes every write waiting (up to a limit) and runs them in one
transaction: a group commit. On PostgreSQL, where a write of a few statements costs a few
round trips and a commit, the frequent writes go through the thread too. When a write
fails, the store runs the group again with each write in a savepoint of its own, so that
the others of its group commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread


class PendingWrite:
    """One write waiting for the writer thread, and then its result or error."""

    __slots__ = ("args", "error", "future", "operation", "result", "work")

    def __init__(
        self,
        operation: str,
        work: Callable[..., Any],
        args: Sequence[Any],
        future: asyncio.Future[Any],
    ) -> None:
        self.operation = operation
        self.work = work
        self.args = args
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


class GroupWriter:
    """A thread that runs writes, handing each group of waiting writes to ``run_group``.

    ``run_group`` sets the ``result`` or ``error`` of every write of the group. An error
    that it raises becomes the error of every write of the group.
    """

    def __init__(self, run_group: Callable[[list[PendingWrite]], None], limit: int) -> None:
        self._run_group = run_group
        self._limit = limit
        self._queue: queue.SimpleQueue[PendingWrite | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def submit(self, operation: str, work: Callable[..., Any], args: Sequence[Any]) -> Any:
        """Run ``work(session, *args)`` in the next group and return its result."""
        future = asyncio.get_running_loop().create_future()
        self._start()
        self._queue.put(PendingWrite(operation, work, args, future))
        # As with anyio.to_thread.run_sync, a caller cancelled through an AnyIO cancel scope
        # waits until its write ends. A plain asyncio cancel stops the wait at once, and the
        # write still runs.
        with anyio.CancelScope(shield=True):
            return await future

    async def close(self) -> None:
        """Run the writes that wait, then stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await anyio.to_thread.run_sync(thread.join)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="taskflow-sql-writer", daemon=True
                )
                self._thread.start()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self._limit:
                try:
                    pending = self._queue.get_nowait()
                except queue.Empty:
                    break
                if pending is None:
                    stopping = True
                    break
                group.append(pending)
            try:
                self._run_group(group)
            except BaseException as error:
                for pending in group:
                    pending.error = error
            _deliver(group)


def _deliver(group: list[PendingWrite]) -> None:
    # One wakeup per event loop, not per write.
    by_loop: dict[asyncio.AbstractEventLoop, list[PendingWrite]] = {}
    for pending in group:
        by_loop.setdefault(pending.future.get_loop(), []).append(pending)
    for loop, writes in by_loop.items():
        # A closed loop raises RuntimeError, and then no caller waits for these writes.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, writes)


def _resolve(writes: list[PendingWrite]) -> None:
    for pending in writes:
        if pending.future.done():
            continue
        if pending.error is not None:
            pending.future.set_exception(pending.error)
        else:
            pending.future.set_result(pending.result)
