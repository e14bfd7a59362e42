"""The plain-text task log file: one line per task log entry and per lifecycle transition.

A line reads ``timestamp level task_id task_name message key=value...``, for example::

    2025-06-01T09:30:12.345Z INFO     3f2a0c1e-... emails.send started attempt 1/3 attempt=1

The file is written through loguru's own file sink, so ``rotation``, ``retention`` and
``compression`` take loguru's values. The sink checks the file's inode before every write
(loguru's ``watch=True``) and reopens the configured path when the file was renamed or
deleted, so external rotation with logrotate works with ``create`` as well as with
``copytruncate``: the file is opened with ``O_APPEND``, so writes after a truncation start
at the new end instead of leaving a hole.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast

from loguru import logger

from app_taskflow.errors import ConfigurationError
from app_taskflow.logs import COMPONENT

if TYPE_CHECKING:
    from loguru import Record

HIDDEN_FIELDS = frozenset({"component", "task_id", "task_name", "instance_id"})
"""Bound fields that are not repeated as key=value: they are columns or internal."""

PID_PLACEHOLDER = "{pid}"
"""Placeholder in ``logging.file.path`` replaced by the process id: one file per process."""

CONTINUATION_INDENT = "    "
"""Prefix of the continuation lines of a multi-line message, such as a traceback."""

_RECORD_KEY = "app_taskflow_file_line"
"""Top-level record key that carries the rendered line from the formatter to the template."""

_BARE_VALUE = re.compile(r'[^\s"=\\]+')


@dataclass(frozen=True)
class TaskLogFileOptions:
    """Location, rotation and level of the task log file.

    Attributes:
        path: the file; ``{time}`` takes loguru's meaning, ``{pid}`` becomes the process id.
        rotation: when loguru starts a new file, in loguru's terms ("50 MB", "1 day",
            "00:00"); ``None`` leaves rotation to an external tool such as logrotate.
        retention: which rotated files loguru deletes ("14 days", or a count such as 10).
        compression: format loguru compresses rotated files to ("gz", "zip", ...).
        level: lowest level written; lower ``task_log()`` entries are still stored with
            their task.
    """

    path: str
    rotation: str | int | None = None
    retention: str | int | None = None
    compression: str | None = None
    level: str = "INFO"


class TaskLogFile:
    """A loguru sink that writes the task lines of one taskflow instance to a file.

    ``start()`` adds the sink and ``stop()`` removes it; the taskflow calls them at startup
    and shutdown when ``logging.file`` is configured, and never adds it otherwise.
    """

    def __init__(self, options: TaskLogFileOptions) -> None:
        self.options = options
        self.path = options.path.replace(PID_PLACEHOLDER, str(os.getpid()))
        self._instance_id: str | None = None
        self._sink_id: int | None = None

    def start(self, instance_id: str) -> None:
        """Add the sink, keeping the task lines written by instance ``instance_id``.

        Raises:
            ConfigurationError: the file cannot be opened, or a rotation, retention or
                compression value is not one loguru accepts.
        """
        if self._sink_id is not None:
            return
        self._instance_id = instance_id
        options = self.options
        try:
            self._sink_id = logger.add(
                self.path,
                level=options.level,
                format=self._template,
                filter=self._accepts,
                rotation=options.rotation,
                retention=options.retention,
                compression=options.compression,
                watch=True,
                encoding="utf-8",
            )
        except (OSError, ValueError, TypeError) as error:
            raise ConfigurationError(
                f"Cannot write the task log file {self.path!r} (logging.file): {error}. "
                "Check that its folder is writable and that rotation, retention and "
                "compression use loguru's values, such as '50 MB', '14 days' and 'gz'."
            ) from error

    def stop(self) -> None:
        """Remove the sink, which flushes and closes the file."""
        if self._sink_id is None:
            return
        sink_id, self._sink_id = self._sink_id, None
        logger.remove(sink_id)

    def _accepts(self, record: Record) -> bool:
        extra = record["extra"]
        return (
            extra.get("component") == COMPONENT
            and "task_id" in extra
            and extra.get("instance_id") == self._instance_id
        )

    def _template(self, record: Record) -> str:
        # Loguru formats the returned template with the record, so braces or markup-like
        # text in a rendered template would be misread. The line travels in the record
        # instead, under a top-level key that stays out of record["extra"], which other
        # sinks may serialize.
        cast(dict[str, Any], record)[_RECORD_KEY] = format_line(record)
        return "{" + _RECORD_KEY + "}\n"


def format_line(record: Record) -> str:
    """Render a loguru record as a task log file line, continuation lines included.

    The first line is ``timestamp level task_id task_name message key=value...``: an
    ISO-8601 UTC timestamp with milliseconds, the level padded to 8 characters, ``-`` for a
    task name the instance does not know, the message without its ``name [id]`` prefix,
    then every bound field but the columns. A value is written bare unless it is empty or
    contains a space, a quote, an equals sign or a backslash, and as a JSON string then. Lines
    after the first line of a multi-line message, and an attached exception, follow
    indented by four spaces.
    """
    moment = record["time"].astimezone(UTC)
    timestamp = f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"
    extra = record["extra"]
    task_id = str(extra.get("task_id", "-"))
    task_name = extra.get("task_name")
    message = record["message"]
    for prefix in (f"{task_name} [{task_id}] ", f"[{task_id}] "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            break
    first, *rest = message.splitlines() or [""]

    columns = [timestamp, f"{record['level'].name:<8}", _quote(task_id)]
    columns.append(_quote(str(task_name)) if task_name else "-")
    columns.append(first)
    columns.extend(
        f"{key}={_quote(value)}" for key, value in extra.items() if key not in HIDDEN_FIELDS
    )
    lines = [" ".join(columns)]

    exception = record["exception"]
    if exception is not None and exception.type is not None:
        rest.extend(
            "".join(
                traceback.format_exception(exception.type, exception.value, exception.traceback)
            ).splitlines()
        )
    lines.extend(CONTINUATION_INDENT + line for line in rest)
    return "\n".join(lines)


def _quote(value: Any) -> str:
    if isinstance(value, str):
        return value if _BARE_VALUE.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        text = repr(value)
    return text if _BARE_VALUE.fullmatch(text) else json.dumps(text, ensure_ascii=False)
