"""Tables of the SQL task store and their mapping to the task models."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from app_taskflow.models import (
    IDEMPOTENCY_HOLDING_STATUSES,
    AttemptRecord,
    LogEntry,
    TaskRecord,
    TaskSummary,
)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp column that takes and returns aware UTC datetimes.

    SQLite has no time zone type, so values are stored there as naive UTC and made aware
    again when read. Naive datetimes are rejected rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"Naive datetime {value.isoformat()} cannot be stored, because the task "
                "store takes aware datetimes. Pass an aware UTC datetime, such as "
                "datetime.now(UTC)."
            )
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class TaskflowTable(SQLModel, registry=registry()):
    """Base of the task store's tables.

    The tables live in their own registry, so an app that calls
    ``SQLModel.metadata.create_all`` on its own database does not create them there.
    """


_HOLDING_STATUS_SQL = ", ".join(
    f"'{status.value}'" for status in sorted(IDEMPOTENCY_HOLDING_STATUSES)
)
HOLDS_IDEMPOTENCY_KEY = text(f"status IN ({_HOLDING_STATUS_SQL})")
"""The condition of the unique index on idempotency keys: the task keeps its key reserved."""

OWNERLESS_PENDING = text("status = 'PENDING' AND owner IS NULL")
"""The condition of the index that ``claim_next`` reads, written as its queries must be.

