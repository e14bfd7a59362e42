"""Tests of app_taskflow.prometheus: metric values after a known sequence of tasks, the route."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI
from integration_fixtures import asgi_client, wait_for_status
from logging_support import build_taskflow, run_task, started
from prometheus_client.parser import text_string_to_metric_families

from app_taskflow import TaskflowContainer
from app_taskflow.config import parse_settings
from app_taskflow.errors import MissingExtraError
from app_taskflow.models import TaskRecord, TaskStatus, new_task_id, utcnow
from app_taskflow.prometheus import PrometheusExporter
from app_taskflow.stores import MemoryStore
from app_taskflow.taskflow import Taskflow

GATE_TIMEOUT = 5.0
ROUTE = "/tasks/metrics/prometheus"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Return every sample of an exposition text, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    """Return the sample ``metric`` with exactly ``labels``, or None when it is absent."""
    return samples.get((metric, frozenset(labels.items())))


@dataclass
class Scraped:
    """What one scrape returned, and the taskflow it came from."""

    response: httpx.Response
    samples: Samples
    instance: str


async def scrape(client: httpx.AsyncClient, taskflow: Taskflow) -> Scraped:
    response = await client.get(ROUTE)
    return Scraped(response, parse(response.text), taskflow.instance_id)


@pytest.fixture
async def known_sequence() -> AsyncIterator[Scraped]:
    """Run a known sequence of tasks, then scrape the metrics while one task still runs.

    The sequence:

    - ``emails.send`` succeeds twice.
    - ``reports.build`` fails after 2 retries (3 attempts).
    - ``images.resize`` fails once and succeeds on its retry.
    - ``index.rebuild`` is cancelled before it runs, and a second one runs at the scrape.
    - One task of ``other.app``, which this instance does not run, waits as PENDING.
    """
    taskflow = build_taskflow(prometheus=True)
    app = FastAPI()
    taskflow.install(app, dashboard=False)
    gate = asyncio.Event()
    resize_calls: list[int] = []

    @taskflow.task(name="emails.send")
    def send() -> None:
        pass

    @taskflow.task(name="reports.build", retries=2)
    def build() -> None:
        raise ValueError("disk full")

    @taskflow.task(name="images.resize", retries=1)
    async def resize() -> None:
        resize_calls.append(1)
        if len(resize_calls) == 1:
            raise TimeoutError("slow disk")

    @taskflow.task(name="index.rebuild")
    async def rebuild() -> None:
        await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)

    async with started(taskflow), asgi_client(app) as client:
        for _ in range(2):
            await run_task(taskflow, send)
        await run_task(taskflow, build)
        await run_task(taskflow, resize)
        foreign = TaskRecord(
            id=new_task_id(),
            name="other.app",
            status=TaskStatus.PENDING,
            created_at=utcnow(),
        )
        await taskflow.store.create([foreign])
        cancelled = TaskRecord(
            id=new_task_id(),
            name="index.rebuild",
            status=TaskStatus.PENDING,
            created_at=utcnow(),
            owner="an-instance-that-never-claims",
        )
        await taskflow.store.create([cancelled])
        await taskflow.cancel(cancelled.id)
        held_id = await taskflow.add_task(rebuild)
        await wait_for_status(taskflow.store, held_id, TaskStatus.RUNNING)

        yield await scrape(client, taskflow)
        gate.set()


def test_prometheus_response(known_sequence: Scraped) -> None:
    assert known_sequence.response.status_code == 200
    assert known_sequence.response.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    ("name", "status", "expected"),
    [
        ("emails.send", "SUCCESS", 2),
        ("reports.build", "FAILED", 1),
        ("images.resize", "SUCCESS", 1),
        ("index.rebuild", "CANCELLED", 1),
        ("images.resize", "FAILED", None),
    ],
    ids=["successes", "failure", "success-after-retry", "cancelled", "no-failure"],
)
def test_prometheus_tasks_total(
    known_sequence: Scraped, name: str, status: str, expected: float | None
) -> None:
    samples, instance = known_sequence.samples, known_sequence.instance

    found = value(samples, "app_taskflow_tasks_total", instance=instance, name=name, status=status)

    assert found == expected


@pytest.mark.parametrize(
    ("name", "attempts", "retries"),
    [("emails.send", 2, None), ("reports.build", 3, 2), ("images.resize", 2, 1)],
)
def test_prometheus_attempts_and_retries(
    known_sequence: Scraped, name: str, attempts: int, retries: int | None
) -> None:
    samples, instance = known_sequence.samples, known_sequence.instance

    assert value(samples, "app_taskflow_attempts_total", instance=instance, name=name) == (attempts)
    assert value(samples, "app_taskflow_retries_total", instance=instance, name=name) == retries


def test_prometheus_running_attempt_counted(known_sequence: Scraped) -> None:
    samples, instance = known_sequence.samples, known_sequence.instance

    found = value(samples, "app_taskflow_attempts_total", instance=instance, name="index.rebuild")

    assert found == 1


@pytest.mark.parametrize(("name", "count"), [("emails.send", 2), ("reports.build", 3)])
def test_prometheus_duration_histogram(known_sequence: Scraped, name: str, count: int) -> None:
    samples, instance = known_sequence.samples, known_sequence.instance
    labels = {"instance": instance, "name": name}

    total = value(samples, "app_taskflow_attempt_duration_seconds_count", **labels)
    infinite = value(samples, "app_taskflow_attempt_duration_seconds_bucket", **labels, le="+Inf")
    seconds = value(samples, "app_taskflow_attempt_duration_seconds_sum", **labels)

    assert total == count
    assert infinite == count
    assert seconds is not None
    assert seconds >= 0


def test_prometheus_gauges(known_sequence: Scraped) -> None:
    samples, instance = known_sequence.samples, known_sequence.instance

    running = value(samples, "app_taskflow_tasks_running", instance=instance)
    pending = value(samples, "app_taskflow_tasks_pending", instance=instance, name="other.app")
    none_pending = value(
        samples, "app_taskflow_tasks_pending", instance=instance, name="emails.send"
    )

    assert running == 1
    assert pending == 1
    assert none_pending == 0


def test_prometheus_instance_label_everywhere(known_sequence: Scraped) -> None:
    instances = {
        dict(labels).get("instance")
        for name, labels in known_sequence.samples
        if not name.endswith("_created")
    }

    assert instances == {known_sequence.instance}


async def test_prometheus_registry_per_taskflow() -> None:
    first, second = build_taskflow(prometheus=True), build_taskflow(prometheus=True)
    apps = [FastAPI(), FastAPI()]
    for taskflow, app in zip((first, second), apps, strict=True):
        taskflow.install(app, dashboard=False)

        @taskflow.task(name="emails.send")
        def send() -> None:
            pass

    async with started(first), started(second), asgi_client(apps[1]) as client:
        await run_task(first, first.registry.get("emails.send"))  # type: ignore[arg-type]
        scraped = await scrape(client, second)

    attempts = [name for name, _ in scraped.samples if name == "app_taskflow_attempts_total"]
    assert first.prometheus is not None
    assert second.prometheus is not None
    assert first.prometheus.registry is not second.prometheus.registry
    assert attempts == []


async def test_prometheus_route_absent_when_off() -> None:
    taskflow = build_taskflow()
    app = FastAPI()
    taskflow.install(app, dashboard=False)

    async with started(taskflow), asgi_client(app) as client:
        response = await client.get(ROUTE)

    assert taskflow.prometheus is None
    assert response.status_code in (404, 405)


def test_prometheus_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(MissingExtraError, match=r"pip install 'app-taskflow\[prometheus\]'"):
        PrometheusExporter()


def test_prometheus_missing_package_from_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    container = container_with(metrics={"prometheus": True})

    with pytest.raises(MissingExtraError, match=r"metrics\.prometheus is enabled"):
        container.taskflow()


def test_prometheus_config_default_off() -> None:
    assert container_with().taskflow().prometheus is None


async def test_prometheus_route_requires_auth() -> None:
    container = container_with(
        metrics={"prometheus": True}, auth={"kind": "bearer", "token": "scrape-token"}
    )
    taskflow = container.taskflow()
    app = FastAPI()
    taskflow.install(app, dashboard=False)

    async with started(taskflow), asgi_client(app) as client:
        anonymous = await client.get(ROUTE)
        allowed = await client.get(ROUTE, headers={"Authorization": "Bearer scrape-token"})

    assert anonymous.status_code == 401
    assert allowed.status_code == 200


def container_with(**sections: Any) -> TaskflowContainer:
    settings = parse_settings({"store": {"kind": "memory"}, **sections})
    container = TaskflowContainer.from_settings(settings)
    container.store.override(providers.Singleton(MemoryStore))
    return container
