"""The context of the task attempt that is running: ids, cancel request and log buffer."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field

from app_taskflow.models import LogEntry


@dataclass
class TaskContext:
    """What a running attempt can see of itself, through ``current_task()``.

    Attributes:
        task_id: id of the task.
        task_name: registered name of the task.
        attempt: number of this attempt, from 1.
        max_attempts: attempts allowed in all.
        instance_id: id of the app instance running it.
    """

    task_id: str
    task_name: str
    attempt: int
    max_attempts: int
    instance_id: str
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _unsaved: list[LogEntry] = field(default_factory=list, repr=False)

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel was requested; a sync task should check it and return early."""
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        """Mark the attempt as asked to stop."""
        self._cancel.set()

    def add_log(self, entry: LogEntry) -> None:
        """Keep a log entry until the next ``take_logs()``. Safe from any thread."""
        with self._lock:
            self._unsaved.append(entry)

    def take_logs(self) -> list[LogEntry]:
        """Return and forget the entries added since the last call."""
        with self._lock:
            entries, self._unsaved = self._unsaved, []
        return entries


_current: ContextVar[TaskContext | None] = ContextVar("app_taskflow_task", default=None)


def current_task() -> TaskContext | None:
    """Return the context of the task attempt running in this thread or coroutine."""
    return _current.get()


def set_current_task(context: TaskContext | None) -> None:
    """Make ``context`` the current task of this thread or coroutine."""
    _current.set(context)
