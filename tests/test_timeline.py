"""Tests of app_taskflow.timeline: the lifecycle lines of tasks and the transition listeners."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from integration_fixtures import wait_for_status
from logging_support import (
    build_taskflow,
    captured_records,
    mask_seconds,
    run_task,
    started,
    timeline_of,
)

from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus, new_task_id, utcnow
from app_taskflow.timeline import ARGUMENTS_PREVIEW_CHARS, TaskTimeline, TaskTransition

GATE_TIMEOUT = 5.0


def make_record(**overrides: object) -> TaskRecord:
    fields: dict[str, object] = {
        "id": new_task_id(),
        "name": "emails.send",
        "status": TaskStatus.RUNNING,
        "attempts": 2,
        "max_attempts": 4,
        "created_at": utcnow(),
    }
    fields.update(overrides)
    return TaskRecord.model_validate(fields)


def make_outcome(status: TaskStatus, **overrides: object) -> AttemptOutcome:
    fields: dict[str, object] = {"status": status, "finished_at": utcnow(), "duration": 0.0123}
    fields.update(overrides)
    return AttemptOutcome.model_validate(fields)


async def test_timeline_success_lines() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="emails.send")
    def send(address: str) -> None:
        pass

    with captured_records() as records:
        async with started(taskflow):
            record = await run_task(taskflow, send, "a@example.com")

    assert timeline_of(records, record.id) == [
        "INFO emails.send [<id>] added",
        "INFO emails.send [<id>] started attempt 1/1",
        "INFO emails.send [<id>] succeeded in <t> s",
    ]


async def test_timeline_retry_lines() -> None:
    taskflow = build_taskflow()
    calls: list[int] = []

    @taskflow.task(name="reports.build", retries=3)
    async def build() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("not yet")

    with captured_records() as records:
        async with started(taskflow):
            record = await run_task(taskflow, build)

    assert timeline_of(records, record.id) == [
        "INFO reports.build [<id>] added",
        "INFO reports.build [<id>] started attempt 1/4",
        "WARNING reports.build [<id>] failed attempt 1/4 with ValueError, retrying in <t> s",
        "INFO reports.build [<id>] started attempt 2/4",
        "WARNING reports.build [<id>] failed attempt 2/4 with ValueError, retrying in <t> s",
        "INFO reports.build [<id>] started attempt 3/4",
        "INFO reports.build [<id>] succeeded in <t> s",
    ]


async def test_timeline_final_failure_lines() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="reports.build", retries=1)
    def build() -> None:
        raise ValueError("disk full")

    with captured_records() as records:
        async with started(taskflow):
            record = await run_task(taskflow, build)

    [failure] = [line for line in records if line["extra"].get("event") == "failed"]
    assert timeline_of(records, record.id)[-1] == (
        "ERROR reports.build [<id>] failed attempt 2/2 with ValueError: disk full"
    )
    assert "Traceback (most recent call last)" in failure["message"]
    assert 'raise ValueError("disk full")' in failure["message"]
    assert failure["extra"]["error_type"] == "ValueError"


async def test_timeline_not_retried_failure() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="reports.build", retries=2, retry_on=(TimeoutError,))
    def build() -> None:
        raise KeyError("region")

    with captured_records() as records:
        async with started(taskflow):
            record = await run_task(taskflow, build)

    assert timeline_of(records, record.id)[-1] == (
        "ERROR reports.build [<id>] failed attempt 1/3 with KeyError: 'region' "
        "(this exception type is not retried)"
    )


async def test_timeline_cancel_lines() -> None:
    taskflow = build_taskflow()
    began = asyncio.Event()

    @taskflow.task(name="index.rebuild")
    async def rebuild() -> None:
        began.set()
        await asyncio.sleep(GATE_TIMEOUT)

    with captured_records() as records:
        async with started(taskflow):
            task_id = await taskflow.add_task(rebuild)
            await asyncio.wait_for(began.wait(), GATE_TIMEOUT)
            await taskflow.cancel(task_id)
            await wait_for_status(taskflow.store, task_id, TaskStatus.CANCELLED)

    assert timeline_of(records, task_id) == [
        "INFO index.rebuild [<id>] added",
        "INFO index.rebuild [<id>] started attempt 1/1",
        "INFO index.rebuild [<id>] asked to stop",
        "INFO index.rebuild [<id>] cancelled during attempt 1/1 after <t> s",
    ]


async def test_timeline_cancel_before_start() -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record(status=TaskStatus.CANCELLED, attempts=0)

    with captured_records() as records:
        timeline.cancelled(record)

    assert timeline_of(records, record.id) == ["INFO emails.send [<id>] cancelled before it ran"]


async def test_timeline_cancel_waiting_retry() -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record(status=TaskStatus.CANCELLED, attempts=2)

    with captured_records() as records:
        timeline.cancelled(record)

    assert timeline_of(records, record.id) == ["INFO emails.send [<id>] cancelled before attempt 3"]


async def test_timeline_shutdown_interrupts() -> None:
    taskflow = build_taskflow()
    began = asyncio.Event()

    @taskflow.task(name="index.rebuild")
    async def rebuild() -> None:
        began.set()
        await asyncio.sleep(GATE_TIMEOUT)

    with captured_records() as records:
        async with started(taskflow):
            task_id = await taskflow.add_task(rebuild)
            await asyncio.wait_for(began.wait(), GATE_TIMEOUT)

    assert timeline_of(records, task_id)[-1] == (
        "WARNING index.rebuild [<id>] left unfinished at shutdown: INTERRUPTED"
    )


@pytest.mark.parametrize(
    ("delay", "shown"),
    [(2.0, "2.0"), (0.9996, "1.0"), (61.26, "61.3"), (0.25, "0.250"), (0.0, "0.000")],
)
def test_timeline_retry_delay_format(delay: float, shown: str) -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record()
    outcome = make_outcome(
        TaskStatus.PENDING,
        error_type="TimeoutError",
        scheduled_at=utcnow() + timedelta(seconds=delay),
    )

    with captured_records() as records:
        timeline.retrying(record, outcome, delay)

    [line] = records
    assert line["message"] == (
        f"emails.send [{record.id}] failed attempt 2/4 with TimeoutError, retrying in {shown} s"
    )
    assert line["extra"]["delay"] == round(delay, 3)
    assert line["extra"]["error_type"] == "TimeoutError"


def test_timeline_bound_fields() -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record()

    with captured_records() as records:
        timeline.succeeded(record, make_outcome(TaskStatus.SUCCESS))

    [line] = records
    assert line["extra"]["task_id"] == record.id
    assert line["extra"]["task_name"] == "emails.send"
    assert line["extra"]["attempt"] == 2
    assert line["extra"]["instance_id"] == "instance-1"
    assert line["extra"]["event"] == "succeeded"
    assert line["extra"]["duration"] == 0.0123
    assert mask_seconds(line["message"]) == f"emails.send [{record.id}] succeeded in <t> s"


def test_timeline_arguments_only_at_debug() -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record(args=["secret@example.com"], kwargs={"body": "x" * 1000})

    with captured_records() as records:
        timeline.added([record])

    above_debug = [line for line in records if line["level"].no > 10]
    [debug] = [line for line in records if line["level"].name == "DEBUG"]
    assert all("secret@example.com" not in line["message"] for line in above_debug)
    assert "secret@example.com" in debug["message"]
    assert "truncated" in debug["message"]
    assert len(debug["message"]) < ARGUMENTS_PREVIEW_CHARS + 120


def test_timeline_recovery_without_name() -> None:
    timeline = TaskTimeline("instance-1")

    with captured_records() as records:
        timeline.recovered(["task-1"], ["task-2"], released=0)

    assert timeline_of(records, "task-1") == [
        "WARNING [<id>] interrupted: it was running on an instance whose lease expired"
    ]
    assert timeline_of(records, "task-2") == [
        "WARNING [<id>] queued again: it was running on an instance whose lease expired"
    ]


def test_timeline_listeners_receive_transitions() -> None:
    timeline = TaskTimeline("instance-1")
    received: list[TaskTransition] = []
    timeline.listeners.append(received.append)
    record = make_record()

    timeline.started(record)
    timeline.failed(record, make_outcome(TaskStatus.FAILED, error_type="ValueError"))

    assert [transition.event for transition in received] == ["started", "failed"]
    assert received[1].duration == 0.0123
    assert received[1].error_type == "ValueError"
    assert received[1].instance_id == "instance-1"


def test_timeline_failing_listener_logged_once() -> None:
    timeline = TaskTimeline("instance-1")
    received: list[TaskTransition] = []

    def broken(transition: TaskTransition) -> None:
        raise RuntimeError("listener bug")

    timeline.listeners.extend([broken, received.append])
    record = make_record()

    with captured_records() as records:
        timeline.started(record)
        timeline.started(record)

    errors = [line for line in records if line["level"].name == "ERROR"]
    assert len(received) == 2
    assert len(errors) == 1
    assert "listener" in errors[0]["message"]


@pytest.mark.parametrize("level_name", ["WARNING", "ERROR"])
def test_timeline_levels(level_name: str) -> None:
    timeline = TaskTimeline("instance-1")
    record = make_record()

    with captured_records() as records:
        if level_name == "WARNING":
            timeline.retrying(record, make_outcome(TaskStatus.PENDING, error_type="E"), 1.0)
        else:
            timeline.failed(record, make_outcome(TaskStatus.FAILED, error_type="E"))

    assert [line["level"].name for line in records] == [level_name]
