"""task_log() for task code, the library's loguru logger, and forwarding to ``logging``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from loguru import logger

from app_taskflow.context import LogLimits, TaskContext, current_task
from app_taskflow.models import LogEntry, utcnow

if TYPE_CHECKING:
    from loguru import Logger, Message, Record

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

COMPONENT = "app_taskflow"
"""Value of the ``component`` field bound to every line the library writes."""

STDLIB_LOGGER_NAME = "app_taskflow"
"""The standard ``logging`` logger that receives the library's lines when forwarding is on."""

TASK_FIELDS = frozenset({"component", "task_id", "task_name", "attempt", "instance_id", "event"})
"""Fields the library binds itself; a ``task_log()`` extra of the same name, or one that
starts with ``TAG_FIELD_PREFIX``, is renamed with an ``extra_`` prefix."""

TAG_FIELD_PREFIX = "tag."
"""Start of the bound field of each task tag: tag ``user_id`` is bound as ``tag.user_id``."""

_MAX_DEPTH = 10
"""Nesting depth of an extra value past which the rest is stored as its repr."""

# Loguru's own default sink (stderr) shows these lines. The library adds a sink only when the
# configuration sets one (logging.file, logging.stdlib), and removes it at shutdown.
log = logger.bind(component=COMPONENT)

_task_tags: ContextVar[Mapping[str, str] | None] = ContextVar(
    "app_taskflow_task_tags", default=None
)


def bind_task(
    task_id: str,
    task_name: str | None = None,
    *,
    attempt: int | None = None,
    instance_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    **fields: Any,
) -> Logger:
    """Return the library's logger with the fields of one task bound to every line.

    Args:
        task_id: id of the task.
        task_name: registered name of the task; left out when unknown.
        attempt: number of the attempt the line is about, from 1.
        instance_id: id of the app instance that writes the line; a task log file sink
            keeps only the lines of its own instance.
        tags: the task's tags, each bound as ``tag.<key>``.
        **fields: more fields, such as ``event`` or ``duration`` on lifecycle lines.
    """
    bound: dict[str, Any] = {"task_id": task_id}
    if task_name is not None:
        bound["task_name"] = task_name
    if attempt is not None:
        bound["attempt"] = attempt
    if instance_id is not None:
        bound["instance_id"] = instance_id
    # Fields every line of a task carries are bound here, and only here.
    bound.update(fields)
    if tags:
        bound.update({TAG_FIELD_PREFIX + key: value for key, value in tags.items()})
    return log.bind(**bound)


def set_task_tags(tags: Mapping[str, str]) -> Token[Mapping[str, str] | None]:
    """Make ``tags`` the tags that ``task_log()`` binds in this context; the runner calls it.

    Returns:
        The token that ``reset_task_tags`` takes to restore the tags set before.
    """
    return _task_tags.set(tags)


def reset_task_tags(token: Token[Mapping[str, str] | None]) -> None:
    """Restore the tags that were set before ``set_task_tags`` returned ``token``."""
    _task_tags.reset(token)


def task_log(message: str, level: str = "info", **extra: Any) -> None:
    """Add a timestamped entry to the log of the task that is running.

    Works in sync and async tasks at any call depth. The entry is stored with the task and
    also written through loguru with the task id and name bound. Called outside a task, it
    logs a warning and does nothing else.

    A task keeps at most ``logging.max_entries_per_task`` entries over all its attempts.
    Later ones are dropped, and one entry at the end of the attempt counts them. A message
    longer than ``logging.max_entry_chars`` is truncated with a marker.

    Args:
        message: the text of the entry.
        level: a loguru level name, in any case: trace, debug, info, success, warning,
            error or critical.
        **extra: fields stored with the entry. Values that JSON cannot hold (objects,
            sets, bytes, ...) are stored as their ``repr``; long values are truncated.

    Raises:
        ValueError: ``level`` is not one of the levels above.
    """
    level_name = level.upper()
    if level_name not in LOG_LEVELS:
        raise ValueError(
            f"Invalid task_log level {level!r}: use one of {', '.join(LOG_LEVELS).lower()}."
        )

    context = current_task()
    if context is None:
        log.opt(depth=1).warning(
            "task_log() was called outside a task, so this entry is not stored: {}",
            truncate(str(message), LogLimits().max_entry_chars),
        )
        return

    limit = context.log_limits.max_entry_chars
    fields = json_fields(extra, limit)
    entry = LogEntry(
        timestamp=utcnow(),
        level=level_name,
        message=truncate(str(message), limit),
        attempt=context.attempt,
        extra=fields,
    )
    if not context.add_log(entry):
        return
    # Bound separately, so that an extra named like a parameter of bind_task (tags, say)
    # stays an extra.
    bound = bind_task(
        context.task_id,
        context.task_name,
        attempt=context.attempt,
        instance_id=context.instance_id,
        tags=_task_tags.get(),
    ).bind(**_unreserved(fields))
    bound.opt(depth=1).log(
        level_name, "{} [{}] {}", context.task_name, context.task_id, entry.message
    )


