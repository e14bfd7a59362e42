"""The context of the task attempt that is running: ids, cancel request and log buffer."""

from __future__ import annotations

import threading
from contextvars import ContextVar
from dataclasses import dataclass, field

from app_taskflow.models import LogEntry, utcnow


@dataclass(frozen=True)
class LogLimits:
    """Caps on the log of one task, set by the ``logging`` configuration section.

    Attributes:
        max_entries_per_task: entries kept per task, over all its attempts; later entries
            are dropped and counted.
        max_entry_chars: characters kept of a message or of an extra value; longer ones
            are truncated with a marker.
    """

    max_entries_per_task: int = 1000
    max_entry_chars: int = 4000


@dataclass
class TaskContext:
    """The view a running attempt has of itself, through ``current_task()``.

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
    log_limits: LogLimits = field(default_factory=LogLimits, repr=False)
    _kept_logs: int = field(default=0, repr=False)
    _dropped_logs: int = field(default=0, repr=False)

    @property
    def cancel_requested(self) -> bool:
        """Whether a cancel was requested; a sync task should check it and return early."""
        return self._cancel.is_set()

    def request_cancel(self) -> None:
        """Mark the attempt as asked to stop."""
        self._cancel.set()

    def limit_logs(self, limits: LogLimits, stored: int = 0) -> None:
        """Apply ``limits`` to this attempt, counting ``stored`` entries of earlier attempts."""
        with self._lock:
            self.log_limits = limits
            self._kept_logs = stored

    def add_log(self, entry: LogEntry) -> bool:
        """Keep a log entry until the next ``take_logs()``; safe from any thread.

        Returns:
            False when the task already has ``log_limits.max_entries_per_task`` entries:
            the entry is dropped and counted for ``close_logs()``.
        """
        with self._lock:
            if self._kept_logs >= self.log_limits.max_entries_per_task:
                self._dropped_logs += 1
                return False
            self._kept_logs += 1
            self._unsaved.append(entry)
        return True

    def close_logs(self) -> LogEntry | None:
        """Add and return the entry that counts the entries dropped in this attempt, if any.

        The runner calls it when the attempt ends. The marker itself is kept beyond the cap,
        so a task may hold one marker more than the limit for each attempt that dropped any.
        """
        with self._lock:
            dropped, self._dropped_logs = self._dropped_logs, 0
            if dropped == 0:
                return None
            noun = "entry" if dropped == 1 else "entries"
            entry = LogEntry(
                timestamp=utcnow(),
                level="WARNING",
                message=(
                    f"{dropped} log {noun} dropped: the limit is "
                    f"{self.log_limits.max_entries_per_task} per task"
                ),
                attempt=self.attempt,
                extra={"dropped": dropped},
            )
            self._unsaved.append(entry)
        return entry

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
