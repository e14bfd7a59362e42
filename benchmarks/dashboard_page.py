"""Time the dashboard with 100,000 tasks in SQLite: API calls, the event stream, the page.

Run from the repository root: ``python -m benchmarks.dashboard_page [HOURS]``. The tasks are
spread over the last HOURS hours (default 24). It starts the browser tests' app under
uvicorn on a free loopback port and drives Debian's Chromium through Playwright.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from app_taskflow.models import TaskRecord, TaskStatus, new_task_id, utcnow
from app_taskflow.stores import SqlStore
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, start_server

TASKS = 100_000
NAMES = ("email", "report", "sync", "resize")


async def seed(database: Path, hours: float) -> None:
    """Store ``TASKS`` finished tasks, 5 % of them FAILED, spread over ``hours``."""
    store = SqlStore(f"sqlite:///{database}")
    await store.open()
    now = utcnow()
    rng = random.Random(1)
    batch: list[TaskRecord] = []
    for number in range(TASKS):
        created = now - timedelta(seconds=rng.uniform(0, hours * 3600))
        failed = rng.random() < 0.05
        batch.append(
            TaskRecord(
                id=new_task_id(),
                name=rng.choice(NAMES),
                status=TaskStatus.FAILED if failed else TaskStatus.SUCCESS,
                args=[f"user{number}@example.com"],
                created_at=created,
                started_at=created,
                finished_at=created + timedelta(seconds=0.5),
                duration=0.5,
                attempts=1,
                error_type="ValueError" if failed else None,
                error_message=f"bad input {number}" if failed else None,
            )
        )
        if len(batch) == 1000:
            await store.create(batch)
            batch = []
    await store.close()


def timed_get(client: httpx.Client, path: str, **params: Any) -> tuple[float, Any]:
    """Return the milliseconds a GET took and its JSON body."""
    started = time.perf_counter()
    response = client.get(path, params=params)
    response.raise_for_status()
    return (time.perf_counter() - started) * 1000, response.json()


def measure_api(client: httpx.Client) -> None:
    calls = [
        ("GET /tasks (first page of 50)", "/tasks", {"limit": 50}),
        ("GET /tasks?status=FAILED", "/tasks", {"status": "FAILED", "limit": 50}),
        ("GET /tasks?search=user99999", "/tasks", {"search": "user99999", "limit": 50}),
        ("GET /tasks/metrics", "/tasks/metrics", {}),
        ("GET /tasks/metrics/throughput", "/tasks/metrics/throughput", {}),
    ]
    for label, path, params in calls:
        times = [timed_get(client, path, **params)[0] for _ in range(3)]
        print(f"| {label} | {statistics.median(times):.1f} |")

    _, page = timed_get(client, "/tasks", limit=50)
    cursor = page["next_cursor"]
    for _ in range(20):
        _, page = timed_get(client, "/tasks", limit=1000, cursor=cursor)
        cursor = page["next_cursor"]
    milliseconds, _ = timed_get(client, "/tasks", limit=50, cursor=cursor)
    print(f"| GET /tasks, the page after 20,050 tasks | {milliseconds:.1f} |")


def measure_stream(client: httpx.Client) -> None:
    started = time.perf_counter()
    with client.stream("GET", "/tasks/dashboard/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: ready"):
                break
    print(
        f"| event stream: connect to ready event | {(time.perf_counter() - started) * 1000:.1f} |"
    )

    with client.stream("GET", "/tasks/dashboard/events") as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: ready"):
                break
        started = time.perf_counter()
        client.post(
            "/demo/email",
            params={"address": "live@example.com"},
            headers={"X-Taskflow-Request": "1"},
        )
        for line in lines:
            if line.startswith("event: task"):
                milliseconds = (time.perf_counter() - started) * 1000
                print(f"| event stream: task added to its first event | {milliseconds:.1f} |")
                break


def measure_page(dashboard_url: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        started = time.perf_counter()
        page.goto(dashboard_url)
        expect(page.locator("#task-rows tr")).to_have_count(50, timeout=60_000)
        rows = (time.perf_counter() - started) * 1000
        expect(page.locator("#throughput svg g.bar")).to_have_count(60, timeout=60_000)
        chart = (time.perf_counter() - started) * 1000
        print(f"| browser: page opened to 50 rows shown | {rows:.1f} |")
        print(f"| browser: page opened to chart drawn | {chart:.1f} |")
        browser.close()


def main() -> None:
    hours = float(sys.argv[1]) if len(sys.argv) > 1 else 24.0
    with tempfile.TemporaryDirectory(prefix="taskflow-dashboard-") as folder:
        database = Path(folder) / "tasks.db"
        started = time.monotonic()
        asyncio.run(seed(database, hours))
        print(f"Seeded {TASKS:,} tasks over {hours:g} h in {time.monotonic() - started:.1f} s.")
        print()
        print("| measurement | ms |")
        print("| --- | --- |")
        server = start_server(Path(folder), {"kind": "sqlite", "path": str(database)})
        try:
            with httpx.Client(base_url=server.url, trust_env=False, timeout=120) as client:
                measure_api(client)
                measure_stream(client)
            measure_page(server.dashboard_url)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
