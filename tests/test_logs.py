"""Tests of app_taskflow.logs: task_log() inside and outside a task."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
from loguru import logger

from app_taskflow.context import TaskContext, set_current_task
from app_taskflow.logs import LOG_LEVELS, task_log
from app_taskflow.models import utcnow


@pytest.fixture
def loguru_records() -> Iterator[list[Any]]:
    """Yield the loguru records written during the test, through a sink removed after it."""
    records: list[Any] = []
    sink_id = logger.add(lambda message: records.append(message.record), level="TRACE")
    yield records
    logger.remove(sink_id)


@pytest.fixture
def running_task(make_context: Callable[..., TaskContext]) -> Iterator[TaskContext]:
    """Yield the context of attempt 2 of 3, set as the current task during the test."""
    context = make_context(task_name="emails.send", attempt=2, max_attempts=3)
    set_current_task(context)
    yield context
    set_current_task(None)


def test_task_log_outside_task_warns(loguru_records: list[Any]) -> None:
    task_log("Sending to a@example.com")

    [record] = loguru_records
    assert record["level"].name == "WARNING"
    assert "outside a task" in record["message"]
    assert "Sending to a@example.com" in record["message"]
    assert record["function"] == "test_task_log_outside_task_warns"


def test_task_log_invalid_level() -> None:
    expected = "use one of trace, debug, info, success, warning, error, critical"
    with pytest.raises(ValueError, match=f"Invalid task_log level 'loud': {expected}"):
        task_log("Sending", level="loud")


def test_task_log_invalid_level_in_task(running_task: TaskContext) -> None:
    with pytest.raises(ValueError, match="Invalid task_log level 'verbose'"):
        task_log("Sending", level="verbose")

    assert running_task.take_logs() == []


def test_task_log_entry_fields(running_task: TaskContext) -> None:
    before = utcnow()

    task_log("Sending to a@example.com", level="warning", recipients=2)

    after = utcnow()
    [entry] = running_task.take_logs()
    assert entry.message == "Sending to a@example.com"
    assert entry.level == "WARNING"
    assert entry.attempt == 2
    assert entry.extra == {"recipients": 2}
    assert entry.timestamp.tzinfo == UTC
    assert before <= entry.timestamp <= after


def test_task_log_default_level(running_task: TaskContext) -> None:
    task_log("Sending")

    [entry] = running_task.take_logs()
    assert entry.level == "INFO"
    assert entry.extra == {}


@pytest.mark.parametrize("level", [name.lower() for name in LOG_LEVELS])
def test_task_log_levels(running_task: TaskContext, level: str) -> None:
    task_log("Sending", level=level)

    [entry] = running_task.take_logs()
    assert entry.level == level.upper()


def test_task_log_entries_in_order(running_task: TaskContext) -> None:
    task_log("first")
    task_log("second")

    assert [entry.message for entry in running_task.take_logs()] == ["first", "second"]
    assert running_task.take_logs() == []


def test_task_log_loguru_line(running_task: TaskContext, loguru_records: list[Any]) -> None:
    task_log("Sending", level="error", recipients=2)

    [record] = loguru_records
    assert record["level"].name == "ERROR"
    assert record["message"] == f"emails.send [{running_task.task_id}] Sending"
    assert record["extra"]["task_id"] == running_task.task_id
    assert record["extra"]["task_name"] == "emails.send"
    assert record["extra"]["attempt"] == 2
    assert record["extra"]["recipients"] == 2
    assert record["function"] == "test_task_log_loguru_line"
