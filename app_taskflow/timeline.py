"""The task timeline: one log line per lifecycle transition, and listeners such as metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from app_taskflow.logs import bind_task, log, truncate
from app_taskflow.models import AttemptOutcome, TaskRecord

if TYPE_CHECKING:
    from loguru import Logger

TransitionEvent = Literal[
    "added", "started", "retrying", "succeeded", "failed", "cancelled", "interrupted"
]

ARGUMENTS_PREVIEW_CHARS = 200
"""Characters of a task's arguments shown in its DEBUG ``arguments`` line."""

_LISTENER_ERROR_EVERY = 100
"""After its first error, a failing listener is logged again once per this many errors."""


@dataclass(frozen=True)
class TaskTransition:
    """One change of a task's status made by this instance, as listeners receive it.

    Attributes:
        event: what happened: added, started, retrying, succeeded, failed, cancelled or
            interrupted.
        task_id: id of the task.
        task_name: registered name of the task, or ``None`` when the instance does not
            know it (a task of another instance recovered by id).
        instance_id: id of the instance that made the change.
        attempt: number of the attempt concerned, when there is one.
        duration: seconds taken by the attempt that just ended, when one ran.
        error_type: qualified name of the exception that ended the attempt.
    """

    event: TransitionEvent
    task_id: str
    task_name: str | None
    instance_id: str
    attempt: int | None = None
    duration: float | None = None
    error_type: str | None = None


TransitionListener = Callable[[TaskTransition], None]


