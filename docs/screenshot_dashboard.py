"""Take docs/dashboard.png: the dashboard of an app with an hour of realistic tasks.

Run from a clone, after ``make test`` installed the dev extra and ``make chromium``:

    .venv/bin/python docs/screenshot_dashboard.py

It writes an hour of finished tasks into a SQLite file in a temporary folder and starts
the browser tests' app (tests/browser/app.py) on it. It then adds live tasks through the
app's routes (one running, some pending, a failure with logs and a traceback) and saves
the screenshot. CI does not run it.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from app_taskflow.models import (  # noqa: E402
    AttemptOutcome,
    LogEntry,
    TaskRecord,
    TaskStatus,
    new_task_id,
    utcnow,
)
from app_taskflow.stores import SqlStore  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, start_server  # noqa: E402

OUTPUT = ROOT / "docs" / "dashboard.png"
SEED_INSTANCE = "web-1-7f3a9c"

TRACEBACK_HEAD = """Traceback (most recent call last):
  File "/srv/app/tasks/jobs.py", line 48, in run
    result = client.send(payload, timeout=10)
  File "/srv/app/clients/base.py", line 112, in send
    response.raise_for_status()
"""

ERRORS = {
    "send_welcome_email": ("smtplib.SMTPServerDisconnected", "Connection unexpectedly closed"),
    "sync_inventory": ("TimeoutError", "the shop API did not respond within 10 s"),
    "resize_image": ("PIL.UnidentifiedImageError", "cannot identify image file"),
    "charge_invoice": ("httpx.HTTPStatusError", "Server error '503 Service Unavailable'"),
}
"""The error each seeded task name fails with."""


async def seed(database: Path) -> None:
    """Store about 400 tasks finished during the last hour, at a rate that rises and falls."""
    store = SqlStore(f"sqlite:///{database}")
    await store.open()
    now = utcnow()
    rng = random.Random(7)
    names = {
        "send_welcome_email": (0.25, 0.02),
        "sync_inventory": (1.8, 0.05),
        "resize_image": (0.6, 0.01),
        "charge_invoice": (1.1, 0.12),
    }
    try:
        for minute in range(60, 0, -1):
            rate = 4 + 3 * math.sin(minute / 9) + rng.random() * 3
            for _ in range(round(rate)):
                name = rng.choice(list(names))
                mean, failure_rate = names[name]
                created = now - timedelta(minutes=minute, seconds=rng.uniform(0, 59))
                duration = rng.lognormvariate(math.log(mean), 0.5)
                failed = rng.random() < failure_rate
                await store_finished(store, name, created, duration, failed, rng)
    finally:
        await store.close()


async def store_finished(
    store: SqlStore,
    name: str,
    created: datetime,
    duration: float,
    failed: bool,
    rng: random.Random,
) -> None:
    """Store one task as created, claimed and finished at the given times."""
    started = created + timedelta(seconds=rng.uniform(0.005, 0.05))
    finished = started + timedelta(seconds=duration)
    examples: dict[str, list[Any]] = {
        "send_welcome_email": [f"user{rng.randint(100, 999)}@example.com"],
        "sync_inventory": [rng.randint(1, 40)],
        "resize_image": [f"uploads/{rng.randint(1000, 9999)}.jpg"],
        "charge_invoice": [f"INV-{rng.randint(20000, 29999)}"],
    }
    arguments = examples[name]
    record = TaskRecord(
        id=new_task_id(),
        name=name,
        status=TaskStatus.PENDING,
        args=arguments,
        created_at=created,
    )
    await store.create([record])
    await store.claim(record.id, SEED_INSTANCE, started)
    await store.append_logs(
        record.id,
        [LogEntry(timestamp=started, message=f"{name} started for {arguments[0]}", attempt=1)],
    )
    error_type, error_message = ERRORS[name]
    outcome = AttemptOutcome(
        status=TaskStatus.FAILED if failed else TaskStatus.SUCCESS,
        finished_at=finished,
        duration=duration,
        error_type=error_type if failed else None,
        error_message=error_message if failed else None,
        traceback=f"{TRACEBACK_HEAD}{error_type}: {error_message}\n" if failed else None,
    )
    await store.finish(record.id, SEED_INSTANCE, 1, outcome)


def main() -> int:
    """Seed, serve, drive the page and save the screenshot."""
    with tempfile.TemporaryDirectory() as folder:
        database = Path(folder) / "tasks.db"
        asyncio.run(seed(database))
        server = start_server(Path(folder), {"kind": "sqlite", "path": str(database)})
        try:
            for number in range(4):
                server.post("/demo/email", address=f"new-user{number}@example.com")
            failed = server.post("/demo/report", month="2025-03", fail=True)["task_id"]
            server.post("/demo/report", month="2025-02")
            server.wait_for_status(failed, "FAILED")
            server.post("/demo/hold")
            time.sleep(0.3)
            for number in range(3):
                server.post("/demo/resize", file=f"uploads/banner-{number}.png")

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1440, "height": 1400})
                page.goto(f"{server.dashboard_url}#task={failed}")
                expect(page.locator("#connection")).to_have_text("Live")
                expect(page.locator("#detail pre.traceback")).to_be_visible()
                expect(page.locator("#throughput svg g.bar")).to_have_count(60)
                page.wait_for_timeout(500)
                page.screenshot(path=str(OUTPUT))
                browser.close()
        finally:
            server.post("/demo/release")
            server.stop()
    print(f"Wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
