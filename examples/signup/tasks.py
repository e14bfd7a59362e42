"""The container, the taskflow and the tasks of the signup example."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import httpx

from app_taskflow import TaskflowContainer, task_log

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"
"""The repository's configuration folder, found from this file so any working directory works."""

# Reads containers/<APP_TASKFLOW_ENV>.yaml, or development.yaml (SQLite under var/) when the
# variable is unset. A relative SQLite path is relative to the working directory.
container = TaskflowContainer.from_environment(folder=CONTAINERS)
taskflow = container.taskflow()

chance: Callable[[], float] = random.random
"""Source of the random numbers that make ``build_report`` fail, replaced in tests."""


class ReportSourceError(Exception):
    """Raised by ``build_report`` when its (simulated) data source does not respond."""


@taskflow.task(retries=3, delay=1.0, backoff=2.0)
def send_email(address: str) -> None:
    """Send the welcome email, which this example only writes to the task's log."""
    task_log(f"Sending to {address}")


@taskflow.task(retries=4, delay=0.5, backoff=2.0, retry_on=(httpx.HTTPError,), timeout=10.0)
async def call_webhook(url: str, event: dict[str, str]) -> None:
    """POST ``event`` as JSON to ``url``, retrying on a network error or an error status."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        response = await client.post(url, json=event)
    response.raise_for_status()
    task_log(f"Webhook {url} returned {response.status_code}", status_code=response.status_code)


@taskflow.task(retries=3, delay=0.5, backoff=2.0, retry_on=(ReportSourceError,))
def build_report(report_id: str, failure_rate: float = 0.5) -> None:
    """Build a report whose data source fails at random, ``failure_rate`` of the time."""
    task_log(f"Reading the data of report {report_id}")
    if chance() < failure_rate:
        raise ReportSourceError(f"The data source of report {report_id} did not respond.")
    task_log(f"Report {report_id} is ready")
