"""Store outages: calls that wait them out, one warning per outage, and a buffer of tasks."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from app_taskflow.errors import StoreUnavailableError
from app_taskflow.logs import log
from app_taskflow.models import TaskRecord

T = TypeVar("T")

FIRST_BACKOFF = 0.05
"""Seconds before the first retry of a failed store call; each retry doubles it."""
MAX_BACKOFF = 5.0
"""Maximum wait in seconds between two tries of a store call."""
OTHER_FAILURE_RETRIES = 5
"""Retries of a store call that failed for another reason than an outage."""
SHUTDOWN_STORE_WAIT = 5.0
"""Seconds a stopping instance waits for an unreachable store before it gives up."""


def is_unavailable(error: BaseException) -> bool:
    """Return whether ``error`` means the store could not be reached, so waiting may help."""
    return isinstance(error, StoreUnavailableError | ConnectionError | TimeoutError)


class StoreHealth:
    """Tracks whether the store responds, logging each outage once at its start and end.

    Every failed call in between is only counted, so an outage of a minute under load
    gives two log lines, not thousands.
    """

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._failures = 0
        self._first_error = ""
        self.buffered_during_outage = 0
        self.back_since: float | None = None
        """When the store last responded again after an outage (``time.monotonic()``)."""

    @property
    def is_down(self) -> bool:
        """Whether the last store call failed because the store could not be reached."""
        return self._down_since is not None

    def record_failure(self, action: str, error: BaseException) -> None:
        """Count a failed call; the first failure of an outage logs a warning."""
        self._failures += 1
        if self._down_since is not None:
            log.debug("Store still unreachable ({}): {}", action, error)
            return
        self._down_since = time.monotonic()
        self._first_error = f"{type(error).__name__}: {error}"
        log.warning(
            "Store unreachable while trying to {} ({}); retrying with backoff, and "
            "reporting once it answers again",
            action,
            self._first_error,
        )

    def record_success(self) -> None:
        """Note that a call succeeded; the first success after an outage logs its summary."""
        if self._down_since is None:
            return
        seconds = time.monotonic() - self._down_since
        log.warning(
            "Store reachable again after {:.1f} s: {} call(s) failed meanwhile, {} task(s) "
            "were buffered; first error: {}",
            seconds,
            self._failures,
            self.buffered_during_outage,
            self._first_error,
        )
        self._down_since = None
        self._failures = 0
        self.buffered_during_outage = 0
        self.back_since = time.monotonic()


class TaskBuffer:
    """Tasks added while the store was unreachable, waiting to be stored, oldest first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._records: deque[TaskRecord] = deque()

    def __len__(self) -> int:
        return len(self._records)

    def offer(self, records: list[TaskRecord]) -> bool:
        """Keep all of ``records`` and return True, or keep none and return False if full."""
        if len(self._records) + len(records) > self.capacity:
            return False
        self._records.extend(records)
        return True

    def peek(self, limit: int) -> list[TaskRecord]:
        """Return up to ``limit`` of the oldest records without removing them."""
        return [self._records[index] for index in range(min(limit, len(self._records)))]

    def drop(self, count: int) -> None:
        """Remove the ``count`` oldest records, once they are stored."""
        for _ in range(count):
            self._records.popleft()


class StoreCaller:
    """Runs the dispatcher's store calls, waiting out outages with backoff.

    Args:
        health: the outage tracker that each call reports to.
        is_stopping: returns whether the dispatcher is shutting down, which bounds the
            wait for an unreachable store.
    """

    def __init__(self, health: StoreHealth, is_stopping: Callable[[], bool]) -> None:
        self._health = health
        self._is_stopping = is_stopping
        self._shutdown_wait_ends_at: float | None = None

    async def __call__(
        self,
        action: str,
        call: Callable[[], Awaitable[T]],
        *,
        wait_out_outage: bool = True,
    ) -> T | None:
        """Run a store call and return its result, or None once it gave up.

        An unreachable store is waited out with backoff for as long as the dispatcher runs,
        so that the results of tasks that ran during an outage are written once the store
        is back. Once the dispatcher is stopping, the wait ends after
        ``SHUTDOWN_STORE_WAIT`` seconds. With ``wait_out_outage`` False, an unreachable
        store gives up at once, for a call that is safe only while the store responds. Any
        other error is retried a few times, then logged at ERROR and given up.
        """
        loop = asyncio.get_running_loop()
        delay = FIRST_BACKOFF
        other_failures = 0
        while True:
            try:
                result = await call()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if is_unavailable(error):
                    self._health.record_failure(action, error)
                    if not wait_out_outage:
                        return None
                    if self._is_stopping():
                        # One deadline for the whole shutdown, not one per call.
                        if self._shutdown_wait_ends_at is None:
                            self._shutdown_wait_ends_at = loop.time() + SHUTDOWN_STORE_WAIT
                        if loop.time() >= self._shutdown_wait_ends_at:
                            log.error("Could not {} before shutdown: {}", action, error)
                            return None
                else:
                    other_failures += 1
                    if other_failures > OTHER_FAILURE_RETRIES:
                        log.opt(exception=error).error(
                            "Could not {} after {} tries; giving up", action, other_failures
                        )
                        return None
                    log.warning(
                        "Could not {} ({}: {}); try {} of {}, retrying in {:.2f} s",
                        action,
                        type(error).__name__,
                        error,
                        other_failures,
                        OTHER_FAILURE_RETRIES + 1,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._health.record_success()
            return result
