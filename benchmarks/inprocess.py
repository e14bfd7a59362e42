"""Section 1: trivial tasks added by requests to the ASGI app in this process, run to the end.

What "added and finished" means on each side:

- Requests go through ``httpx.ASGITransport`` to the app in this process, one after the
  other. Each ``POST /add`` adds ``per_request`` tasks, so the cost of the request itself
  is paid once per task (1 per request) or shared by 100 tasks (100 per request).
- Plain ``BackgroundTasks``: a task is finished when the request that added it returns,
  because Starlette runs the background tasks before the ASGI call ends.
- app-taskflow: the clock stops when the store reports no PENDING or RUNNING task, and the
  store's SUCCESS count is then checked against the number of tasks added.

Both sides first run a few tasks that are not timed (200 in the full run). When a store is
slow, adding stops at a time limit and the figure covers the tasks added by then. The
app-taskflow side pauses adding while more than ``BACKLOG`` tasks wait, so that stopping
never leaves a long queue.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import httpx
from fastapi import FastAPI

from app_taskflow.models import TaskQuery, TaskStatus
from app_taskflow.stores.base import TaskStore
from benchmarks.apps import (
    ADD_PATH,
    TaskKind,
    build_plain_app,
    build_taskflow_app,
    send_library_logs_to_devnull,
    task_calls,
)
from benchmarks.backends import LABELS, STORE_NAMES, fresh_store
from benchmarks.plan import Context, attempt, skipped_reason
from benchmarks.report import Table, TargetCheck, format_number, format_ratio

CHUNK = 200
"""Tasks added between two checks of the time limit and the backlog."""
BACKLOG = 500
"""Tasks that may wait to run before the app-taskflow side pauses adding."""
_POLL_INTERVAL = 0.01
_ACTIVE = TaskQuery(statuses=[TaskStatus.PENDING, TaskStatus.RUNNING], limit=1)


@dataclass(frozen=True)
class Case:
    """One row shape: the kind of task, the tasks per request and the tasks to run."""

    kind: TaskKind
    per_request: int
    tasks: int


@dataclass
class RunResult:
    """The tasks measured and the seconds they took from the first request to the last end.

    ``problem`` describes what went wrong when the tasks did not all end as SUCCESS in time.
    """

    tasks: int
    seconds: float
    stopped_early: bool = False
    problem: str | None = None

    @property
    def microseconds_per_task(self) -> float:
        """Wall time per task in microseconds."""
        return self.seconds / self.tasks * 1e6 if self.tasks else float("nan")


async def run_plain(case: Case, warmup: int, time_limit: float) -> RunResult:
    """Run ``case`` against the plain ``BackgroundTasks`` app after ``warmup`` untimed tasks."""
    app = build_plain_app()
    async with _client(app) as client:
        await _add(client, case, warmup)
        started = perf_counter()
        added = await _add_until(client, case, started + time_limit)
        seconds = perf_counter() - started
    return RunResult(tasks=added, seconds=seconds, stopped_early=added < case.tasks)


async def run_taskflow(
    store: dict[str, Any], case: Case, warmup: int, time_limit: float, drain_limit: float
) -> RunResult:
    """Run ``case`` against the app-taskflow app with the given ``store`` configuration.

    Args:
        store: the ``store`` section of the configuration.
        case: the tasks to add.
        warmup: tasks added and run before the clock starts.
        time_limit: seconds after which no more tasks are added.
        drain_limit: seconds allowed, after the last request, for the added tasks to end.
    """
    app, taskflow = build_taskflow_app(store)
    async with taskflow.lifespan(app), _client(app) as client:
        task_store = taskflow.store
        await _add(client, case, warmup)
        if not await _wait_until_idle(task_store, perf_counter() + drain_limit):
            return RunResult(tasks=0, seconds=0.0, problem="the warm-up tasks did not end")
        calls_before = task_calls.value

        def calls() -> int:
            return task_calls.value - calls_before

        async def pause_while_backlog(added: int) -> None:
            # Polled: the counter also moves in worker threads, which cannot set an Event.
            while added - calls() > BACKLOG:  # noqa: ASYNC110
                await asyncio.sleep(_POLL_INTERVAL)

        started = perf_counter()
        added = await _add_until(client, case, started + time_limit, pause_while_backlog)
        drain_deadline = perf_counter() + drain_limit
        # The call counter is free to read, so the store is asked only once every task ran.
        while calls() < added and perf_counter() < drain_deadline:  # noqa: ASYNC110
            await asyncio.sleep(_POLL_INTERVAL)
        idle = await _wait_until_idle(task_store, drain_deadline)
        seconds = perf_counter() - started
        metrics = await task_store.metrics()

    succeeded = metrics.counts[TaskStatus.SUCCESS] - warmup
    problem = None
    if not idle:
        problem = f"tasks were still active {drain_limit:g} s after the last request"
    elif succeeded != added:
        problem = f"{succeeded} of {added} tasks ended as SUCCESS"
    return RunResult(
        tasks=added, seconds=seconds, stopped_early=added < case.tasks, problem=problem
    )


async def _add_until(
    client: httpx.AsyncClient,
    case: Case,
    deadline: float,
    before_chunk: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Add the tasks of ``case`` in chunks until all are added or the deadline passed.

    ``before_chunk`` receives the number of tasks added so far and may wait.
    """
    added = 0
    while added < case.tasks and perf_counter() < deadline:
        if before_chunk is not None:
            await before_chunk(added)
        count = min(CHUNK, case.tasks - added)
        await _add(client, case, count)
        added += count
    return added


