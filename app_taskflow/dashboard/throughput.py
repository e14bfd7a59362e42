"""Tasks finished per minute, read from any store through ``TaskStore.list``."""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, Field

from app_taskflow.models import TaskQuery, TaskStatus
from app_taskflow.stores.base import TaskStore

FINISHED_STATUSES = (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.INTERRUPTED)
"""Statuses counted: CANCELLED tasks never ran, so they are left out."""

PAGE_SIZE = 1000
DEFAULT_MAX_SCAN = 50_000


class ThroughputBucket(BaseModel):
    """Tasks that finished in one minute."""

    start: datetime
    succeeded: int = 0
    failed: int = Field(default=0, description="FAILED and INTERRUPTED tasks.")


class Throughput(BaseModel):
    """Tasks finished per minute over a window that ends with the current minute."""

    start: datetime
    end: datetime
    buckets: list[ThroughputBucket]
    scanned: int = Field(description="Finished tasks read from the store to count these.")
    complete: bool = Field(
        description="False when the scan stopped at its limit, so older minutes miss tasks."
    )


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


async def throughput(
    store: TaskStore, now: datetime, minutes: int = 60, max_scan: int = DEFAULT_MAX_SCAN
) -> Throughput:
    """Count the tasks that finished in each of the last ``minutes`` minutes.

    The last bucket is the current minute, up to ``now``. A task counts in the minute of
    its ``finished_at``: as succeeded when SUCCESS, as failed when FAILED or INTERRUPTED.

    NOTE: the store contract lists tasks by creation time only, so this reads every
    finished task created since ``minutes`` before the window began, newest first, in
    pages of 1000: about two windows' worth of tasks per call, up to ``max_scan``. A task
    created earlier than that (a long wait for a retry, or a manual retry of an old task)
    is not counted although it finished inside the window.

    Args:
        store: any store.
        now: the end of the window, an aware UTC datetime.
        minutes: the window's length, at least 1.
        max_scan: the maximum number of tasks read; past it, ``complete`` is ``False``.
    """
    if minutes < 1:
        raise ValueError(f"Invalid minutes {minutes!r}: must be 1 or more.")
    end = _minute(now) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    created_since = start - timedelta(minutes=minutes)
    buckets = [ThroughputBucket(start=start + timedelta(minutes=index)) for index in range(minutes)]

    scanned = 0
    cursor: str | None = None
    while True:
        page = await store.list(
            TaskQuery(
                statuses=list(FINISHED_STATUSES),
                order="newest",
                limit=min(PAGE_SIZE, max_scan - scanned),
                cursor=cursor,
            )
        )
        for task in page.items:
            if task.created_at < created_since:
                return Throughput(
                    start=start, end=end, buckets=buckets, scanned=scanned, complete=True
                )
            scanned += 1
            finished = task.finished_at
            if finished is None or not start <= finished < end:
                continue
            bucket = buckets[int((finished - start).total_seconds() // 60)]
            if task.status is TaskStatus.SUCCESS:
                bucket.succeeded += 1
            else:
                bucket.failed += 1
        if page.next_cursor is None:
            return Throughput(start=start, end=end, buckets=buckets, scanned=scanned, complete=True)
        if scanned >= max_scan:
            return Throughput(
                start=start, end=end, buckets=buckets, scanned=scanned, complete=False
            )
        cursor = page.next_cursor
