"""Tables of the SQL task store, their mapping to the task models, and their migrations."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, DateTime, Dialect, Index, String, Text, TypeDecorator, text
from sqlalchemy.orm import registry
from sqlmodel import Field, Session, SQLModel

from app_taskflow.errors import SchemaVersionError
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
_HOLDS_KEY = text(f"status IN ({_HOLDING_STATUS_SQL})")


class TaskRow(TaskflowTable, table=True):
    """One task, whose ``args`` and ``kwargs`` contain JSON text and ``status`` a status value."""

    __tablename__ = "taskflow_tasks"
    __table_args__ = (
        Index("ix_taskflow_tasks_status_created_at", "status", "created_at"),
        Index("ix_taskflow_tasks_name_created_at", "name", "created_at"),
        Index("ix_taskflow_tasks_created_at", "created_at"),
        Index("ix_taskflow_tasks_owner", "owner"),
        Index("ix_taskflow_tasks_claimable", "status", "owner", "scheduled_at"),
        # At most one task holds a key at a time. The database enforces it, so two processes
        # that create the same key at once cannot both insert.
        Index(
            "ux_taskflow_tasks_idempotency_key",
            "idempotency_key",
            unique=True,
            sqlite_where=_HOLDS_KEY,
            postgresql_where=_HOLDS_KEY,
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

    id: int | None = Field(default=None, primary_key=True)
    task_id: str = Field(foreign_key="taskflow_tasks.id")
    timestamp: datetime = Field(sa_type=UtcDateTime)
    level: str
    message: str = Field(sa_type=Text)
    attempt: int = 0
    extra: str = Field(sa_type=Text)


class LeaseRow(TaskflowTable, table=True):
    """The lease of one app instance, renewed by its heartbeat."""

    __tablename__ = "taskflow_leases"

    instance_id: str = Field(primary_key=True)
    expires_at: datetime = Field(sa_type=UtcDateTime)


class SchemaVersionRow(TaskflowTable, table=True):
    """The single row that stores the number of the last migration applied."""

    __tablename__ = "taskflow_schema_version"

    id: int = Field(default=1, primary_key=True)
    version: int


def _create_version_1_tables(connection: Connection) -> None:
    # This builds the tables from the classes above. When a later migration changes one of
    # them, write the version-1 DDL out here, so that a new database still passes through
    # every version in order.
    names = ["taskflow_tasks", "taskflow_attempts", "taskflow_logs", "taskflow_leases"]
    tables = [TaskflowTable.metadata.tables[name] for name in names]
    TaskflowTable.metadata.create_all(connection, tables=tables)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_version_1_tables,)
"""Schema migrations in order: ``MIGRATIONS[n]`` takes the schema from version n to n + 1."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version that this code reads and writes."""


def migrate(session: Session, location: str) -> None:
    """Apply the migrations that the database at ``location`` has not seen yet.

    Runs in the caller's transaction, so concurrent starts apply each migration once.

    Raises:
        SchemaVersionError: the database was migrated by a newer app-taskflow.
    """
    # NOTE: on PostgreSQL, two first starts at once can both try to create the version
    # table. Supporting PostgreSQL needs an advisory lock here.
    connection = session.connection()
    version_table = TaskflowTable.metadata.tables["taskflow_schema_version"]
    TaskflowTable.metadata.create_all(connection, tables=[version_table])

    row = session.get(SchemaVersionRow, 1)
    stored_version = 0 if row is None else row.version
    if stored_version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"The task store at {location} has schema version {stored_version}, but this "
            f"version of app-taskflow reads schema versions up to {SCHEMA_VERSION}. Upgrade "
            "app-taskflow to open this store."
        )

    for migration in MIGRATIONS[stored_version:]:
        migration(connection)
    if row is None:
        session.add(SchemaVersionRow(version=SCHEMA_VERSION))
    else:
        row.version = SCHEMA_VERSION


_TASK_FIELDS = tuple(
    name for name in TaskRecord.model_fields if name not in ("logs", "attempt_history")
)

SUMMARY_COLUMNS = tuple(getattr(TaskRow, name) for name in TaskSummary.model_fields)
"""The task columns that ``summary_from_mapping`` reads: all but the traceback."""


def task_values(record: TaskRecord) -> dict[str, Any]:
    """Return the column values of a task, without its logs and attempts."""
    values = {name: getattr(record, name) for name in _TASK_FIELDS}
    values["status"] = record.status.value
    values["args"] = json.dumps(record.args)
    values["kwargs"] = json.dumps(record.kwargs)
    return values


def record_from_row(
    row: TaskRow, attempts: Iterable[AttemptRow] = (), logs: Iterable[LogRow] = ()
) -> TaskRecord:
    """Build a task record from its row and the attempt and log rows given, in order."""
    values = _decode_arguments({name: getattr(row, name) for name in _TASK_FIELDS})
    values["attempt_history"] = [
        AttemptRecord.model_validate(attempt, from_attributes=True) for attempt in attempts
    ]
    values["logs"] = [
        LogEntry(
            timestamp=log.timestamp,
            level=log.level,
            message=log.message,
            attempt=log.attempt,
            extra=json.loads(log.extra),
        )
        for log in logs
    ]
    return TaskRecord.model_validate(values)


def summary_from_mapping(values: Mapping[Any, Any]) -> TaskSummary:
    """Build a task summary from a result row of ``SUMMARY_COLUMNS``."""
    return TaskSummary.model_validate(_decode_arguments(values))


def log_row(task_id: str, entry: LogEntry) -> LogRow:
    """Return the row of one log entry of a task."""
    return LogRow(
        task_id=task_id,
        timestamp=entry.timestamp,
        level=entry.level,
        message=entry.message,
        attempt=entry.attempt,
        # Log extras are for display, so a value that JSON cannot hold is stored as its str().
        extra=json.dumps(entry.extra, default=str),
    )


def _decode_arguments(values: Mapping[Any, Any]) -> dict[str, Any]:
    decoded = dict(values)
    decoded["args"] = json.loads(values["args"])
    decoded["kwargs"] = json.loads(values["kwargs"])
    return decoded
