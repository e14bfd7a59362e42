"""A bounded pool of daemon threads for sync task functions."""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any

_STOP = object()


class WorkerPool:
    """Runs sync functions in at most ``size`` threads, off the event loop.

    The threads are daemon threads: a sync task that never returns cannot keep the process
    alive past shutdown, which ``concurrent.futures.ThreadPoolExecutor`` would (it joins
    its threads at exit). A caller waiting for a free thread takes none.
    """

    def __init__(self, size: int, name: str = "app-taskflow-worker") -> None:
        if size < 1:
            raise ValueError(f"Invalid worker pool size {size!r}: expected at least 1.")
        self.size = size
        self._name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._free: asyncio.Semaphore | None = None
        self._busy = 0

    @property
    def busy(self) -> int:
        """Number of threads running a function right now."""
        return self._busy

    async def acquire(self) -> None:
        """Wait until a thread is free and reserve it for the next ``submit``."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.size)
        await self._free.acquire()
        self._busy += 1

    def release(self) -> None:
        """Give back a reservation that will not be used by ``submit``."""
        self._busy -= 1
        if self._free is not None:
            self._free.release()

    def submit(self, func: Callable[..., Any], *args: Any) -> asyncio.Future[tuple[bool, Any]]:
        """Run ``func(*args)`` in the thread reserved by ``acquire``, in a copy of the context.

        The future resolves to ``(True, result)``, or ``(False, error)`` when the function
        raised. Errors are returned rather than set on the future because asyncio lets a
        ``KeyboardInterrupt`` or ``SystemExit`` set on a future escape the event loop and
        stop the server. Cancelling the future does not stop the function: its thread stays
        taken until it returns.
        """
        self._start_thread_if_needed()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        context = contextvars.copy_context()
        self._jobs.put((loop, future, context, func, args))
        return future

    async def run(self, func: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
        """Wait for a free thread, run ``func(*args)`` in it and return as ``submit`` does."""
        await self.acquire()
        try:
            future = self.submit(func, *args)
        except BaseException:
            self.release()
            raise
        return await future

    def shutdown(self) -> None:
        """Ask the threads to exit once they are idle; does not wait for them."""
        for _ in self._threads:
            self._jobs.put(_STOP)
        self._threads.clear()

    def _start_thread_if_needed(self) -> None:
        if len(self._threads) < min(self._busy, self.size):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            loop, future, context, func, args = job
            try:
                result = context.run(func, *args)
            except BaseException as error:
                outcome: tuple[bool, Any] = (False, error)
            else:
                outcome = (True, result)
            try:
                loop.call_soon_threadsafe(self._settle, future, outcome)
            except RuntimeError:
                return  # The event loop is closed: the process is shutting down.

    def _settle(self, future: asyncio.Future[tuple[bool, Any]], outcome: tuple[bool, Any]) -> None:
        self.release()
        if not future.done():  # The caller may have stopped waiting (timeout or cancel).
            future.set_result(outcome)
