"""Tests of app_taskflow.logfile: the line format, the sink, and rotation inside and outside."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from integration_fixtures import CONTAINERS, wait_for_status
from logging_support import build_taskflow, captured_records, run_task, started
from loguru import logger

from app_taskflow import TaskflowContainer
from app_taskflow.config import load_settings, parse_settings
from app_taskflow.context import LogLimits
from app_taskflow.errors import ConfigurationError
from app_taskflow.logfile import TaskLogFile, TaskLogFileOptions, format_line
from app_taskflow.logs import bind_task, task_log
from app_taskflow.models import TaskStatus
from app_taskflow.taskflow import Taskflow

GATE_TIMEOUT = 5.0

LINE = re.compile(
    r"(?P<timestamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[A-Z]+) +"
    r"(?P<task_id>\S+) (?P<task_name>\S+) (?P<rest>.*)"
)
"""A first line of the task log file: timestamp, level, task id, task name, the rest."""


def format_one(level: str, message: str, *args: Any, **fields: Any) -> str:
    """Log one line with ``bind_task`` fields and return it as the task log file writes it."""
    task_fields = {"task_id": "task-1", "task_name": "emails.send", **fields}
    with captured_records() as records:
        bind_task(**task_fields).log(level, message, *args)
    [record] = records
    return format_line(record)


def read_lines(*paths: Path) -> list[str]:
    """Return the first lines of the records in ``paths``, without continuation lines."""
    lines: list[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        lines.extend(line for line in text.splitlines() if not line.startswith(" "))
    return lines


def task_events(lines: list[str]) -> list[tuple[str, str]]:
    """Return (task id, first word of the message) of each line, such as ("3f2a...", "added")."""
    events = []
    for line in lines:
        match = LINE.fullmatch(line)
        assert match is not None, f"not a task log file line: {line!r}"
        events.append((match["task_id"], match["rest"].split()[0]))
    return events


def file_sizes(folder: Path, prefix: str) -> dict[str, int]:
    """Return the size in bytes of each file in ``folder`` whose name starts with ``prefix``."""
    return {file.name: file.stat().st_size for file in folder.glob(f"{prefix}*")}


def log_file_taskflow(path: Path, **options: Any) -> Taskflow:
    return build_taskflow(log_file=TaskLogFileOptions(path=str(path), **options))


def test_format_line_columns() -> None:
    line = format_one(
        "INFO", "emails.send [task-1] started attempt 1/3", attempt=1, event="started"
    )

    match = LINE.fullmatch(line)
    assert match is not None
    assert match["level"] == "INFO"
    assert match["task_id"] == "task-1"
    assert match["task_name"] == "emails.send"
    assert match["rest"] == "started attempt 1/3 attempt=1 event=started"


def test_format_line_level_padded() -> None:
    info = format_one("INFO", "emails.send [task-1] added")
    warning = format_one("WARNING", "emails.send [task-1] added")

    assert info.index(" task-1 ") == warning.index(" task-1 ")


def test_format_line_utc_timestamp() -> None:
    line = format_one("INFO", "emails.send [task-1] added")

    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", line)


def test_format_line_quotes_values() -> None:
    line = format_one(
        "INFO",
        "emails.send [task-1] Sending",
        subject="Hello there",
        empty="",
        count=3,
        ratio=0.5,
        flag=True,
        nothing=None,
        quoted='say "hi"',
        rows=[1, 2],
        mapping={"to": "a b"},
    )

    assert line.endswith(
        ' Sending subject="Hello there" empty="" count=3 ratio=0.5 flag=true nothing=null'
        ' quoted="say \\"hi\\"" rows=[1,2] mapping="{\\"to\\":\\"a b\\"}"'
    )


def test_format_line_unknown_name() -> None:
    with captured_records() as records:
        bind_task("task-1").warning("[task-1] interrupted: its lease expired")
    [record] = records

    assert format_line(record).split(" ", 3)[3] == "task-1 - interrupted: its lease expired"


def test_format_line_multiline_message() -> None:
    line = format_one("ERROR", "emails.send [task-1] failed: boom\nTraceback\n  File x")

    assert line.splitlines() == [
        line.splitlines()[0],
        "    Traceback",
        "      File x",
    ]
    assert line.splitlines()[0].endswith(" emails.send failed: boom")


def test_format_line_braces_and_markup() -> None:
    line = format_one("INFO", "emails.send [task-1] {}", "<red>{x}</red> \\<b>")

    assert line.endswith(" emails.send <red>{x}</red> \\<b>")


def test_format_line_exception() -> None:
    try:
        raise KeyError("region")
    except KeyError as error:
        with captured_records() as records:
            bind_task("task-1", "emails.send").opt(exception=error).error(
                "emails.send [task-1] failed"
            )
    [record] = records

    lines = format_line(record).splitlines()
    assert lines[1] == "    Traceback (most recent call last):"
    assert lines[-1] == "    KeyError: 'region'"


async def test_log_file_task_lines(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = log_file_taskflow(path)

    @taskflow.task(name="emails.send")
    def send(address: str) -> None:
        task_log("Sending", level="info", recipients=1)

    async with started(taskflow):
        record = await run_task(taskflow, send, "a@example.com")

    lines = read_lines(path)
    assert task_events(lines) == [
        (record.id, "added"),
        (record.id, "started"),
        (record.id, "Sending"),
        (record.id, "succeeded"),
    ]
    assert lines[2].endswith(" emails.send Sending attempt=1 recipients=1")
    assert "a@example.com" not in path.read_text(encoding="utf-8")


async def test_log_file_failure_traceback(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = log_file_taskflow(path)

    @taskflow.task(name="reports.build")
    def build() -> None:
        raise ValueError("disk full")

    async with started(taskflow):
        record = await run_task(taskflow, build)

    text = path.read_text(encoding="utf-8")
    assert f" ERROR    {record.id} reports.build failed attempt 1/1 with ValueError: " in text
    assert "\n    Traceback (most recent call last):\n" in text
    assert "\n    ValueError: disk full\n" in text


async def test_log_file_debug_entries_by_level(tmp_path: Path) -> None:
    default_path = tmp_path / "default.log"
    debug_path = tmp_path / "debug.log"
    default = log_file_taskflow(default_path)
    debug = log_file_taskflow(debug_path, level="DEBUG")

    for taskflow in (default, debug):

        @taskflow.task(name="emails.send")
        def send() -> None:
            task_log("details", level="debug")

    async with started(default), started(debug):
        await run_task(default, default.registry.get("emails.send"))  # type: ignore[arg-type]
        await run_task(debug, debug.registry.get("emails.send"))  # type: ignore[arg-type]

    assert " details" not in default_path.read_text(encoding="utf-8")
    assert " details" in debug_path.read_text(encoding="utf-8")


async def test_log_file_only_own_instance(tmp_path: Path) -> None:
    first_path, second_path = tmp_path / "first.log", tmp_path / "second.log"
    first, second = log_file_taskflow(first_path), log_file_taskflow(second_path)

    for taskflow in (first, second):

        @taskflow.task(name="emails.send")
        def send() -> None:
            pass

    async with started(first), started(second):
        first_record = await run_task(first, first.registry.get("emails.send"))  # type: ignore[arg-type]
        second_record = await run_task(second, second.registry.get("emails.send"))  # type: ignore[arg-type]

    assert {task_id for task_id, _ in task_events(read_lines(first_path))} == {first_record.id}
    assert {task_id for task_id, _ in task_events(read_lines(second_path))} == {second_record.id}


async def test_log_file_skips_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = log_file_taskflow(path)

    async with started(taskflow):
        logger.info("a line of the app itself")
        bind_task("task-9", "emails.send", instance_id=taskflow.instance_id).info(
            "emails.send [task-9] a task line"
        )

    assert read_lines(path) == [read_lines(path)[0]]
    assert read_lines(path)[0].endswith(" task-9 emails.send a task line")


async def test_log_file_removed_at_stop(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = log_file_taskflow(path)

    async with started(taskflow):
        instance_id = taskflow.instance_id
    bind_task("task-9", "emails.send", instance_id=instance_id).info("after the stop")

    assert "after the stop" not in path.read_text(encoding="utf-8")


async def test_log_file_not_added_without_config() -> None:
    taskflow = build_taskflow()
    probe = logger.add(lambda message: None)
    logger.remove(probe)

    async with started(taskflow):
        during = logger.add(lambda message: None)
        logger.remove(during)

    # Loguru numbers handlers in the order they are added: no handler came in between.
    assert taskflow.log_file is None
    assert during == probe + 1


async def test_log_file_pid_in_path(tmp_path: Path) -> None:
    taskflow = log_file_taskflow(tmp_path / "tasks-{pid}.log")

    async with started(taskflow):
        bind_task("task-9", instance_id=taskflow.instance_id).info("[task-9] hello")

    assert (tmp_path / f"tasks-{os.getpid()}.log").exists()


async def test_log_file_invalid_rotation(tmp_path: Path) -> None:
    taskflow = log_file_taskflow(tmp_path / "tasks.log", rotation="every so often")

    with pytest.raises(ConfigurationError, match=r"Cannot write the task log file .*'50 MB'"):
        await taskflow.start()
    assert taskflow.started is False


async def test_log_file_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    taskflow = log_file_taskflow(blocker / "tasks.log")

    with pytest.raises(ConfigurationError, match="folder is writable"):
        await taskflow.start()


async def test_log_file_loguru_rotation(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = log_file_taskflow(path, rotation="1 KB", retention=2)

    @taskflow.task(name="emails.send")
    def send() -> None:
        pass

    async with started(taskflow):
        for _ in range(15):
            await run_task(taskflow, send)

    sizes = file_sizes(tmp_path, "tasks")
    assert path.name in sizes
    assert len(sizes) == 3
    assert max(sizes.values()) < 1500


async def test_log_file_external_rename(tmp_path: Path) -> None:
    """logrotate's default ``create`` mode: the file is renamed, the app writes a new one."""
    path = tmp_path / "tasks.log"
    rotated = tmp_path / "tasks.log.1"
    taskflow = log_file_taskflow(path)
    gate = asyncio.Event()
    began = asyncio.Event()

    @taskflow.task(name="emails.send")
    def send() -> None:
        pass

    @taskflow.task(name="index.rebuild")
    async def rebuild() -> None:
        began.set()
        await asyncio.wait_for(gate.wait(), GATE_TIMEOUT)
        task_log("rebuilt")

    async with started(taskflow):
        before = [await run_task(taskflow, send) for _ in range(3)]
        held_id = await taskflow.add_task(rebuild)
        await asyncio.wait_for(began.wait(), GATE_TIMEOUT)

        os.rename(path, rotated)
        gate.set()
        after = [await run_task(taskflow, send) for _ in range(3)]
        await wait_for_status(taskflow.store, held_id, TaskStatus.SUCCESS)

    old_events = task_events(read_lines(rotated))
    new_events = task_events(read_lines(path))
    expected = Counter(
        (record.id, event)
        for record in before + after
        for event in ("added", "started", "succeeded")
    )
    expected.update([(held_id, "added"), (held_id, "started")])
    expected.update([(held_id, "rebuilt"), (held_id, "succeeded")])
    assert Counter(old_events + new_events) - expected == Counter()
    assert expected - Counter(old_events + new_events) == Counter()
    assert {task_id for task_id, _ in old_events} == {record.id for record in before} | {held_id}
    assert (held_id, "succeeded") in new_events
    assert {task_id for task_id, _ in new_events} >= {record.id for record in after}


