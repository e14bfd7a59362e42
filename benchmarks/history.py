"""Section 4: the REST API and the dashboard over a store that contains a long history.

The history is written straight into the SQL store's tables, after the store's own
``open()`` created them, because adding and running a million tasks through the library
would take hours. The store's triggers count these rows for the metrics as they go in.
Each task gets one attempt row and no log entry; 94 % end SUCCESS, 5 % FAILED and 1 %
CANCELLED, under 20 task names, created over the last 30 days. PostgreSQL gets an
``ANALYZE`` afterwards, as its autovacuum would run after such a load; SQLite gets none,
because nothing runs it in production either.

A uvicorn process then serves the app-taskflow app over that store: its start-up time is
measured, then each API call is made one at a time from this process.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from time import perf_counter
from typing import Any

import httpx
import sqlalchemy

from benchmarks.backends import LABELS, fresh_store, sqlalchemy_url
from benchmarks.plan import Context, attempt, progress, skipped_reason
from benchmarks.report import Table, TargetCheck, format_number, percentile
from benchmarks.server import ServerProcess
from benchmarks.sse import find_event_stream, time_to_first_event

TASK_NAME_COUNT = 20
INSERT_BATCH = 20_000
SAMPLE_SIZE = 1000
WARMUP_CALLS = 1
"""Untimed calls of each kind before the timed ones."""
MIN_CALLS = 3
HISTORY_DAYS = 30
FIRST_EVENT_CONNECTIONS = 10
FILTER_NAME = "bench.history_07"


@dataclass
class CallStats:
    """Latencies of one kind of call, in milliseconds."""

    calls: int
    p50_ms: float
    p95_ms: float
    max_ms: float


@dataclass
class HistoryRun:
    """The figures of one store with a long history.

    Attributes:
        load_seconds: time the bulk insert took (not a figure of the library).
        ready_seconds: from starting the server process to its first response.
        calls: latencies per call, keyed by the call's description.
        rss_mb: the server's resident memory after the calls.
        problems: calls that failed, with the reason.
    """

    load_seconds: float
    ready_seconds: float | None = None
    calls: dict[str, CallStats | None] = field(default_factory=dict)
    rss_mb: float | None = None
    problems: list[str] = field(default_factory=list)


def bulk_load(store: dict[str, Any], count: int) -> tuple[float, list[str]]:
    """Insert ``count`` finished tasks with their attempts into a SQL store's tables.

    The tables must exist: open the store once before. PostgreSQL is loaded with ``COPY``,
    SQLite with batched inserts through SQLAlchemy, which stores the timestamps in the
    format the store reads. Returns the seconds taken and a sample of the inserted ids.

    Raises:
        RuntimeError: the store's tables lack a column that the history rows fill, so the
            store's schema changed and this loader needs the same change.
    """
    from app_taskflow.stores.sql_schema import TaskflowTable

    tables = TaskflowTable.metadata.tables
    task_table, attempt_table = tables["taskflow_tasks"], tables["taskflow_attempts"]
    first_task, first_attempt = next(_history_rows(1))
    for table, row in ((task_table, first_task), (attempt_table, first_attempt)):
        missing = set(row) - set(table.columns.keys())
        if missing:
            raise RuntimeError(f"{table.name} has no column {', '.join(sorted(missing))}.")

    engine = sqlalchemy.create_engine(sqlalchemy_url(store))
    postgres = engine.dialect.name == "postgresql"
    if not postgres:
        sqlalchemy.event.listen(engine, "connect", _keep_temporary_files_in_memory)
    sample: list[str] = []
    started = perf_counter()
    try:
        with engine.begin() as connection:
            for start in range(0, count, INSERT_BATCH):
                rows = list(_history_rows(min(INSERT_BATCH, count - start), start, count))
                if len(sample) < SAMPLE_SIZE:
                    sample += [task["id"] for task, _ in rows[:: max(1, count // SAMPLE_SIZE)]]
                tasks = [task for task, _ in rows]
                attempts = [attempt for _, attempt in rows]
                if postgres:
                    _copy_rows(connection, task_table.name, tasks)
                    _copy_rows(connection, attempt_table.name, attempts)
                else:
                    connection.execute(sqlalchemy.insert(task_table), tasks)
                    connection.execute(sqlalchemy.insert(attempt_table), attempts)
        if postgres:
            with engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
                    "ANALYZE"
                )
    finally:
        engine.dispose()
    return perf_counter() - started, sample


def _keep_temporary_files_in_memory(dbapi_connection: Any, connection_record: object) -> None:
    # The store's count triggers make every insert keep a statement journal, which outgrows
    # its memory buffer in a transaction this long and goes to a temporary file. Kept in
    # memory, 100,000 rows took 7.5 s instead of 9.4 s (6.3 s without the triggers), on a
    # shared 2-CPU machine.
    dbapi_connection.execute("PRAGMA temp_store = MEMORY")


def _copy_rows(connection: sqlalchemy.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    # psycopg's COPY, in the transaction of the SQLAlchemy connection.
    cursor: Any = connection.connection.cursor()
    with cursor.copy(f"COPY {table} ({', '.join(rows[0])}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(tuple(row.values()))


def _history_rows(
    count: int, first: int = 0, total: int = 1
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yield task and attempt rows number ``first`` to ``first + count`` of ``total``."""
    now = datetime.now(UTC)
    start = now - timedelta(days=HISTORY_DAYS)
    step = (now - start - timedelta(minutes=1)) / max(total, 1)
    for index in range(first, first + count):
        # Faster than uuid4(), which reads os.urandom for every id.
        task_id = str(uuid.UUID(int=random.getrandbits(128), version=4))
        created_at = start + step * index
        started_at = created_at + timedelta(milliseconds=5)
        duration = random.uniform(0.001, 0.5)
        finished_at = started_at + timedelta(seconds=duration)
        draw = random.random()
        if draw < 0.94:
            status = "SUCCESS"
        elif draw < 0.99:
            status = "FAILED"
        else:
            status = "CANCELLED"
        error_type = None if status == "SUCCESS" else "ValueError"
        error_message = None if status == "SUCCESS" else "benchmark failure"
        yield (
            {
                "id": task_id,
                "name": f"bench.history_{index % TASK_NAME_COUNT:02d}",
                "status": status,
                "args": "[]",
                "kwargs": "{}",
                "attempts": 1,
                "max_attempts": 1,
                "created_at": created_at,
                "scheduled_at": None,
                "started_at": started_at,
                "finished_at": finished_at,
                "duration": duration,
                "error_type": error_type,
                "error_message": error_message,
                "traceback": None,
                "owner": None,
                "idempotency_key": None,
                "requeue_on_interrupt": False,
                "cancel_requested": False,
            },
            {
                "task_id": task_id,
                "number": 1,
                "instance_id": "benchmark-history",
                "started_at": started_at,
                "finished_at": finished_at,
                "status": status,
                "error_type": error_type,
                "error_message": error_message,
            },
        )


