"""The counts and limits of a run, its results, and the helpers that every section uses."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from benchmarks.apps import TaskKind
from benchmarks.backends import Servers
from benchmarks.report import Table, TargetCheck

if TYPE_CHECKING:
    from benchmarks.history import HistoryRun
    from benchmarks.throughput import HttpRun


T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """Counts and time limits of one run. Times are in seconds.

    Attributes:
        inprocess_cases: section 1 rows as (task kind, tasks per request, tasks).
        inprocess_warmup: untimed tasks run before each section 1 row.
        inprocess_time_limit: time after which a section 1 row adds no more tasks.
        drain_limit: time allowed for tasks to end once the last one was added.
        http_requests: measured requests per server in section 2.
        http_warmup: requests sent to each server before the measured ones.
        http_time_limit: time after which the section 2 load stops sending.
        latency_tasks: tasks that run while section 3 measures the ping route.
        latency_idle_seconds: length of section 3's idle run.
        latency_time_limit: time allowed for section 3's tasks to end.
        history_tasks: finished tasks loaded into each store in section 4.
        history_calls: calls of each kind in section 4.
        history_call_time_limit: time after which a kind of call stops early.
        recovery_tasks: orphaned tasks in section 5.
        recovery_settings: configuration sections of the live instance in section 5.
        recovery_expires_in: time from the live instance's start to the dead lease's expiry.
        recovery_time_limit: time after the expiry at which section 5 stops waiting.
    """

    inprocess_cases: tuple[tuple[TaskKind, int, int], ...]
    inprocess_warmup: int
    inprocess_time_limit: float
    drain_limit: float
    http_requests: int
    http_warmup: int
    http_time_limit: float
    latency_tasks: int
    latency_idle_seconds: float
    latency_time_limit: float
    history_tasks: int
    history_calls: int
    history_call_time_limit: float
    recovery_tasks: int
    recovery_settings: dict[str, Any]
    recovery_expires_in: float
    recovery_time_limit: float


FULL = Plan(
    inprocess_cases=(
        ("async", 100, 100_000),
        ("async", 1, 10_000),
        ("sync", 100, 10_000),
        ("sync", 1, 10_000),
    ),
    inprocess_warmup=200,
    inprocess_time_limit=15.0,
    drain_limit=60.0,
    http_requests=10_000,
    http_warmup=1_000,
    http_time_limit=60.0,
    latency_tasks=10_000,
    latency_idle_seconds=3.0,
    latency_time_limit=90.0,
    history_tasks=1_000_000,
    history_calls=50,
    history_call_time_limit=20.0,
    recovery_tasks=10_000,
    recovery_settings={},
    recovery_expires_in=2.0,
    recovery_time_limit=30.0,
)

QUICK = Plan(
    # One row of each task kind and request size is enough to keep the code working.
    inprocess_cases=(("async", 100, 5_000), ("sync", 1, 1_000)),
    inprocess_warmup=20,
    inprocess_time_limit=0.5,
    drain_limit=20.0,
    http_requests=2_000,
    http_warmup=100,
    http_time_limit=2.0,
    latency_tasks=1_000,
    latency_idle_seconds=1.0,
    latency_time_limit=20.0,
    history_tasks=100_000,
    history_calls=10,
    history_call_time_limit=1.0,
    recovery_tasks=1_000,
    recovery_settings={"leases": {"heartbeat_interval": 0.5, "expiry": 2, "poll_interval": 0.2}},
    recovery_expires_in=1.0,
    recovery_time_limit=8.0,
)


@dataclass
class Context:
    """The state of a run: the plan, the stores to run, a work folder and the results.

    ``stores`` lists the stores chosen with ``--stores``; ``skipped`` maps those that cannot
    run here to the reason. Sections append their tables and target checks.
    """

    plan: Plan
    stores: list[str]
    skipped: dict[str, str]
    servers: Servers
    folder: Path
    tables: list[Table] = field(default_factory=list)
    checks: list[TargetCheck] = field(default_factory=list)
    load_averages: list[float] = field(default_factory=list)
    http_runs: dict[str, HttpRun] = field(default_factory=dict)
    history_runs: dict[str, HistoryRun] = field(default_factory=dict)


def progress(message: str) -> None:
    """Print a progress line with the time to stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def attempt(description: str, call: Callable[[], Awaitable[T]]) -> T | str:
    """Run one measurement; on an error, return a short description of it instead."""
    progress(description)
    try:
        return await call()
    except Exception as error:
        traceback.print_exc(file=sys.stderr)
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"


def skipped_reason(context: Context, store: str) -> str | None:
    """Return why a store is not measured in this run, or ``None`` when it is."""
    if store in context.skipped:
        return context.skipped[store]
    return None if store in context.stores else "not selected with --stores"