SQLite uses a partial index only for a query whose conditions contain the index's
condition as written, with the status as a literal rather than a bound parameter.
"""

# SQLite makes only a column declared exactly INTEGER PRIMARY KEY an alias of the rowid.
_ROW_ID = BigInteger().with_variant(Integer(), "sqlite")


class TaskRow(TaskflowTable, table=True):
    """One task, whose ``args`` and ``kwargs`` contain JSON text and ``status`` a status value."""

    __tablename__ = "taskflow_tasks"
    __table_args__ = (
        # Pages are ordered by (created_at, id), so each index that serves a page ends so.
        Index("ix_taskflow_tasks_created_at_id", "created_at", "id"),
        Index("ix_taskflow_tasks_status_created_at_id", "status", "created_at", "id"),
        Index("ix_taskflow_tasks_name_created_at_id", "name", "created_at", "id"),
        Index("ix_taskflow_tasks_finished_at_id", "finished_at", "id"),
        Index("ix_taskflow_tasks_owner", "owner"),
        # claim_next reads the tasks that any instance may run, oldest first.
        Index(
            "ix_taskflow_tasks_ownerless_pending",
            "created_at",
            "id",
            sqlite_where=OWNERLESS_PENDING,
            postgresql_where=OWNERLESS_PENDING,
        ),
        # At most one task holds a key at a time. The database enforces it, so two processes
        # that create the same key at once cannot both insert.
        Index(
            "ux_taskflow_tasks_idempotency_key",
            "idempotency_key",
            unique=True,
            sqlite_where=HOLDS_IDEMPOTENCY_KEY,
            postgresql_where=HOLDS_IDEMPOTENCY_KEY,
        ),
    )

    id: str = Field(primary_key=True)
    name: str
    status: str = Field(sa_type=String(16))
    args: str = Field(sa_type=Text)
    kwargs: str = Field(sa_type=Text)
    attempts: int = 0
    max_attempts: int = 1
    created_at: datetime = Field(sa_type=UtcDateTime)
    scheduled_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    duration: float | None = None
    error_type: str | None = None
    error_message: str | None = Field(default=None, sa_type=Text)
    traceback: str | None = Field(default=None, sa_type=Text)
    owner: str | None = None
    idempotency_key: str | None = None
    requeue_on_interrupt: bool = False
    cancel_requested: bool = False
    tags: str = Field(default="{}", sa_type=Text, sa_column_kwargs={"server_default": "{}"})
    origin: str | None = Field(default=None, sa_type=Text)
    """JSON of the ``TaskOrigin``, or ``None``."""
    trace_parent: str | None = None


class AttemptRow(TaskflowTable, table=True):
    """One attempt of a task, keyed by the task id and the attempt number."""

    __tablename__ = "taskflow_attempts"

    task_id: str = Field(foreign_key="taskflow_tasks.id", primary_key=True)
    number: int = Field(primary_key=True)
    instance_id: str | None = None
    started_at: datetime = Field(sa_type=UtcDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    status: str = Field(sa_type=String(16))
    error_type: str | None = None
    error_message: str | None = Field(default=None, sa_type=Text)


class LogRow(TaskflowTable, table=True):
    """One log entry of a task. The autoincrement ``id`` keeps the order of appends."""

    __tablename__ = "taskflow_logs"
    __table_args__ = (Index("ix_taskflow_logs_task_id_id", "task_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_ROW_ID)
    task_id: str = Field(foreign_key="taskflow_tasks.id")
    timestamp: datetime = Field(sa_type=UtcDateTime)
    level: str
    message: str = Field(sa_type=Text)
    attempt: int = 0
    extra: str = Field(sa_type=Text)


class TagRow(TaskflowTable, table=True):
    """One tag of a task, a copy of one item of the task's ``tags`` column for filtering.

    The row repeats the task's ``created_at``, so that the index reads the tasks of one tag
    in page order. Tags never change after a task is created.
    """

    __tablename__ = "taskflow_tags"
    __table_args__ = (
        Index(
            "ix_taskflow_tags_key_value_created_at_task_id", "key", "value", "created_at", "task_id"
        ),
    )

    task_id: str = Field(foreign_key="taskflow_tasks.id", primary_key=True)
    key: str = Field(primary_key=True)
    value: str
    created_at: datetime = Field(sa_type=UtcDateTime)


class LeaseRow(TaskflowTable, table=True):
    """The lease of one app instance, renewed by its heartbeat."""

    __tablename__ = "taskflow_leases"

    instance_id: str = Field(primary_key=True)
    expires_at: datetime = Field(sa_type=UtcDateTime)


class ChangeRow(TaskflowTable, table=True):
    """One entry of the SQLite change journal, which the change feed of every store reads.

    An entry contains the summary of a task as a write left it (JSON of its column values),
    or the id of a new log entry. The ``id`` orders entries by commit, because SQLite runs one
    write transaction at a time, and AUTOINCREMENT never reuses one.
    """

    __tablename__ = "taskflow_changes"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: int | None = Field(default=None, primary_key=True)
    task_id: str
    summary: str | None = Field(default=None, sa_type=Text)
    log_id: int | None = None


class CountRow(TaskflowTable, table=True):
    """The tasks of one name in one status, counted by triggers on ``taskflow_tasks``.

    On PostgreSQL the count is the sum of this row and the rows of ``taskflow_count_deltas``
    for the same name and status. ``sql_counts.py`` creates both tables and the triggers.
    """

    __tablename__ = "taskflow_counts"
    __table_args__ = ({"sqlite_with_rowid": False},)

    name: str = Field(primary_key=True)
    status: str = Field(primary_key=True, sa_type=String(16))
    tasks: int = Field(sa_type=BigInteger)
    timed: int = Field(sa_type=BigInteger)
    """Tasks whose ``duration`` is not null."""
    total_duration: float
    """Sum of their durations in seconds."""


COUNT_DELTA_TABLE = Table(
    "taskflow_count_deltas",
    TaskflowTable.metadata,
    Column("name", String, nullable=False),
    Column("status", String(16), nullable=False),
    Column("tasks", BigInteger, nullable=False),
    Column("timed", BigInteger, nullable=False),
    Column("total_duration", Float, nullable=False),
)
"""PostgreSQL only: changes to ``taskflow_counts`` that are not folded into it yet.

