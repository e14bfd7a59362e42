"""Tests of app_taskflow.logs: task_log(), its caps, and forwarding to the logging module."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
from logging_support import build_taskflow, mask_seconds, run_task, started
from loguru import logger

from app_taskflow.context import LogLimits, TaskContext, current_task, set_current_task
from app_taskflow.logs import (
    LOG_LEVELS,
    STDLIB_LOGGER_NAME,
    bind_task,
    close_task_log,
    start_stdlib_forwarding,
    stop_stdlib_forwarding,
    task_log,
)
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


class Unserializable:
    def __repr__(self) -> str:
        return "<Unserializable>"


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


def test_task_log_extra_repr_fallback(running_task: TaskContext) -> None:
    task_log("Sending", item=Unserializable(), tags={"a"}, when=(1, 2))

    [entry] = running_task.take_logs()
    assert entry.extra["item"] == "<Unserializable>"
    assert entry.extra["tags"] == "{'a'}"
    assert entry.extra["when"] == [1, 2]


def test_task_log_extra_nested_values(running_task: TaskContext) -> None:
    task_log("Sending", payload={"to": ["a@example.com"], 3: {"raw": b"\x00"}})

    [entry] = running_task.take_logs()
    assert entry.extra["payload"] == {"to": ["a@example.com"], "3": {"raw": "b'\\x00'"}}


def test_task_log_extra_broken_repr(running_task: TaskContext) -> None:
    task_log("Sending", item=BrokenRepr())

    [entry] = running_task.take_logs()
    assert entry.extra["item"] == "<BrokenRepr object: repr() raised RuntimeError>"


def test_task_log_extra_entry_is_json(running_task: TaskContext) -> None:
    task_log("Sending", item=Unserializable(), numbers={1, 2}, nested=[[[]]])

    [entry] = running_task.take_logs()
    assert json.loads(entry.model_dump_json())["extra"]["numbers"] == "{1, 2}"


def test_task_log_long_message_truncated(running_task: TaskContext) -> None:
    running_task.limit_logs(LogLimits(max_entry_chars=10))

    task_log("x" * 25)

    [entry] = running_task.take_logs()
    assert entry.message == "x" * 10 + "… [truncated 15 of 25 characters]"


def test_task_log_long_extra_truncated(running_task: TaskContext) -> None:
    running_task.limit_logs(LogLimits(max_entry_chars=20))

    task_log("Sending", body="y" * 30, rows=list(range(50)))

    [entry] = running_task.take_logs()
    assert entry.extra["body"] == "y" * 20 + "… [truncated 10 of 30 characters]"
    assert entry.extra["rows"].startswith("[0, 1, 2, 3, 4, 5, 6… [truncated")


def test_task_log_entries_capped(running_task: TaskContext) -> None:
    running_task.limit_logs(LogLimits(max_entries_per_task=3))

    for number in range(5):
        task_log(f"entry {number}")
    marker = running_task.close_logs()

    entries = running_task.take_logs()
    assert [entry.message for entry in entries[:3]] == ["entry 0", "entry 1", "entry 2"]
    assert marker is not None
    assert entries[3] == marker
    assert marker.message == "2 log entries dropped: the limit is 3 per task"
    assert marker.level == "WARNING"
    assert marker.extra == {"dropped": 2}


def test_task_log_cap_counts_stored_entries(running_task: TaskContext) -> None:
    running_task.limit_logs(LogLimits(max_entries_per_task=3), stored=2)

    task_log("kept")
    task_log("dropped")
    marker = running_task.close_logs()

    assert [entry.message for entry in running_task.take_logs()] == [
        "kept",
        "1 log entry dropped: the limit is 3 per task",
    ]
    assert marker is not None


def test_task_log_no_marker_under_cap(running_task: TaskContext) -> None:
    task_log("only one")

    assert running_task.close_logs() is None
    assert len(running_task.take_logs()) == 1


def test_task_log_dropped_not_logged(running_task: TaskContext, loguru_records: list[Any]) -> None:
    running_task.limit_logs(LogLimits(max_entries_per_task=1))

    task_log("kept")
    task_log("dropped")
    close_task_log(running_task)

    messages = [record["message"] for record in loguru_records]
    assert messages == [
        f"emails.send [{running_task.task_id}] kept",
        f"emails.send [{running_task.task_id}] 1 log entry dropped: the limit is 1 per task",
    ]
    assert loguru_records[1]["level"].name == "WARNING"


def test_task_log_reserved_extra_renamed(
    running_task: TaskContext, loguru_records: list[Any]
) -> None:
    task_log("Sending", task_id="other", attempt=9)

    [entry] = running_task.take_logs()
    [record] = loguru_records
    assert entry.extra == {"task_id": "other", "attempt": 9}
    assert record["extra"]["task_id"] == running_task.task_id
    assert record["extra"]["attempt"] == 2
    assert record["extra"]["extra_task_id"] == "other"
    assert record["extra"]["extra_attempt"] == 9


async def test_task_log_cap_over_attempts() -> None:
    taskflow = build_taskflow(log_limits=LogLimits(max_entries_per_task=3))

    @taskflow.task(name="imports.run", retries=1)
    def run_import() -> None:
        for number in range(2):
            task_log(f"row {number}")
        context = current_task()
        assert context is not None
        if context.attempt == 1:
            raise ValueError("retry me")

    async with started(taskflow):
        record = await run_task(taskflow, run_import)

    assert [(entry.attempt, entry.message) for entry in record.logs] == [
        (1, "row 0"),
        (1, "row 1"),
        (2, "row 0"),
        (2, "1 log entry dropped: the limit is 3 per task"),
    ]


class CollectingHandler(logging.Handler):
    """A logging handler that keeps the records it receives."""

    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def stdlib_records() -> Iterator[list[logging.LogRecord]]:
    """Yield the records the ``app_taskflow`` logging logger receives at DEBUG and above."""
    handler = CollectingHandler()
    target = logging.getLogger(STDLIB_LOGGER_NAME)
    previous_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    yield handler.records
    target.removeHandler(handler)
    target.setLevel(previous_level)


def test_stdlib_forwarding_task_fields(
    running_task: TaskContext, stdlib_records: list[logging.LogRecord]
) -> None:
    start_stdlib_forwarding()
    try:
        task_log("Sending", level="warning", recipients=2)
    finally:
        stop_stdlib_forwarding()

    [record] = stdlib_records
    assert record.name == "app_taskflow"
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"emails.send [{running_task.task_id}] Sending"
    assert record.task_id == running_task.task_id  # type: ignore[attr-defined]
    assert record.task_name == "emails.send"  # type: ignore[attr-defined]
    assert record.attempt == 2  # type: ignore[attr-defined]
    assert record.task_fields["recipients"] == 2  # type: ignore[attr-defined]
    assert record.funcName == "test_stdlib_forwarding_task_fields"


def test_stdlib_forwarding_respects_level(
    running_task: TaskContext, stdlib_records: list[logging.LogRecord]
) -> None:
    logging.getLogger(STDLIB_LOGGER_NAME).setLevel(logging.ERROR)
    start_stdlib_forwarding()
    try:
        task_log("quiet", level="info")
        task_log("loud", level="error")
    finally:
        stop_stdlib_forwarding()

    assert [record.getMessage().split()[-1] for record in stdlib_records] == ["loud"]


def test_stdlib_forwarding_success_level_name(
    running_task: TaskContext, stdlib_records: list[logging.LogRecord]
) -> None:
    start_stdlib_forwarding()
    try:
        task_log("done", level="success")
    finally:
        stop_stdlib_forwarding()

    [record] = stdlib_records
    assert record.levelno == 25
    assert record.levelname == "SUCCESS"


def test_stdlib_forwarding_once_per_process(
    running_task: TaskContext, stdlib_records: list[logging.LogRecord]
) -> None:
    start_stdlib_forwarding()
    start_stdlib_forwarding()
    try:
        task_log("twice started")
    finally:
        stop_stdlib_forwarding()
    task_log("one start left")
    stop_stdlib_forwarding()
    task_log("all stopped")

    assert [record.getMessage().split("] ")[1] for record in stdlib_records] == [
        "twice started",
        "one start left",
    ]


def test_stdlib_forwarding_skips_other_lines(stdlib_records: list[logging.LogRecord]) -> None:
    start_stdlib_forwarding()
    try:
        logger.info("a line of the app itself")
    finally:
        stop_stdlib_forwarding()

    assert stdlib_records == []


def test_stdlib_forwarding_off_by_default(
    running_task: TaskContext, stdlib_records: list[logging.LogRecord]
) -> None:
    task_log("not forwarded")

    assert stdlib_records == []


async def test_stdlib_forwarding_from_config(stdlib_records: list[logging.LogRecord]) -> None:
    taskflow = build_taskflow(stdlib_logging=True)

    @taskflow.task(name="emails.send")
    def send() -> None:
        task_log("Sending")

    async with started(taskflow):
        record = await run_task(taskflow, send)
    task_log("after stop")

    task_lines = [
        line
        for line in stdlib_records
        if getattr(line, "task_id", None) == record.id and line.levelno >= logging.INFO
    ]
    assert [mask_seconds(line.getMessage().split("] ")[1]) for line in task_lines] == [
        "added",
        "started attempt 1/1",
        "Sending",
        "succeeded in <t> s",
    ]
    assert [line.event for line in task_lines] == [  # type: ignore[attr-defined]
        "added",
        "started",
        None,
        "succeeded",
    ]


def test_bind_task_fields(loguru_records: list[Any]) -> None:
    bind_task("task-1", "emails.send", attempt=3, instance_id="instance-1").info("hello")

    [record] = loguru_records
    assert record["extra"] == {
        "component": "app_taskflow",
        "task_id": "task-1",
        "task_name": "emails.send",
        "attempt": 3,
        "instance_id": "instance-1",
    }


def test_bind_task_leaves_out_unknown_fields(loguru_records: list[Any]) -> None:
    bind_task("task-1").info("hello")

    [record] = loguru_records
    assert record["extra"] == {"component": "app_taskflow", "task_id": "task-1"}


class BrokenMapping(dict[str, int]):
    def items(self) -> Any:
        raise RuntimeError("no items")

    def __repr__(self) -> str:
        return "<BrokenMapping>"


def test_task_log_extra_broken_mapping(running_task: TaskContext) -> None:
    task_log("Sending", counts=BrokenMapping())

    [entry] = running_task.take_logs()
    assert entry.extra["counts"] == "<BrokenMapping>"
