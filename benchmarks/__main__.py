"""Run the benchmarks side by side and print Markdown tables: ``python -m benchmarks``.

``--quick`` runs every section with small counts and short limits, to keep the suite
working; its figures are not the ones to quote. ``--help`` lists the other options.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from benchmarks import history, inprocess, latency, recovery, throughput
from benchmarks.apps import send_library_logs_to_devnull
from benchmarks.backends import (
    LABELS,
    STORE_NAMES,
    Servers,
    server_versions,
    unavailable_reason,
)
from benchmarks.plan import FULL, QUICK, Context, progress
from benchmarks.report import Table, TargetCheck, describe_machine, format_number, targets_table

SECTIONS = ("inprocess", "http", "latency", "history", "recovery")


def add_process_table(context: Context) -> None:
    """Add the start-up time and memory table, built from the runs of sections 2 and 4."""
    table = Table(
        "Process: start-up time and resident memory (RSS)",
        [
            "server",
            "start to ready (s)",
            "RSS after warm-up (MB)",
            "RSS at the end (MB)",
            "growth (MB)",
        ],
    )
    for name, run in context.http_runs.items():
        table.add(
            f"{LABELS[name]}, empty store" if name != "plain" else LABELS[name],
            format_number(run.ready_seconds, 2),
            format_number(run.rss_start_mb, 1),
            format_number(run.rss_end_mb, 1),
            format_number(run.rss_end_mb - run.rss_start_mb, 1),
        )
        if name != "plain":
            growth = run.rss_end_mb - run.rss_start_mb
            context.checks.append(
                TargetCheck(
                    f"RSS growth over {run.load['ok']:,} HTTP tasks, {LABELS[name]}",
                    "< 50 MB",
                    f"{growth:+.1f} MB",
                    growth < 50,
                )
            )
            context.checks.append(
                TargetCheck(
                    f"start to ready, {LABELS[name]}, empty store",
                    "< 1 s",
                    f"{run.ready_seconds:.2f} s",
                    run.ready_seconds < 1,
                )
            )
    for name, history_run in context.history_runs.items():
        if history_run.ready_seconds is None:
            continue
        table.add(
            f"{LABELS[name]}, {context.plan.history_tasks:,} tasks stored",
            format_number(history_run.ready_seconds, 2),
            "-",
            format_number(history_run.rss_mb, 1),
            "-",
        )
        context.checks.append(
            TargetCheck(
                f"start to ready, {LABELS[name]}, {context.plan.history_tasks:,} tasks stored",
                "< 1 s",
                f"{history_run.ready_seconds:.2f} s",
                history_run.ready_seconds < 1,
            )
        )
    table.notes += [
        "Start to ready: from starting `python -m benchmarks.server` until GET /ping "
        "responds, so it includes the interpreter's start and every import.",
        "RSS from /proc/PID/status; 'after warm-up' and 'at the end' bracket the measured "
        "HTTP requests of section 2, each of which added one task, once every task ended. "
        "MemoryStore keeps every task in memory by design.",
    ]
    if table.rows:
        context.tables.append(table)


RUNNERS: dict[str, Callable[[Context], Awaitable[None]]] = {
    "inprocess": inprocess.run_section,
    "http": throughput.run_section,
    "latency": latency.run_section,
    "history": history.run_section,
    "recovery": recovery.run_section,
}


LOAD_SAMPLE_INTERVAL = 5.0


async def run_all(context: Context, sections: list[str]) -> None:
    """Run the chosen sections in order, sampling the machine's load average meanwhile."""
    sampler = asyncio.create_task(_sample_load_average(context.load_averages))
    try:
        for section in SECTIONS:
            if section in sections:
                started = time.perf_counter()
                await RUNNERS[section](context)
                progress(f"section {section} took {time.perf_counter() - started:.0f} s")
    finally:
        sampler.cancel()
    add_process_table(context)


async def _sample_load_average(samples: list[float]) -> None:
    while True:
        with open("/proc/loadavg", encoding="ascii") as loadavg:  # noqa: ASYNC230 - procfs
            samples.append(float(loadavg.read().split()[0]))
        await asyncio.sleep(LOAD_SAMPLE_INTERVAL)


def render(context: Context, command: str, seconds: float) -> str:
    """Return the whole report as Markdown."""
    parts = ["## Results", ""]
    parts += [f"- {line}" for line in describe_machine()]
    parts.append(f"- Servers: {', '.join(server_versions(context.servers))}")
    parts.append(f"- Command: `{command}` ({seconds / 60:.1f} min)")
    if context.load_averages:
        ordered = sorted(context.load_averages)
        parts.append(
            "- 1-minute load average during the run, sampled every "
            f"{LOAD_SAMPLE_INTERVAL:g} s: median {ordered[len(ordered) // 2]:.1f}, "
            f"max {ordered[-1]:.1f}, the benchmark's own processes included. Figures taken "
            "while other programs kept the CPUs busy are not comparable."
        )
    for store, reason in context.skipped.items():
        parts.append(f"- {LABELS[store]}: not measured yet: {reason}")
    parts.append("")
    parts.append(targets_table(context.checks).markdown())
    for table in context.tables:
        parts += ["", table.markdown()]
    return "\n".join(parts) + "\n"


def parse_options(arguments: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark app-taskflow against plain FastAPI BackgroundTasks.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts and short limits (about a minute)"
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--stores",
        default=",".join(STORE_NAMES),
        help=f"comma-separated stores to run (default: all of {','.join(STORE_NAMES)})",
    )
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--redis-url", default=Servers.redis_url, help="Redis database for the Redis store"
    )
    parser.add_argument(
        "--postgres-admin-url",
        default=Servers.postgres_admin_url,
        help="PostgreSQL database to connect to when creating and dropping benchmark ones",
    )
    options = parser.parse_args(arguments)
    for name, chosen, known in (
        ("--sections", options.sections, SECTIONS),
        ("--stores", options.stores, STORE_NAMES),
    ):
        unknown = set(chosen.split(",")) - set(known)
        if unknown:
            parser.error(f"{name}: unknown {', '.join(sorted(unknown))}; use {','.join(known)}")
    return options


def main(arguments: list[str] | None = None) -> None:
    """Run the benchmarks and print the report."""
    options = parse_options(arguments)
    send_library_logs_to_devnull()
    servers = Servers(redis_url=options.redis_url, postgres_admin_url=options.postgres_admin_url)
    stores = [store for store in STORE_NAMES if store in options.stores.split(",")]
    skipped: dict[str, str] = {}
    for store in stores:
        reason = unavailable_reason(store, servers)
        if reason is not None:
            skipped[store] = reason
            progress(f"{store} is not measured: {reason}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="taskflow-bench-") as folder:
        context = Context(
            plan=QUICK if options.quick else FULL,
            stores=stores,
            skipped=skipped,
            servers=servers,
            folder=Path(folder),
        )
        asyncio.run(run_all(context, options.sections.split(",")))
    command = " ".join(
        ["python -m benchmarks", *(sys.argv[1:] if arguments is None else arguments)]
    )
    report = render(context, command, time.perf_counter() - started)
    print(report)
    if options.output is not None:
        options.output.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