@dataclass
class TaskTimeline:
    """Writes one log line per task transition of an instance and notifies its listeners.

    The lines read as a timeline of each task, every one starting with ``name [id]``::

        emails.send [3f2a...] added
        emails.send [3f2a...] started attempt 1/3
        emails.send [3f2a...] failed attempt 1/3 with TimeoutError, retrying in 2.0 s
        emails.send [3f2a...] started attempt 2/3
        emails.send [3f2a...] succeeded in 0.012 s

    Levels: INFO per transition, WARNING for a retry and an interruption, ERROR with the
    traceback for a final failure. Argument values appear only in a DEBUG line, truncated.
    Listeners are called on the event loop and must not block; one that raises is logged
    and skipped.
    """

    instance_id: str
    listeners: list[TransitionListener] = field(default_factory=list)
    _listener_errors: dict[int, int] = field(default_factory=dict, repr=False)

    def added(self, records: Iterable[TaskRecord]) -> None:
        """Log tasks just written to the store as PENDING."""
        for record in records:
            bound = self._bind_record(record, event="added")
            bound.info("{} [{}] added", record.name, record.id)
            bound.opt(lazy=True).debug(
                "{} [{}] arguments: {}",
                lambda record=record: record.name,
                lambda record=record: record.id,
                lambda record=record: _arguments_preview(record),
            )
            self._notify(TaskTransition("added", record.id, record.name, self.instance_id))

    def started(self, record: TaskRecord) -> None:
        """Log the start of an attempt of a claimed task."""
        self._bind_record(record, attempt=record.attempts, event="started").info(
            "{} [{}] started attempt {}/{}",
            record.name,
            record.id,
            record.attempts,
            record.max_attempts,
        )
        self._notify(
            TaskTransition(
                "started", record.id, record.name, self.instance_id, attempt=record.attempts
            )
        )

    def retrying(self, record: TaskRecord, outcome: AttemptOutcome, delay: float) -> None:
        """Log a failed attempt that another attempt follows after ``delay`` seconds."""
        self._bind_record(
            record,
            attempt=record.attempts,
            event="retrying",
            error_type=outcome.error_type,
            delay=round(delay, 3),
            duration=round(outcome.duration, 6),
        ).warning(
            "{} [{}] failed attempt {}/{} with {}, retrying in {} s",
            record.name,
            record.id,
            record.attempts,
            record.max_attempts,
            outcome.error_type,
            _format_delay(delay),
        )
        self._notify_ended("retrying", record, outcome)

    def succeeded(self, record: TaskRecord, outcome: AttemptOutcome) -> None:
        """Log an attempt that returned, ending the task as SUCCESS."""
        self._bind_record(
            record,
            attempt=record.attempts,
            event="succeeded",
            duration=round(outcome.duration, 6),
        ).info("{} [{}] succeeded in {:.3f} s", record.name, record.id, outcome.duration)
        self._notify_ended("succeeded", record, outcome)

    def failed(self, record: TaskRecord, outcome: AttemptOutcome) -> None:
        """Log an attempt that ended the task as FAILED, with the traceback."""
        retry_note = ""
        if record.attempts < record.max_attempts:
            retry_note = " (this exception type is not retried)"
        self._bind_record(
            record,
            attempt=record.attempts,
            event="failed",
            error_type=outcome.error_type,
            duration=round(outcome.duration, 6),
        ).error(
            "{} [{}] failed attempt {}/{} with {}: {}{}\n{}",
            record.name,
            record.id,
            record.attempts,
            record.max_attempts,
            outcome.error_type,
            outcome.error_message,
            retry_note,
            (outcome.traceback or "").rstrip("\n"),
        )
        self._notify_ended("failed", record, outcome)

    def not_registered(self, record: TaskRecord, message: str) -> None:
        """Log a claimed task that fails at once because no task of its name is registered."""
        self._bind_record(
            record,
            attempt=record.attempts,
            event="failed",
            error_type="app_taskflow.errors.TaskDefinitionError",
        ).error("{} [{}] failed: {}", record.name, record.id, message)
        self._notify(
            TaskTransition(
                "failed",
                record.id,
                record.name,
                self.instance_id,
                attempt=record.attempts,
                error_type="app_taskflow.errors.TaskDefinitionError",
            )
        )

    def cancelled(self, record: TaskRecord, outcome: AttemptOutcome | None = None) -> None:
        """Log a cancelled task: before it ran when ``outcome`` is None, else during it."""
        if outcome is None:
            waited_for = "it ran" if record.attempts == 0 else f"attempt {record.attempts + 1}"
            self._bind_record(record, event="cancelled").info(
                "{} [{}] cancelled before {}", record.name, record.id, waited_for
            )
            self._notify(TaskTransition("cancelled", record.id, record.name, self.instance_id))
            return
        self._bind_record(
            record,
            attempt=record.attempts,
            event="cancelled",
            duration=round(outcome.duration, 6),
        ).info(
            "{} [{}] cancelled during attempt {}/{} after {:.3f} s",
            record.name,
            record.id,
            record.attempts,
            record.max_attempts,
            outcome.duration,
        )
        self._notify_ended("cancelled", record, outcome)

    def stop_requested(self, record: TaskRecord) -> None:
        """Log a cancel request sent to a running task."""
        self._bind_record(record, event="stop_requested").info(
            "{} [{}] asked to stop", record.name, record.id
        )

    def queued_by_request(self, record: TaskRecord) -> None:
        """Log a FAILED or INTERRUPTED task queued again through the API."""
        self._bind_record(record, event="queued").info(
            "{} [{}] queued again by request, attempt {} next",
            record.name,
            record.id,
            record.attempts + 1,
        )

    def result_discarded(self, record: TaskRecord, outcome: AttemptOutcome) -> None:
        """Log an attempt whose result was not stored because another instance took over."""
        self._bind_record(record, attempt=record.attempts, event="result_discarded").warning(
            "{} [{}] attempt {}/{} ended as {}, but another instance took the task over "
            "after this instance's lease expired; the result is not stored",
            record.name,
            record.id,
            record.attempts,
            record.max_attempts,
            outcome.status.value,
        )

    def recovered(self, interrupted: Iterable[str], requeued: Iterable[str], released: int) -> None:
        """Log the tasks this instance took back from instances whose lease expired."""
        for task_id in interrupted:
            self._bind(task_id, event="interrupted").warning(
                "[{}] interrupted: it was running on an instance whose lease expired", task_id
            )
            self._notify(TaskTransition("interrupted", task_id, None, self.instance_id))
        for task_id in requeued:
            self._bind(task_id, event="requeued").warning(
                "[{}] queued again: it was running on an instance whose lease expired", task_id
            )
        if released:
            log.bind(instance_id=self.instance_id).info(
                "Took back {} pending task(s) of instances whose lease expired", released
            )

    def left_at_shutdown(
        self,
        names: dict[str, str],
        interrupted: Iterable[str],
        requeued: Iterable[str],
        released: Iterable[str],
        tags: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """Log the tasks this instance handed back to the store at shutdown.

        ``names`` and ``tags`` map task ids to the names and tags this instance has of them.
        """
        tags = tags or {}
        for task_id in interrupted:
            name = names.get(task_id)
            self._bind(task_id, name, tags=tags.get(task_id), event="interrupted").warning(
                "{} left unfinished at shutdown: INTERRUPTED", _prefix(name, task_id)
            )
            self._notify(TaskTransition("interrupted", task_id, name, self.instance_id))
        for status, task_ids, event in (
            ("queued again", requeued, "requeued"),
            ("released to the store, still PENDING", released, "released"),
        ):
            for task_id in task_ids:
                name = names.get(task_id)
                self._bind(task_id, name, tags=tags.get(task_id), event=event).info(
                    "{} left unfinished at shutdown: {}", _prefix(name, task_id), status
                )

    def _bind(self, task_id: str, task_name: str | None = None, **fields: Any) -> Logger:
        return bind_task(task_id, task_name, instance_id=self.instance_id, **fields)

    def _bind_record(self, record: TaskRecord, **fields: Any) -> Logger:
        return bind_task(
            record.id, record.name, instance_id=self.instance_id, tags=record.tags, **fields
        )

    def _notify_ended(
        self, event: TransitionEvent, record: TaskRecord, outcome: AttemptOutcome
    ) -> None:
        self._notify(
            TaskTransition(
                event,
                record.id,
                record.name,
                self.instance_id,
                attempt=record.attempts,
                duration=outcome.duration,
                error_type=outcome.error_type,
            )
        )

    def _notify(self, transition: TaskTransition) -> None:
        for listener in self.listeners:
            try:
                listener(transition)
            except Exception as error:
                key = id(listener)
                count = self._listener_errors.get(key, 0) + 1
                self._listener_errors[key] = count
                if count == 1 or count % _LISTENER_ERROR_EVERY == 0:
                    log.opt(exception=error).error(
                        "Transition listener {!r} failed ({} time(s) so far); the task is "
                        "not affected",
                        listener,
                        count,
                    )


def _prefix(task_name: str | None, task_id: str) -> str:
    return f"{task_name} [{task_id}]" if task_name else f"[{task_id}]"


def _format_delay(delay: float) -> str:
    # Tenths suit real delays; a short one (tests, delay_scale) keeps its milliseconds. The
    # delay is measured from the clock after the attempt, so 1 s arrives as 0.9996 s.
    rounded = round(delay, 3)
    return f"{rounded:.1f}" if rounded >= 1 else f"{rounded:.3f}"


def _arguments_preview(record: TaskRecord) -> str:
    encoded = json.dumps({"args": record.args, "kwargs": record.kwargs}, ensure_ascii=False)
    return truncate(encoded, ARGUMENTS_PREVIEW_CHARS)
