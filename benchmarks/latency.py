"""Section 3: latency of an unrelated route while the app runs many tasks.

A load process sends ``GET /ping`` at a fixed rate (open loop) to a uvicorn process of the
app-taskflow app. Right after it starts, ``POST /add?count=1000`` requests add the tasks,
and the pings go on until ``GET /tasks`` lists no PENDING or RUNNING task. With a dashboard
stream, a browser-like reader keeps the dashboard's event stream open during the whole run.
An idle run, with no tasks, gives the route's latency when nothing else happens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import httpx

from benchmarks.apps import ADD_PATH, PING_PATH
from benchmarks.backends import LABELS, fresh_store
from benchmarks.load import OpenLoopProcess
from benchmarks.plan import Context, attempt
from benchmarks.report import Table, TargetCheck, format_number
from benchmarks.server import ServerProcess, wait_until_idle
from benchmarks.sse import EventStreamReader, find_event_stream

PING_RATE = 200.0
"""Pings per second."""
PING_CONNECTIONS = 8
TASKS_PER_REQUEST = 1000


@dataclass
class LatencyRun:
    """The figures of one run.

    Attributes:
        pings: the ping load's summary (``p50_ms``, ``p99_ms``, ...).
        task_seconds: from the first ``POST /add`` until no task was active; ``None`` for
            the idle run.
        events: dashboard events read, or ``None`` without a stream.
        problem: what went wrong, or why the run could not be made.
    """

    pings: dict[str, Any] | None
    task_seconds: float | None = None
    events: int | None = None
    problem: str | None = None


async def measure(
    store: dict[str, Any],
    log_path: Path,
    tasks: int,
    with_stream: bool,
    idle_seconds: float,
    time_limit: float,
) -> LatencyRun:
    """Run ``tasks`` tasks (0 for the idle run) and measure the ping route meanwhile.

    Args:
        store: the ``store`` configuration of the app-taskflow app.
        log_path: file for the server's output.
        tasks: tasks to add; 0 pings an idle app for ``idle_seconds``.
        with_stream: keep the dashboard's event stream open during the run.
        idle_seconds: length of the idle run.
        time_limit: seconds after which the run stops waiting for the tasks.
    """
    server = ServerProcess("taskflow", log_path, store=store)
    await server.start()
    base_url = f"http://127.0.0.1:{server.port}"
    reader: EventStreamReader | None = None
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as client:
            if with_stream:
                path = await find_event_stream(client)
                if path is None:
                    return LatencyRun(pings=None, problem="the app has no dashboard event stream")
                reader = EventStreamReader(client, path)
                reader.start()
                await asyncio.wait_for(reader.first_event.wait(), 30.0)

            pinger = OpenLoopProcess(
                server.port, PING_PATH, PING_RATE, PING_CONNECTIONS, time_limit + idle_seconds
            )
            await pinger.start()
            task_seconds = None
            waited: float | None = 0.0
            started = perf_counter()
            if tasks:
                remaining = tasks
                while remaining:
                    count = min(TASKS_PER_REQUEST, remaining)
                    response = await client.post(ADD_PATH, params={"count": count})
                    response.raise_for_status()
                    remaining -= count
                waited = await wait_until_idle(client, time_limit)
                task_seconds = perf_counter() - started
            else:
                await asyncio.sleep(idle_seconds)
            pings = await pinger.stop()
            events = reader.events if reader is not None else None
    finally:
        if reader is not None:
            await reader.stop()
        await server.stop()

    problem = None
    if waited is None:
        problem = f"tasks still active after {time_limit:g} s"
    elif pings["errors"]:
        problem = f"{pings['errors']} pings failed ({pings['statuses']})"
    return LatencyRun(pings=pings, task_seconds=task_seconds, events=events, problem=problem)


async def run_section(context: Context) -> None:
    """Run section 3 on SQLite and add its table and target."""
    plan = context.plan
    store = "sqlite"
    table = Table(
        f"3. Latency of GET /ping while {plan.latency_tasks:,} tasks run ({LABELS[store]})",
        ["run", "pings", "p50 ms", "p99 ms", "tasks took (s)", "dashboard events read"],
    )
    runs: dict[str, LatencyRun] = {}
    variants = [
        ("idle: no tasks", 0, False),
        ("tasks, no dashboard stream", plan.latency_tasks, False),
        ("tasks, dashboard stream open", plan.latency_tasks, True),
    ]
    for label, tasks, with_stream in variants:

        async def run(tasks: int = tasks, with_stream: bool = with_stream) -> LatencyRun:
            with fresh_store(store, context.folder, context.servers) as config:
                return await measure(
                    config,
                    context.folder / f"latency-{tasks}-{with_stream}.log",
                    tasks,
                    with_stream,
                    plan.latency_idle_seconds,
                    plan.latency_time_limit,
                )

        result = await attempt(f"latency, {label}", run)
        if isinstance(result, str):
            table.add(label, "-", result, "-", "-", "-")
            continue
        runs[label] = result
        pings = result.pings
        if pings is None:
            table.add(label, "-", f"not measured yet: {result.problem}", "-", "-", "-")
            continue
        table.add(
            label,
            f"{pings['ok']:,}",
            format_number(pings["p50_ms"], 2),
            format_number(pings["p99_ms"], 2),
            format_number(result.task_seconds, 2) if result.problem is None else result.problem,
            "-" if result.events is None else f"{result.events:,}",
        )

    without = runs.get("tasks, no dashboard stream")
    with_stream_run = runs.get("tasks, dashboard stream open")
    cost = None
    reason = ""
    if without is None or with_stream_run is None:
        reason = "a run failed"
    elif with_stream_run.pings is None or without.pings is None:
        reason = with_stream_run.problem or without.problem or ""
    elif without.task_seconds and with_stream_run.task_seconds:
        p50_cost = with_stream_run.pings["p50_ms"] / without.pings["p50_ms"] - 1
        p99_cost = with_stream_run.pings["p99_ms"] / without.pings["p99_ms"] - 1
        time_cost = with_stream_run.task_seconds / without.task_seconds - 1
        cost = max(p50_cost, time_cost)
        table.notes.append(
            f"Cost of the open stream: p50 {p50_cost:+.0%}, p99 {p99_cost:+.0%}, "
            f"time to run the tasks {time_cost:+.0%}."
        )
    table.notes += [
        f"Pings: {PING_RATE:g}/s, open loop over {PING_CONNECTIONS} "
        "connections, latency counted from the moment each ping was due. Tasks: "
        f"POST /add?count={TASKS_PER_REQUEST} until {plan.latency_tasks:,} are added.",
        "The stream reader reconnects as a browser does when the server ends a stream.",
    ]
    context.tables.append(table)
    context.checks.append(
        TargetCheck(
            "dashboard stream cost (larger of p50 and task time)",
            "<= 10 %",
            "-" if cost is None else f"{cost:+.0%}",
            None if cost is None else cost <= 0.10,
            reason,
        )
    )