The table has no primary key, because rows are only appended and then deleted together.
"""


class SchemaVersionRow(TaskflowTable, table=True):
    """The single row that stores the number of the last migration applied."""

    __tablename__ = "taskflow_schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int


TASK_TABLE = TaskflowTable.metadata.tables["taskflow_tasks"]
"""The table of ``TaskRow``, for statements that bypass the ORM."""

LOG_TABLE = TaskflowTable.metadata.tables["taskflow_logs"]
"""The table of ``LogRow``, for statements that bypass the ORM."""

CHANGE_TABLE = TaskflowTable.metadata.tables["taskflow_changes"]
"""The table of ``ChangeRow``, for statements that bypass the ORM."""

ATTEMPT_TABLE = TaskflowTable.metadata.tables["taskflow_attempts"]
"""The table of ``AttemptRow``, for statements that bypass the ORM."""

TAG_TABLE = TaskflowTable.metadata.tables["taskflow_tags"]
"""The table of ``TagRow``, for statements that bypass the ORM."""

_TASK_FIELDS = tuple(
    name for name in TaskRecord.model_fields if name not in ("logs", "attempt_history")
)

SUMMARY_COLUMNS = tuple(getattr(TaskRow, name) for name in TaskSummary.model_fields)
"""The task columns that ``summary_from_mapping`` reads: all but the traceback."""

TASK_COLUMNS = tuple(TASK_TABLE.c[name] for name in _TASK_FIELDS)
"""The task columns that ``record_from_mapping`` reads."""


def task_values(record: TaskRecord) -> dict[str, Any]:
    """Return the column values of a task, without its logs and attempts."""
    values = {name: getattr(record, name) for name in _TASK_FIELDS}
    values["status"] = record.status.value
    # Non-ASCII text is kept as is, so that a search for "Jürgen" finds it in the JSON.
    values["args"] = json.dumps(record.args, ensure_ascii=False)
    values["kwargs"] = json.dumps(record.kwargs, ensure_ascii=False)
    values["tags"] = json.dumps(record.tags, ensure_ascii=False)
    values["origin"] = None if record.origin is None else record.origin.model_dump_json()
    return values


def tag_values(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the ``TagRow`` values of task rows made by ``task_values``."""
    return [
        {"task_id": row["id"], "key": key, "value": value, "created_at": row["created_at"]}
        for row in rows
        if row["tags"] != "{}"
        for key, value in json.loads(row["tags"]).items()
    ]


def record_from_row(
    row: TaskRow, attempts: Iterable[AttemptRow] = (), logs: Iterable[LogRow] = ()
) -> TaskRecord:
    """Build a task record from its row and the attempt and log rows given, in order."""
    values = _decode_arguments({name: getattr(row, name) for name in _TASK_FIELDS})
    values["attempt_history"] = [
        AttemptRecord.model_validate(attempt, from_attributes=True) for attempt in attempts
    ]
    values["logs"] = [log_entry_from_mapping(log.model_dump()) for log in logs]
    return TaskRecord.model_validate(values)


def record_from_mapping(
    values: Mapping[Any, Any], attempts: Iterable[AttemptRecord] = ()
) -> TaskRecord:
    """Build a task record without logs from a result row of ``TASK_COLUMNS``."""
    decoded = _decode_arguments({name: values[name] for name in _TASK_FIELDS})
    decoded["attempt_history"] = list(attempts)
    return TaskRecord.model_validate(decoded)


def attempt_from_mapping(values: Mapping[Any, Any]) -> AttemptRecord:
    """Build an attempt record from a result row of the attempt table."""
    return AttemptRecord.model_validate(dict(values))


def summary_from_mapping(values: Mapping[Any, Any]) -> TaskSummary:
    """Build a task summary from a result row of ``SUMMARY_COLUMNS``."""
    return TaskSummary.model_validate(_decode_arguments(values))


def summary_from_row(row: TaskRow) -> TaskSummary:
    """Build the summary of a task from its row."""
    return summary_from_mapping({name: getattr(row, name) for name in TaskSummary.model_fields})


def log_values(task_id: str, entry: LogEntry) -> dict[str, Any]:
    """Return the column values of one log entry of a task, without its id."""
    return {
        "task_id": task_id,
        "timestamp": entry.timestamp,
        "level": entry.level,
        "message": entry.message,
        "attempt": entry.attempt,
        # Log extras are for display, so a value that JSON cannot hold is stored as its str().
        "extra": json.dumps(entry.extra, default=str),
    }


def log_entry_from_mapping(values: Mapping[Any, Any]) -> LogEntry:
    """Build a log entry from a result row with the columns of ``LogRow``."""
    return LogEntry(
        timestamp=values["timestamp"],
        level=values["level"],
        message=values["message"],
        attempt=values["attempt"],
        extra=json.loads(values["extra"]),
    )


def _decode_arguments(values: Mapping[Any, Any]) -> dict[str, Any]:
    """Decode the columns that hold JSON text: arguments, tags and origin."""
    decoded = dict(values)
    for name in _JSON_COLUMNS:
        text_value = values.get(name)
        if text_value is not None:
            decoded[name] = json.loads(text_value)
    return decoded


_JSON_COLUMNS = ("args", "kwargs", "tags", "origin")
