"""Records, statuses and query models shared by the stores, the runner and the API."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def new_task_id() -> str:
    """Return a new random task id (a UUID4 string)."""
    return str(uuid.uuid4())


class TaskStatus(StrEnum):
    """The lifecycle state of a task.

    A task waiting for its next attempt stays ``PENDING`` with ``attempts > 0`` and
    ``scheduled_at`` set to the time of that attempt.
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    INTERRUPTED = "INTERRUPTED"
    CANCELLED = "CANCELLED"


ACTIVE_STATUSES = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})
"""Statuses of tasks that are not finished yet."""

TERMINAL_STATUSES = frozenset(
    {TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.INTERRUPTED, TaskStatus.CANCELLED}
)
"""Statuses that end a task; only an explicit retry leaves FAILED or INTERRUPTED."""

RETRYABLE_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.INTERRUPTED})
"""Statuses from which ``POST /tasks/{id}/retry`` starts a new attempt."""

IDEMPOTENCY_HOLDING_STATUSES = frozenset(
    {TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.SUCCESS}
)
"""Statuses in which a task keeps its idempotency key reserved."""


TAG_KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
"""The pattern of a whole tag key: a letter or underscore, then up to 63 letters, digits, _ . -"""

MAX_TAG_VALUE_CHARS = 256
"""Characters a tag value may have at most."""

MAX_TAGS = 20
"""Tags one task may carry at most."""


class TaskOrigin(BaseModel):
    """The HTTP request whose route added a task."""

    method: str
    path: str = Field(description="The request path, without the query string.")
    request_id: str | None = Field(
        default=None, description="The request id header's value, when the request had one."
    )


class LogEntry(BaseModel):
    """One entry written by ``task_log()`` or by the runner."""

    timestamp: datetime
    level: str = "INFO"
    message: str
    attempt: int = 0
    extra: dict[str, Any] = Field(default_factory=dict)


class AttemptRecord(BaseModel):
    """One attempt of a task: when it ran, on which instance and how it ended."""

    number: int
    instance_id: str | None = None
    started_at: datetime
    finished_at: datetime | None = None
    status: TaskStatus = TaskStatus.RUNNING
    error_type: str | None = None
    error_message: str | None = None


class TaskSummary(BaseModel):
    """A task as listed by ``GET /tasks``: everything but its logs, attempts and traceback."""

    id: str
    name: str
    status: TaskStatus
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    attempts: int = 0
    max_attempts: int = 1
    created_at: datetime
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration: float | None = Field(default=None, description="Seconds taken by the last attempt.")
    error_type: str | None = None
    error_message: str | None = None
    owner: str | None = Field(
        default=None, description="Id of the app instance that owns the task."
    )
    idempotency_key: str | None = None
    requeue_on_interrupt: bool = False
    cancel_requested: bool = False
    tags: dict[str, str] = Field(
        default_factory=dict, description="Labels given to add_task(..., tags=...)."
    )


class TaskRecord(TaskSummary):
    """A task with its full history, as returned by ``GET /tasks/{id}``."""

    traceback: str | None = None
    logs: list[LogEntry] = Field(default_factory=list)
    attempt_history: list[AttemptRecord] = Field(default_factory=list)
    origin: TaskOrigin | None = Field(
        default=None, description="The request that added the task; null outside a request."
    )
    trace_parent: str | None = Field(
        default=None,
        description=(
            "The OpenTelemetry span that was current when the task was added, in W3C "
            "traceparent form; each attempt's span links to it."
        ),
    )

    def summary(self) -> TaskSummary:
        """Return the record without its logs, attempts, traceback, origin and trace parent."""
        return TaskSummary.model_validate(self.model_dump(exclude=_DETAIL_FIELDS))


_DETAIL_FIELDS = set(TaskRecord.model_fields) - set(TaskSummary.model_fields)
"""Fields of a record that its summary leaves out."""


class AttemptOutcome(BaseModel):
    """The end of an attempt, as the runner reports it to the store.

    ``status`` is ``PENDING`` when another attempt follows at ``scheduled_at``.
    """

    status: TaskStatus
    finished_at: datetime
    duration: float
    scheduled_at: datetime | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None


class TaskQuery(BaseModel):
    """Filters, order and page position for listing tasks.

    Tasks are ordered by ``created_at``, then id. ``cursor`` (from ``TaskPage.next_cursor``)
    starts the page after the task it names and takes precedence over ``offset``; it stays
    fast however deep the page is.
    """

    statuses: list[TaskStatus] | None = None
    name: str | None = None
    tags: dict[str, str] | None = Field(
        default=None, description="Keep tasks that carry every one of these tags."
    )
    search: str | None = Field(
        default=None,
        description=(
            "Case-insensitive text found in the id, name, arguments (as JSON), error type, "
            "error message or a log message."
        ),
    )
    order: Literal["newest", "oldest"] = "newest"
    limit: int = Field(default=50, ge=1, le=1000)
    offset: int = Field(default=0, ge=0)
    cursor: str | None = None


class TaskPage(BaseModel):
    """One page of tasks."""

    items: list[TaskSummary]
    limit: int
    offset: int
    has_more: bool
    next_cursor: str | None = Field(
        default=None, description="Pass as cursor to read the next page; null on the last."
    )


def encode_cursor(task: TaskSummary) -> str:
    """Return the page cursor that points after ``task``."""
    return f"{task.created_at.isoformat()}_{task.id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Return the ``created_at`` and id a cursor points after.

    Raises:
        ValueError: the cursor was not made by ``encode_cursor``.
    """
    created_at, separator, task_id = cursor.partition("_")
    try:
        moment = datetime.fromisoformat(created_at)
    except ValueError:
        moment = None
    if not separator or not task_id or moment is None or moment.tzinfo is None:
        raise ValueError(
            f"Invalid cursor {cursor!r}: pass the next_cursor of a previous page unchanged."
        )
    return moment, task_id


class DurationStats(BaseModel):
    """Durations in seconds of finished attempts that ended a task."""

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None


class NameMetrics(BaseModel):
    """Counts, success rate and durations of one task name."""

    counts: dict[TaskStatus, int]
    success_rate: float | None = Field(
        default=None, description="SUCCESS / (SUCCESS + FAILED + INTERRUPTED), or null."
    )
    duration: DurationStats


class TaskMetrics(NameMetrics):
    """Counts, success rate and durations overall and per task name."""

    by_name: dict[str, NameMetrics] = Field(default_factory=dict)


class TaskChange(BaseModel):
    """A change to one task, as ``TaskStore.watch()`` delivers it to every instance.

    ``summary`` is the task after a change of its record; ``log`` is a new log entry.
    A change with ``resync`` set carries nothing else: the watcher fell behind and missed
    changes, so a consumer that mirrors tasks should read them from the store again.
    """

    task_id: str = ""
    summary: TaskSummary | None = None
    log: LogEntry | None = None
    resync: bool = False


class RecoveryReport(BaseModel):
    """Tasks taken back from instances whose lease expired or that shut down."""

    released: list[str] = Field(
        default_factory=list, description="PENDING tasks that any instance may now claim."
    )
    requeued: list[str] = Field(
        default_factory=list,
        description="RUNNING tasks declared requeue_on_interrupt, now PENDING again.",
    )
    interrupted: list[str] = Field(
        default_factory=list, description="RUNNING tasks now INTERRUPTED."
    )
