"""OpenTelemetry: the trace parent stored at add_task and the linked span of each attempt."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from integration_fixtures import asgi_client, wait_for_status
from logging_support import build_taskflow, started
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app_taskflow import TaskflowTasks, TaskStatus
from app_taskflow.models import TERMINAL_STATUSES, TaskRecord, new_task_id, utcnow
from app_taskflow.otel import AttemptTracer, current_trace_parent
from app_taskflow.stores import MemoryStore
from app_taskflow.taskflow import Taskflow

Tasks = Annotated[TaskflowTasks, Depends()]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A tracer provider of this test only; the global provider stays unset."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield tracer_provider
    tracer_provider.shutdown()


def attempt_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name.startswith("taskflow.")]


def traceparent_of(span: Any) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


async def run_tagged(taskflow: Taskflow, func: Any, **options: Any) -> TaskRecord:
    task_id = await taskflow.add_task(func, **options)
    return await wait_for_status(taskflow.store, task_id, *TERMINAL_STATUSES)


# current_trace_parent


def test_current_trace_parent_outside_span() -> None:
    assert current_trace_parent() is None


def test_current_trace_parent_in_span(provider: TracerProvider) -> None:
    with provider.get_tracer("test").start_as_current_span("request") as span:
        trace_parent = current_trace_parent()

    assert trace_parent == traceparent_of(span)


def test_attempt_tracer_without_provider() -> None:
    record = TaskRecord(
        id=new_task_id(), name="job", status=TaskStatus.RUNNING, created_at=utcnow()
    )

    with AttemptTracer().span(record) as span:
        pass

    assert span is None


# attempt spans


async def test_attempt_span_attributes(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)

    @taskflow.task(name="emails.send")
    def send() -> None:
        pass

    async with started(taskflow):
        record = await run_tagged(taskflow, send, tags={"user_id": "42", "plan": "pro"})

    [span] = attempt_spans(exporter)
    assert span.name == "taskflow.run emails.send"
    assert span.kind is SpanKind.CONSUMER
    assert span.parent is None
    assert list(span.links) == []
    assert span.status.status_code is StatusCode.UNSET
    assert dict(span.attributes or {}) == {
        "taskflow.task.id": record.id,
        "taskflow.task.name": "emails.send",
        "taskflow.task.attempt": 1,
        "taskflow.task.max_attempts": 1,
        "taskflow.tag.user_id": "42",
        "taskflow.tag.plan": "pro",
    }


async def test_attempt_span_links_adding_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)

    @taskflow.task(name="job")
    async def job() -> None:
        pass

    async with started(taskflow):
        with provider.get_tracer("test").start_as_current_span("caller") as caller:
            task_id = await taskflow.add_task(job)
        record = await wait_for_status(taskflow.store, task_id, TaskStatus.SUCCESS)

    [span] = attempt_spans(exporter)
    [link] = span.links
    assert record.trace_parent == traceparent_of(caller)
    assert link.context.trace_id == caller.get_span_context().trace_id
    assert link.context.span_id == caller.get_span_context().span_id
    assert span.parent is None
    assert span.context.trace_id != caller.get_span_context().trace_id


async def test_attempt_span_links_request(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)
    app = FastAPI(lifespan=taskflow.lifespan, telemetry={"tracer_provider": provider})
    taskflow.install(app)

    @taskflow.task(name="welcome")
    def welcome(email: str) -> None:
        pass

    @app.post("/signup")
    def signup(email: str, tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(welcome, email=email, tags={"user_id": "7"})}

    async with taskflow.lifespan(app), asgi_client(app) as client:
        response = await client.post("/signup", params={"email": "ada@example.com"})
        record = await wait_for_status(
            taskflow.store, response.json()["task_id"], TaskStatus.SUCCESS
        )

    [span] = attempt_spans(exporter)
    [link] = span.links
    [server] = [item for item in exporter.get_finished_spans() if item.kind is SpanKind.SERVER]
    assert record.trace_parent is not None
    assert link.context.trace_id == server.context.trace_id
    assert span.context.trace_id != server.context.trace_id
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["taskflow.tag.user_id"] == "7"


async def test_attempt_span_per_retry(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)
    calls: list[int] = []

    @taskflow.task(name="flaky", retries=1)
    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("mail server unavailable")

    async with started(taskflow):
        with provider.get_tracer("test").start_as_current_span("caller"):
            record = await run_tagged(taskflow, flaky)

    first, second = attempt_spans(exporter)
    assert record.status is TaskStatus.SUCCESS
    assert first.attributes is not None
    assert first.attributes["taskflow.task.attempt"] == 1
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ConnectionError"
    assert [event.name for event in first.events] == ["exception"]
    assert second.attributes is not None
    assert second.attributes["taskflow.task.attempt"] == 2
    assert second.status.status_code is StatusCode.UNSET
    assert first.links[0].context == second.links[0].context


async def test_attempt_span_cancelled(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)
    running = asyncio.Event()

    @taskflow.task(name="slow")
    async def slow() -> None:
        running.set()
        await asyncio.sleep(30)

    async with started(taskflow):
        task_id = await taskflow.add_task(slow)
        await asyncio.wait_for(running.wait(), 5)
        await taskflow.cancel(task_id)
        await wait_for_status(taskflow.store, task_id, TaskStatus.CANCELLED)

    [span] = attempt_spans(exporter)
    assert span.attributes is not None
    assert span.attributes["taskflow.task.cancelled"] is True
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_task_span_is_child(
    provider: TracerProvider, exporter: InMemorySpanExporter, kind: str
) -> None:
    taskflow = build_taskflow(tracer_provider=provider)
    tracer = provider.get_tracer("task code")

    def job() -> None:
        with tracer.start_as_current_span("inner"):
            pass

    async def async_job() -> None:
        with tracer.start_as_current_span("inner"):
            pass

    task = taskflow.task(name="job")(job if kind == "sync" else async_job)
    async with started(taskflow):
        await run_tagged(taskflow, task)

    [attempt] = attempt_spans(exporter)
    [inner] = [span for span in exporter.get_finished_spans() if span.name == "inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == attempt.context.span_id


async def test_trace_parent_from_store(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # A task stored by another instance (or before a restart) runs with its stored link.
    trace_parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    store = MemoryStore()
    record = TaskRecord(
        id=new_task_id(),
        name="job",
        status=TaskStatus.PENDING,
        created_at=utcnow(),
        trace_parent=trace_parent,
    )
    await store.create([record])
    taskflow = Taskflow(store_factory=lambda: store, tracer_provider=provider)

    @taskflow.task(name="job")
    def job() -> None:
        pass

    async with started(taskflow):
        await wait_for_status(store, record.id, TaskStatus.SUCCESS)

    [span] = attempt_spans(exporter)
    [link] = span.links
    assert f"{link.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert f"{link.context.span_id:016x}" == "b7ad6b7169203331"
    assert link.context.is_remote


async def test_invalid_trace_parent_no_link(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    store = MemoryStore()
    record = TaskRecord(
        id=new_task_id(),
        name="job",
        status=TaskStatus.PENDING,
        created_at=utcnow(),
        trace_parent="not-a-traceparent",
    )
    await store.create([record])
    taskflow = Taskflow(store_factory=lambda: store, tracer_provider=provider)

    @taskflow.task(name="job")
    def job() -> None:
        pass

    async with started(taskflow):
        finished = await wait_for_status(store, record.id, TaskStatus.SUCCESS)

    [span] = attempt_spans(exporter)
    assert finished.status is TaskStatus.SUCCESS
    assert list(span.links) == []


async def test_global_provider_unset_no_span() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="job")
    def job() -> None:
        pass

    async with started(taskflow):
        record = await run_tagged(taskflow, job)

    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert record.status is TaskStatus.SUCCESS
    assert record.trace_parent is None


_WITHOUT_OPENTELEMETRY = textwrap.dedent(
    """
    import asyncio, builtins, sys

    import fastapi  # imports OpenTelemetry itself in FastAPI 0.165

    real_import = builtins.__import__

    def blocked_import(name, *args, **kwargs):
        if name.split(".")[0] == "opentelemetry":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    builtins.__import__ = blocked_import
    try:
        import app_taskflow.otel
        from app_taskflow.stores import MemoryStore
        from app_taskflow.taskflow import Taskflow
    finally:
        builtins.__import__ = real_import

    async def main():
        taskflow = Taskflow(store_factory=MemoryStore)

        @taskflow.task(name="job")
        def job():
            pass

        async with taskflow.lifespan():
            task_id = await taskflow.add_task(job, tags={"a": "1"})
            for _ in range(500):
                record = await taskflow.store.get(task_id)
                if record.status.value == "SUCCESS":
                    break
                await asyncio.sleep(0.01)
        print(app_taskflow.otel.trace, record.status.value, record.trace_parent)

    asyncio.run(main())
    """
)


def test_runs_without_opentelemetry() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENTELEMETRY],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "SUCCESS", "None"]