def close_task_log(context: TaskContext) -> None:
    """Store and log the entry that counts the entries dropped in this attempt, if any."""
    entry = context.close_logs()
    if entry is None:
        return
    bind_task(
        context.task_id,
        context.task_name,
        attempt=context.attempt,
        instance_id=context.instance_id,
        tags=_task_tags.get(),
        **entry.extra,
    ).warning("{} [{}] {}", context.task_name, context.task_id, entry.message)


def truncate(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, with a marker that counts the rest."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated {len(text) - limit} of {len(text)} characters]"


def json_fields(extra: Mapping[str, Any], limit: int) -> dict[str, Any]:
    """Return ``extra`` with every value made JSON-compatible and at most ``limit`` long.

    Strings, numbers, booleans and ``None`` are kept. Mappings and sequences are converted
    item by item, and any other value becomes its ``repr``. A value whose JSON text is
    longer than ``limit`` characters becomes that text, truncated. A value that fails to
    convert (a mapping whose ``items()`` raises, say) becomes its ``repr`` too, so this
    function does not raise.
    """
    fields: dict[str, Any] = {}
    for key, value in extra.items():
        try:
            converted = json_compatible(value, limit)
            if isinstance(converted, dict | list):
                encoded = json.dumps(converted, ensure_ascii=False)
                if len(encoded) > limit:
                    converted = truncate(encoded, limit)
        except Exception:
            converted = truncate(_safe_repr(value), limit)
        fields[key] = converted
    return fields


def json_compatible(value: Any, limit: int, depth: int = 0) -> Any:
    """Return ``value`` as JSON can hold it, converting what it cannot hold with ``repr``."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return truncate(str(value), limit)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {
                key if isinstance(key, str) else _safe_repr(key): json_compatible(
                    item, limit, depth + 1
                )
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return [json_compatible(item, limit, depth + 1) for item in value]
    return truncate(_safe_repr(value), limit)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as error:
        # task_log() must not fail the task because an object's __repr__ is broken.
        return f"<{type(value).__qualname__} object: repr() raised {type(error).__name__}>"


def _unreserved(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        f"extra_{key}" if key in TASK_FIELDS or key.startswith(TAG_FIELD_PREFIX) else key: value
        for key, value in fields.items()
    }


def is_library_record(record: Record) -> bool:
    """Return whether app-taskflow wrote a loguru record, ``task_log()`` entries included."""
    return bool(record["extra"].get("component") == COMPONENT)


def forward_to_stdlib(message: Message) -> None:
    """Hand one loguru record to the standard ``logging`` logger ``app_taskflow``.

    The ``logging.LogRecord`` keeps the loguru record's level, time, source location and
    exception, and carries the task fields as attributes: ``task_id``, ``task_name``,
    ``attempt`` and ``event`` (``None`` when absent), and ``task_fields``, a dict of every
    field bound to the line.
    """
    record = message.record
    target = logging.getLogger(STDLIB_LOGGER_NAME)
    level = record["level"].no
    # Logger.handle() skips the level check that Logger.log() makes, so it is made here.
    if not target.isEnabledFor(level):
        return

    exception = record["exception"]
    exc_info = None
    if exception is not None and exception.type is not None and exception.value is not None:
        exc_info = (exception.type, exception.value, exception.traceback)
    stdlib_record = target.makeRecord(
        target.name,
        level,
        record["file"].path,
        record["line"],
        record["message"],
        (),
        exc_info,
        record["function"],
    )
    # Loguru's TRACE (5) and SUCCESS (25) have no name in the logging module.
    stdlib_record.levelname = record["level"].name
    created = record["time"].timestamp()
    stdlib_record.created = created
    stdlib_record.msecs = (created - int(created)) * 1000
    extra = record["extra"]
    for name in ("task_id", "task_name", "attempt", "event"):
        setattr(stdlib_record, name, extra.get(name))
    stdlib_record.task_fields = {key: value for key, value in extra.items() if key != "component"}
    target.handle(stdlib_record)


class _StdlibForwarding:
    """One loguru sink per process forwards to ``logging``, however many taskflows use it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._sink_id: int | None = None

    def start(self) -> None:
        with self._lock:
            if self._users == 0:
                self._sink_id = logger.add(
                    forward_to_stdlib, level=0, filter=is_library_record, format="{message}"
                )
            self._users += 1

    def stop(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users == 0 and self._sink_id is not None:
                logger.remove(self._sink_id)
                self._sink_id = None


_stdlib_forwarding = _StdlibForwarding()


def start_stdlib_forwarding() -> None:
    """Forward the library's loguru records to the ``logging`` logger ``app_taskflow``.

    Pair each call with ``stop_stdlib_forwarding()``. One sink serves every caller and stays
    until the last one stops, so two taskflows in one process do not forward a record twice.
    """
    _stdlib_forwarding.start()


def stop_stdlib_forwarding() -> None:
    """Undo one ``start_stdlib_forwarding()``; the last one removes the loguru sink."""
    _stdlib_forwarding.stop()