async def measure_api(
    store: dict[str, Any],
    log_path: Path,
    task_ids: list[str],
    calls: int,
    call_time_limit: float,
) -> HistoryRun:
    """Serve the app over the loaded store and time each kind of call, one at a time.

    Args:
        store: the ``store`` configuration.
        log_path: file for the server's output.
        task_ids: ids of stored tasks, read in turn by ``GET /tasks/{id}``.
        calls: calls per kind.
        call_time_limit: seconds after which a kind of call stops early (at least
            ``MIN_CALLS`` are made), because the metrics call can take seconds over a
            long history.
    """
    run = HistoryRun(load_seconds=0.0)
    server = ServerProcess("taskflow", log_path, store=store)
    run.ready_seconds = await server.start(ready_limit=120.0)
    base_url = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as client:
            paths = {
                "GET /tasks (first page)": lambda _: "/tasks",
                "GET /tasks?status=FAILED": lambda _: "/tasks?status=FAILED",
                f"GET /tasks?name={FILTER_NAME}": lambda _: f"/tasks?name={FILTER_NAME}",
                "GET /tasks/{id}": lambda index: f"/tasks/{task_ids[index % len(task_ids)]}",
                "GET /tasks/metrics": lambda _: "/tasks/metrics",
            }
            for label, path_of in paths.items():
                try:
                    run.calls[label] = await _time_calls(client, path_of, calls, call_time_limit)
                except (httpx.HTTPError, RuntimeError) as error:
                    run.calls[label] = None
                    run.problems.append(f"{label}: {error}")

            label = "first dashboard event"
            stream_path = await find_event_stream(client)
            if stream_path is None:
                run.calls[label] = None
                run.problems.append(f"{label}: the app has no dashboard event stream")
            else:
                seconds = [
                    await time_to_first_event(client, stream_path)
                    for _ in range(FIRST_EVENT_CONNECTIONS)
                ]
                run.calls[label] = _stats([value * 1000 for value in seconds])
            run.rss_mb = server.rss_mb()
    finally:
        await server.stop()
    return run


async def _time_calls(
    client: httpx.AsyncClient, path_of: Callable[[int], str], calls: int, time_limit: float
) -> CallStats:
    for index in range(WARMUP_CALLS):
        (await client.get(path_of(index))).raise_for_status()
    latencies: list[float] = []
    started = perf_counter()
    for index in range(calls):
        if index >= MIN_CALLS and perf_counter() - started > time_limit:
            break
        sent = perf_counter()
        response = await client.get(path_of(WARMUP_CALLS + index))
        latency = perf_counter() - sent
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}: {response.text[:200]}")
        latencies.append(latency * 1000)
    return _stats(latencies)


