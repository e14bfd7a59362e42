"""Section 2: requests per second and latency over HTTP of a route that adds one task.

Each app runs in its own uvicorn process on 127.0.0.1; a separate load process sends
``POST /add?count=1`` over keep-alive connections, 16 in flight. After a warm-up, the load
sends the measured requests. For app-taskflow, the benchmark then waits until the server's
tasks ended and reports that wait as the time the tasks took after the last response. The same run
gives the server's start-up time and its resident memory after the warm-up and at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.backends import LABELS, STORE_NAMES, fresh_store
from benchmarks.load import run_closed_loop
from benchmarks.plan import Context, attempt, skipped_reason
from benchmarks.report import Table, TargetCheck, format_number, format_ratio
from benchmarks.server import ServerProcess, wait_until_idle

ADD_ONE_PATH = "/add?count=1&kind=async"
CONCURRENCY = 16


@dataclass
class HttpRun:
    """The figures of one server.

    Attributes:
        ready_seconds: from starting the process to its first response.
        load: the load process's summary (``requests_per_second``, ``p50_ms``, ...).
        drain_seconds: time the tasks took to end after the last response; ``None`` for
            the plain app, whose tasks end before each response completes.
        rss_start_mb: resident memory after the warm-up.
        rss_end_mb: resident memory once every task ended.
        problem: what went wrong, if anything.
    """

    ready_seconds: float
    load: dict[str, Any]
    drain_seconds: float | None
    rss_start_mb: float
    rss_end_mb: float
    problem: str | None = None


async def measure(
    app: str,
    store: dict[str, Any] | None,
    log_path: Path,
    requests: int,
    warmup: int,
    max_seconds: float,
    drain_limit: float,
) -> HttpRun:
    """Start a server, load it, wait for its tasks and stop it.

    Args:
        app: ``plain`` or ``taskflow``.
        store: the ``store`` configuration of the ``taskflow`` app.
        log_path: file for the server's output.
        requests: measured requests.
        warmup: requests sent before the measured ones.
        max_seconds: time limit of the measured load.
        drain_limit: seconds to wait for the tasks after the last response.
    """
    server = ServerProcess(app, log_path, store=store)
    ready = await server.start()
    base_url = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            await run_closed_loop(server.port, "POST", ADD_ONE_PATH, warmup, CONCURRENCY, 60.0)
            if app == "taskflow":
                await wait_until_idle(client, drain_limit)
            rss_start = server.rss_mb()

            load = await run_closed_loop(
                server.port, "POST", ADD_ONE_PATH, requests, CONCURRENCY, max_seconds
            )
            drain = await wait_until_idle(client, drain_limit) if app == "taskflow" else None
            rss_end = server.rss_mb()
    finally:
        await server.stop()

    problem = None
    if load["errors"]:
        problem = f"{load['errors']} requests failed ({load['statuses']})"
    elif app == "taskflow" and drain is None:
        problem = f"tasks still active {drain_limit:g} s after the last response"
    return HttpRun(ready, load, drain, rss_start, rss_end, problem)


async def run_section(context: Context) -> None:
    """Run section 2 and add its table and targets."""
    plan = context.plan
    table = Table(
        "2. HTTP: a route that adds one task, 16 requests in flight",
        [
            "app",
            "requests",
            "requests/s",
            "ratio to plain",
            "p50 ms",
            "p99 ms",
            "tasks ended after the last response (s)",
        ],
    )
    apps: list[tuple[str, str]] = [("plain", "plain")]
    apps += [(store, "taskflow") for store in STORE_NAMES]
    plain_rate = math.nan
    for name, app in apps:
        reason = skipped_reason(context, name) if app == "taskflow" else None
        if reason is not None:
            table.add(LABELS[name], "-", "-", "-", "-", "-", reason)
            continue

        async def run(name: str = name, app: str = app) -> HttpRun:
            log_path = context.folder / f"http-{name}.log"
            if app == "plain":
                return await _http_measure(context, app, None, log_path)
            with fresh_store(name, context.folder, context.servers) as config:
                return await _http_measure(context, app, config, log_path)

        result = await attempt(f"HTTP, {name}", run)
        if isinstance(result, str):
            table.add(LABELS[name], "-", result, "-", "-", "-", "-")
            continue
        context.http_runs[name] = result
        load = result.load
        rate = load["requests_per_second"]
        if name == "plain":
            plain_rate = rate
        table.add(
            LABELS[name],
            f"{load['ok']:,}",
            format_number(rate, 0) if result.problem is None else result.problem,
            format_ratio(rate / plain_rate),
            format_number(load["p50_ms"], 2),
            format_number(load["p99_ms"], 2),
            format_number(result.drain_seconds, 2) if result.drain_seconds is not None else "-",
        )
    table.notes += [
        f"{plan.http_warmup:,} warm-up requests first. Server: uvicorn in its own process, "
        "access log off; load: benchmarks/load.py in another process, keep-alive.",
        "The last column is how long app-taskflow needed, after the last response, to run "
        "the tasks still waiting, polled every 50 ms: below 0.05 means none were waiting.",
    ]
    context.tables.append(table)
    for store, goal in (("sqlite", 0.85), ("memory", 0.95)):
        run = context.http_runs.get(store)
        ratio = None
        if run is not None and run.problem is None and "plain" in context.http_runs:
            ratio = run.load["requests_per_second"] / plain_rate
        context.checks.append(
            TargetCheck(
                f"HTTP requests/s, {LABELS[store]} vs plain",
                f">= {goal:.2f}x",
                format_ratio(ratio),
                None if ratio is None else ratio >= goal,
                (skipped_reason(context, store) or "a run failed") if ratio is None else "",
            )
        )


async def _http_measure(
    context: Context, app: str, config: dict[str, Any] | None, log_path: Path
) -> HttpRun:
    plan = context.plan
    return await measure(
        app,
        config,
        log_path,
        plan.http_requests,
        plan.http_warmup,
        plan.http_time_limit,
        plan.drain_limit,
    )