async def _add(client: httpx.AsyncClient, case: Case, count: int) -> None:
    """Add ``count`` tasks in requests of ``case.per_request`` tasks (the last may be smaller)."""
    remaining = count
    while remaining:
        size = min(case.per_request, remaining)
        response = await client.post(ADD_PATH, params={"count": size, "kind": case.kind})
        response.raise_for_status()
        remaining -= size


async def _wait_until_idle(store: TaskStore, deadline: float) -> bool:
    """Wait until the store has no PENDING or RUNNING task; return False at the deadline."""
    while perf_counter() < deadline:
        if not (await store.list(_ACTIVE)).items:
            return True
        await asyncio.sleep(_POLL_INTERVAL)
    return False


@asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://benchmark") as client:
        yield client


async def run_section(context: Context) -> None:
    """Run section 1 and add its table and targets."""
    plan = context.plan
    table = Table(
        "1. In process: trivial tasks added by requests and run to the end",
        ["tasks", "per request", "app", "tasks measured", "µs per task", "ratio to plain"],
    )
    cases = [Case(kind, per_request, tasks) for kind, per_request, tasks in plan.inprocess_cases]
    batched_async: dict[str, float] = {}
    for case in cases:
        plain = await attempt(
            f"in process, plain, {case}",
            lambda case=case: run_plain(case, plan.inprocess_warmup, plan.inprocess_time_limit),
        )
        plain_us = math.nan
        if isinstance(plain, str):
            table.add(case.kind, case.per_request, LABELS["plain"], "-", plain, "-")
        else:
            plain_us = plain.microseconds_per_task
            table.add(
                case.kind,
                case.per_request,
                LABELS["plain"],
                _measured(plain),
                format_number(plain_us),
                "1.00x",
            )
        for store in STORE_NAMES:
            reason = skipped_reason(context, store)
            if reason is not None:
                table.add(case.kind, case.per_request, LABELS[store], "-", "-", reason)
                continue

            async def run(store: str = store, case: Case = case) -> RunResult:
                with fresh_store(store, context.folder, context.servers) as config:
                    return await run_taskflow(
                        config,
                        case,
                        plan.inprocess_warmup,
                        plan.inprocess_time_limit,
                        plan.drain_limit,
                    )

            result = await attempt(f"in process, {store}, {case}", run)
            if isinstance(result, str):
                table.add(case.kind, case.per_request, LABELS[store], "-", result, "-")
                continue
            us = result.microseconds_per_task
            figure = format_number(us) if result.problem is None else result.problem
            table.add(
                case.kind,
                case.per_request,
                LABELS[store],
                _measured(result),
                figure,
                format_ratio(us / plain_us),
            )
            if case.kind == "async" and case.per_request == 100 and result.problem is None:
                batched_async[store] = us

    table.notes += [
        "Requests go one after the other through httpx.ASGITransport to the app in this "
        "process. Plain: a task is finished when the request that added it returns. "
        "app-taskflow: when the store reports no PENDING or RUNNING task (SUCCESS count "
        "checked).",
        f"'(time limit)': adding stopped after {plan.inprocess_time_limit:g} s; the figure "
        "covers the tasks added by then, all of which ran to the end.",
    ]
    context.tables.append(table)
    await _measure_log_cost(context, batched_async)
    for store, goal in (("sqlite", 100.0), ("memory", 25.0)):
        figure = batched_async.get(store)
        context.checks.append(
            TargetCheck(
                f"in process, trivial async task, {LABELS[store]} (100 per request)",
                f"<= {goal:g} µs/task",
                f"{format_number(figure)} µs/task",
                None if figure is None else figure <= goal,
                (skipped_reason(context, store) or "a run failed") if figure is None else "",
            )
        )


async def _measure_log_cost(context: Context, at_info: dict[str, float]) -> None:
    """Run the batched async row again with the lines of the task timeline dropped.

    The difference to the row above is what the three INFO lines of each task (added,
    started, succeeded) cost, because loguru drops them unformatted when its sink is at
    WARNING.
    """
    plan = context.plan
    table = Table(
        "1b. What each task's log lines cost (async, 100 per request)",
        ["app", "µs per task, lines at INFO", "µs per task, sink at WARNING", "lines cost"],
    )
    case = next(
        (
            Case(kind, per_request, tasks)
            for kind, per_request, tasks in plan.inprocess_cases
            if kind == "async" and per_request == 100
        ),
        None,
    )
    if case is None:
        return
    send_library_logs_to_devnull("WARNING")
    try:
        for store in ("memory", "sqlite"):
            if store not in at_info or skipped_reason(context, store) is not None:
                continue

            async def run(store: str = store, case: Case = case) -> RunResult:
                with fresh_store(store, context.folder, context.servers) as config:
                    return await run_taskflow(
                        config,
                        case,
                        plan.inprocess_warmup,
                        plan.inprocess_time_limit,
                        plan.drain_limit,
                    )

            result = await attempt(f"in process, {store}, {case}, sink at WARNING", run)
            if isinstance(result, str) or result.problem is not None:
                problem = result if isinstance(result, str) else result.problem
                table.add(LABELS[store], format_number(at_info[store]), problem, "-")
                continue
            quiet = result.microseconds_per_task
            table.add(
                LABELS[store],
                format_number(at_info[store]),
                format_number(quiet),
                f"{format_number(at_info[store] - quiet)} µs/task",
            )
    finally:
        send_library_logs_to_devnull()
    table.notes.append(
        "Same runs as the rows of table 1, with loguru's only sink at WARNING, so that the "
        "INFO lines of the task timeline are dropped before they are formatted."
    )
    context.tables.append(table)


def _measured(result: RunResult) -> str:
    return f"{result.tasks:,}" + (" (time limit)" if result.stopped_early else "")