def _stats(latencies_ms: list[float]) -> CallStats:
    return CallStats(
        calls=len(latencies_ms),
        p50_ms=percentile(latencies_ms, 0.50),
        p95_ms=percentile(latencies_ms, 0.95),
        max_ms=max(latencies_ms),
    )


async def run_section(context: Context) -> None:
    """Run section 4 on SQLite and PostgreSQL and add its table and targets."""
    plan = context.plan
    stores = ["sqlite", "postgres"]
    for store in stores:
        reason = skipped_reason(context, store)
        if reason is not None:
            continue

        async def run(store: str = store) -> HistoryRun:
            with fresh_store(store, context.folder, context.servers) as config:
                await _open_store_once(config)
                load_seconds, sample = await asyncio.to_thread(
                    bulk_load, config, plan.history_tasks
                )
                progress(f"history, {store}: {plan.history_tasks:,} tasks in {load_seconds:.1f} s")
                result = await measure_api(
                    config,
                    context.folder / f"history-{store}.log",
                    sample,
                    plan.history_calls,
                    plan.history_call_time_limit,
                )
                result.load_seconds = load_seconds
                return result

        result = await attempt(f"history, {store}", run)
        if isinstance(result, str):
            context.history_runs[store] = HistoryRun(load_seconds=0.0, problems=[result])
        else:
            context.history_runs[store] = result

    header = ["call"]
    for store in stores:
        header.append(f"{LABELS[store]} p50 / p95 ms (calls)")
    table = Table(f"4. API latency with {plan.history_tasks:,} finished tasks stored", header)
    labels: list[str] = []
    for run in context.history_runs.values():
        labels += [label for label in run.calls if label not in labels]
    for label in labels:
        cells = [label]
        for store in stores:
            stats = context.history_runs.get(store, HistoryRun(0.0)).calls.get(label)
            cells.append(
                "-"
                if stats is None
                else f"{stats.p50_ms:,.1f} / {stats.p95_ms:,.1f} ({stats.calls})"
            )
        table.add(*cells)
    for store in stores:
        reason = skipped_reason(context, store)
        run = context.history_runs.get(store)
        if reason is not None:
            table.notes.append(f"{LABELS[store]}: not measured: {reason}.")
        elif run is not None:
            table.notes.append(
                f"{LABELS[store]}: bulk insert {run.load_seconds:.0f} s (not a library figure); "
                f"server ready in {format_number(run.ready_seconds, 2)} s; "
                f"RSS after the calls {format_number(run.rss_mb, 0)} MB."
            )
            table.notes += [f"{LABELS[store]}: {problem}" for problem in run.problems]
    table.notes.append(
        "Calls one at a time after one warm-up call of each kind; a kind of call stops "
        f"after {plan.history_call_time_limit:g} s (at least {MIN_CALLS} calls). GET /tasks/{{id}} "
        "reads a different stored task each time. The first dashboard event is timed over "
        f"{FIRST_EVENT_CONNECTIONS} new connections."
    )
    context.tables.append(table)

    for store in stores:
        run = context.history_runs.get(store)
        measured = {} if run is None else {k: v for k, v in run.calls.items() if v is not None}
        reason = skipped_reason(context, store) or ""
        if not measured:
            reason = reason or "no call succeeded"
            context.checks.append(
                TargetCheck(
                    f"{plan.history_tasks:,} tasks stored, every API call, {LABELS[store]}",
                    "p95 < 50 ms",
                    "-",
                    None,
                    reason,
                )
            )
            continue
        worst_label, worst = max(measured.items(), key=lambda item: item[1].p95_ms)
        missing = [label for label, stats in (run.calls if run else {}).items() if stats is None]
        figure = f"worst p95 {worst.p95_ms:,.1f} ms ({worst_label})"
        if missing:
            figure += f"; not measured: {', '.join(missing)}"
        context.checks.append(
            TargetCheck(
                f"{plan.history_tasks:,} tasks stored, every API call, {LABELS[store]}",
                "p95 < 50 ms",
                figure,
                worst.p95_ms < 50,
            )
        )


async def _open_store_once(config: dict[str, Any]) -> None:
    """Create the store's tables through its own ``open()``."""
    from app_taskflow import TaskflowContainer
    from app_taskflow.config import parse_settings

    store = TaskflowContainer.from_settings(parse_settings({"store": config})).store()
    await store.open()
    await store.close()
