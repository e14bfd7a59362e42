"""Store outages: one warning per outage with counts, and the buffer of tasks added meanwhile."""

from __future__ import annotations

import time
from collections import deque

from app_taskflow.errors import StoreUnavailableError
from app_taskflow.logs import log
from app_taskflow.models import TaskRecord


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