async def test_log_file_external_copytruncate(tmp_path: Path) -> None:
    """logrotate's ``copytruncate`` mode: the file is copied, then cut to zero in place."""
    path = tmp_path / "tasks.log"
    copy = tmp_path / "tasks.log.1"
    taskflow = log_file_taskflow(path)

    @taskflow.task(name="emails.send")
    def send() -> None:
        pass

    async with started(taskflow):
        before = [await run_task(taskflow, send) for _ in range(3)]
        shutil.copyfile(path, copy)
        os.truncate(path, 0)
        after = [await run_task(taskflow, send) for _ in range(3)]

    new_bytes = path.read_bytes()
    events = task_events(read_lines(copy)) + task_events(read_lines(path))
    expected = [
        (record.id, event)
        for record in before + after
        for event in ("added", "started", "succeeded")
    ]
    assert b"\x00" not in new_bytes
    assert Counter(events) == Counter(expected)
    assert {task_id for task_id, _ in task_events(read_lines(path))} == {
        record.id for record in after
    }


_WRITER = textwrap.dedent(
    """
    import sys
    from app_taskflow.logfile import TaskLogFile, TaskLogFileOptions
    from app_taskflow.logs import bind_task

    path, writer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sink = TaskLogFile(TaskLogFileOptions(path=path))
    sink.start(writer)
    for number in range(count):
        task_id = f"{writer}-{number}"
        # Every 50th record is larger than the file object's 8 KiB buffer.
        size = 20_000 if number % 50 == 0 else 1000
        bind_task(task_id, "bulk.write", instance_id=writer).info(
            "bulk.write [{}] {}", task_id, writer[-1] * size
        )
    sink.stop()
    """
)


