"""task_log() for task code, and the library's loguru logger."""

from __future__ import annotations

from typing import Any

from loguru import logger

from app_taskflow.context import current_task
from app_taskflow.models import LogEntry, utcnow

LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

# Loguru's own default sink (stderr) shows these lines; the library adds no sink itself.
log = logger.bind(component="app_taskflow")


def task_log(message: str, level: str = "info", **extra: Any) -> None:
    """Add a timestamped entry to the log of the task that is running.

    Works in sync and async tasks at any call depth. The entry is stored with the task and
    also written through loguru with the task id and name bound. Called outside a task, it
    logs a warning and does nothing else.

    Args:
        message: the text of the entry.
        level: a loguru level name, in any case: trace, debug, info, success, warning,
            error or critical.
        **extra: fields stored with the entry; they must be JSON-compatible.

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
            "task_log() was called outside a task, so this entry is not stored: {}", message
        )
        return

    entry = LogEntry(
        timestamp=utcnow(),
        level=level_name,
        message=str(message),
        attempt=context.attempt,
        extra=extra,
    )
    context.add_log(entry)
    log.bind(
        task_id=context.task_id, task_name=context.task_name, attempt=context.attempt, **extra
    ).opt(depth=1).log(level_name, "{} [{}] {}", context.task_name, context.task_id, entry.message)
