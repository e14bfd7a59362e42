"""Tests of app_taskflow.workers: the bounded pool of daemon threads."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator

import pytest

from app_taskflow.workers import WorkerPool

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class ConcurrencyProbe:
    """A sync job that records how many copies of itself run at the same time."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.02)
        with self._lock:
            self.running -= 1


@pytest.fixture
def release_event() -> Iterator[threading.Event]:
    """Yield an event that blocked jobs wait for. It is set after the test."""
    event = threading.Event()
    yield event
    event.set()


def raise_value_error() -> None:
    raise ValueError("invalid address")


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


async def test_pool_bounds_concurrency() -> None:
    pool = WorkerPool(2)
    probe = ConcurrencyProbe()
    try:
        await asyncio.gather(*(pool.run(probe) for _ in range(8)))
    finally:
        pool.shutdown()

    assert probe.peak == 2
    assert pool.busy == 0


async def test_pool_full_caller_waits(release_event: threading.Event) -> None:
    pool = WorkerPool(1)
    first = asyncio.ensure_future(pool.run(release_event.wait, 30))
    second = asyncio.ensure_future(pool.run(threading.get_ident))
    await asyncio.sleep(0.05)

    assert pool.busy == 1
    assert second.done() is False

    release_event.set()
    await asyncio.gather(first, second)
    pool.shutdown()

    assert pool.busy == 0


async def test_pool_returns_result(worker_pool: WorkerPool) -> None:
    assert await worker_pool.run(pow, 2, 10) == (True, 1024)


async def test_pool_returns_error(worker_pool: WorkerPool) -> None:
    succeeded, error = await worker_pool.run(raise_value_error)

    assert succeeded is False
    assert isinstance(error, ValueError)


async def test_pool_returns_keyboard_interrupt(worker_pool: WorkerPool) -> None:
    succeeded, error = await worker_pool.run(raise_keyboard_interrupt)

    assert succeeded is False
    assert isinstance(error, KeyboardInterrupt)


async def test_pool_threads_are_daemon(worker_pool: WorkerPool) -> None:
    _, thread = await worker_pool.run(threading.current_thread)

    assert thread.daemon is True
    assert thread.name == "test-worker-0"
    assert thread is not threading.current_thread()


async def test_pool_copies_context(worker_pool: WorkerPool) -> None:
    REQUEST_ID.set("request-1")

    _, value = await worker_pool.run(REQUEST_ID.get)

    assert value == "request-1"


async def test_pool_reuses_threads(worker_pool: WorkerPool) -> None:
    threads = {(await worker_pool.run(threading.current_thread))[1] for _ in range(5)}

    assert len(threads) == 1


async def test_pool_shutdown_stops_threads() -> None:
    pool = WorkerPool(1)
    _, thread = await pool.run(threading.current_thread)

    pool.shutdown()
    thread.join(timeout=5)

    assert thread.is_alive() is False


@pytest.mark.parametrize("size", [0, -1])
def test_pool_invalid_size(size: int) -> None:
    with pytest.raises(ValueError, match=f"Invalid worker pool size {size}: expected at least 1"):
        WorkerPool(size)