def test_log_file_shared_by_processes(tmp_path: Path) -> None:
    """Lines of several processes appending to one file never interleave."""
    path = tmp_path / "tasks.log"
    count = 1000
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), f"writer-{letter}", str(count)],
            stderr=subprocess.PIPE,
        )
        for letter in "ab"
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=50)
        assert writer.returncode == 0, stderr.decode()

    lines = read_lines(path)
    pattern = re.compile(r"\S+ INFO     (writer-(a|b)-(\d+)) bulk\.write (a+|b+)")
    matches = [match for line in lines if (match := pattern.fullmatch(line))]
    expected_sizes = [20_000 if int(match[3]) % 50 == 0 else 1000 for match in matches]
    assert len(lines) == 2 * count
    assert len(matches) == 2 * count
    assert all(match[4] == match[2] * len(match[4]) for match in matches)
    assert [len(match[4]) for match in matches] == expected_sizes
    assert len({match[1] for match in matches}) == 2 * count


def test_log_file_start_twice_adds_one_sink(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    sink = TaskLogFile(TaskLogFileOptions(path=str(path)))

    sink.start("instance-1")
    sink.start("instance-1")
    bind_task("task-1", instance_id="instance-1").info("[task-1] once")
    sink.stop()
    sink.stop()

    assert len(read_lines(path)) == 1


def container_with(**sections: Any) -> TaskflowContainer:
    settings = parse_settings({"store": {"kind": "memory"}, **sections})
    return TaskflowContainer.from_settings(settings)


def test_log_file_config_options() -> None:
    file_section = {"path": "var/tasks.log", "rotation": "50 MB", "retention": 10, "level": "debug"}
    taskflow = container_with(logging={"file": file_section}).taskflow()

    assert taskflow.log_file is not None
    assert taskflow.log_file.options == TaskLogFileOptions(
        path="var/tasks.log", rotation="50 MB", retention=10, compression=None, level="DEBUG"
    )


def test_log_file_config_default_none() -> None:
    taskflow = container_with().taskflow()

    assert taskflow.log_file is None
    assert taskflow.stdlib_logging is False


def test_log_limits_config() -> None:
    logging_section = {"max_entries_per_task": 5, "max_entry_chars": 100, "stdlib": True}
    taskflow = container_with(logging=logging_section).taskflow()

    assert taskflow.log_limits == LogLimits(max_entries_per_task=5, max_entry_chars=100)
    assert taskflow.stdlib_logging is True


def test_log_file_config_unknown_key() -> None:
    expected = (
        "unknown key 'logging.file.rotate'; allowed keys here: path, rotation, retention, "
        "compression, level"
    )
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(
            {"store": {"kind": "memory"}, "logging": {"file": {"path": "a", "rotate": 1}}}
        )


def test_log_file_config_invalid_compression() -> None:
    section = {"file": {"path": "a.log", "compression": "rar"}}

    with pytest.raises(
        ConfigurationError, match=r"logging\.file\.compression: invalid value 'rar'"
    ):
        parse_settings({"store": {"kind": "memory"}, "logging": section})


def test_log_file_config_missing_path() -> None:
    with pytest.raises(ConfigurationError, match=r"logging\.file\.path is missing"):
        parse_settings({"store": {"kind": "memory"}, "logging": {"file": {"rotation": "1 day"}}})


def test_development_config_logging() -> None:
    settings = load_settings(CONTAINERS / "development.yaml")

    assert settings.logging.file is not None
    assert settings.logging.file.path == "var/tasks.log"
    assert settings.metrics.prometheus is True
