"""Helpers of the logging and metrics tests: a started taskflow and captured loguru records."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any

from integration_fixtures import wait_for_status
from loguru import logger

from app_taskflow.dispatcher import DispatcherSettings
from app_taskflow.models import TERMINAL_STATUSES, TaskRecord
from app_taskflow.stores import MemoryStore
from app_taskflow.taskflow import Taskflow
from app_taskflow.tasks import RetryPolicy

if TYPE_CHECKING:
    from loguru import Record

FAST = DispatcherSettings(
    shutdown_grace=0.5,
    heartbeat_interval=0.2,
    lease_expiry=1.0,
    poll_interval=0.1,
    retry_delay_scale=0.0,
)
"""Dispatcher settings of the test taskflows: short leases and immediate retries."""

_SECONDS = re.compile(r"\d+\.\d+ s\b")


def build_taskflow(**options: Any) -> Taskflow:
    """Return a taskflow on a ``MemoryStore`` with fast settings and no retry delay.

    Keyword options are passed to ``Taskflow``, for example ``log_file=`` or
    ``prometheus=True``.
    """
    options.setdefault("settings", FAST)
    options.setdefault("default_policy", RetryPolicy(delay=0.0))
    return Taskflow(store_factory=MemoryStore, **options)


@asynccontextmanager
async def started(taskflow: Taskflow) -> AsyncIterator[Taskflow]:
    """Run ``taskflow`` for the duration of the block, as an app's lifespan would."""
    async with taskflow.lifespan():
        yield taskflow


async def run_task(taskflow: Taskflow, func: Callable[..., Any], /, *args: Any) -> TaskRecord:
    """Add a task outside any request and return its record once it has finished."""
    task_id = await taskflow.add_task(func, *args)
    return await wait_for_status(taskflow.store, task_id, *TERMINAL_STATUSES)


@contextmanager
def captured_records() -> Iterator[list[Record]]:
    """Yield the loguru records written in the block, at every level."""
    records: list[Record] = []
    sink_id = logger.add(lambda message: records.append(message.record), level=0)
    try:
        yield records
    finally:
        logger.remove(sink_id)


def mask_seconds(text: str) -> str:
    """Replace every duration such as ``0.012 s`` with ``<t> s``, which varies by run."""
    return _SECONDS.sub("<t> s", text)


def timeline_of(records: list[Record], task_id: str, min_level: int = 20) -> list[str]:
    """Return ``LEVEL message`` of the task's records at ``min_level`` or above.

    Only the first line of each message is kept, with durations masked and the task id
    written as ``<id>``.
    """
    lines = []
    for record in records:
        if record["extra"].get("task_id") != task_id or record["level"].no < min_level:
            continue
        first_line = record["message"].splitlines()[0].replace(task_id, "<id>")
        lines.append(f"{record['level'].name} {mask_seconds(first_line)}")
    return lines
