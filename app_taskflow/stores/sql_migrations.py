"""Numbered schema migrations of the SQL task store, and the step that applies them."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlmodel import Session

from app_taskflow.errors import SchemaVersionError
from app_taskflow.stores.sql_counts import add_count_tables
from app_taskflow.stores.sql_schema import (
    HOLDS_IDEMPOTENCY_KEY,
    OWNERLESS_PENDING,
    SchemaVersionRow,
    TaskflowTable,
)

MIGRATION_LOCK_KEY = 0x7461736B666C6F77
"""PostgreSQL advisory lock taken while migrating: the ASCII bytes of "taskflow"."""

CHANGE_CHANNEL = "taskflow_changes"
"""PostgreSQL channel on which the triggers of migration 2 notify task and log changes."""

_MAX_PAYLOAD = 7900
"""Bytes of a notification payload; PostgreSQL rejects 8000 and more."""

# The tables as migration 1 created them. Later migrations change them, so they are written
# out here instead of taken from the models, which describe the latest version.
_VERSION_1 = MetaData()
_TIMESTAMP = DateTime(timezone=True)
Table(
    "taskflow_tasks",
    _VERSION_1,
    Column("id", String, primary_key=True),
    Column("name", String, nullable=False),
    Column("status", String(16), nullable=False),
    Column("args", Text, nullable=False),
    Column("kwargs", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("created_at", _TIMESTAMP, nullable=False),
    Column("scheduled_at", _TIMESTAMP),
    Column("started_at", _TIMESTAMP),
    Column("finished_at", _TIMESTAMP),
    Column("duration", Float),
    Column("error_type", String),
    Column("error_message", Text),
    Column("traceback", Text),
    Column("owner", String),
    Column("idempotency_key", String),
    Column("requeue_on_interrupt", Boolean, nullable=False),
    Column("cancel_requested", Boolean, nullable=False),
    Index("ix_taskflow_tasks_status_created_at", "status", "created_at"),
    Index("ix_taskflow_tasks_name_created_at", "name", "created_at"),
    Index("ix_taskflow_tasks_created_at", "created_at"),
    Index("ix_taskflow_tasks_owner", "owner"),
    Index("ix_taskflow_tasks_claimable", "status", "owner", "scheduled_at"),
    Index(
        "ux_taskflow_tasks_idempotency_key",
        "idempotency_key",
        unique=True,
        sqlite_where=HOLDS_IDEMPOTENCY_KEY,
        postgresql_where=HOLDS_IDEMPOTENCY_KEY,
    ),
)
Table(
    "taskflow_attempts",
    _VERSION_1,
    Column("task_id", String, ForeignKey("taskflow_tasks.id"), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("instance_id", String),
    Column("started_at", _TIMESTAMP, nullable=False),
    Column("finished_at", _TIMESTAMP),
    Column("status", String(16), nullable=False),
    Column("error_type", String),
    Column("error_message", Text),
)
Table(
    "taskflow_logs",
    _VERSION_1,
    Column("id", Integer, primary_key=True),
    Column("task_id", String, ForeignKey("taskflow_tasks.id"), nullable=False),
    Column("timestamp", _TIMESTAMP, nullable=False),
    Column("level", String, nullable=False),
    Column("message", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("extra", Text, nullable=False),
    Index("ix_taskflow_logs_task_id_id", "task_id", "id"),
)
Table(
    "taskflow_leases",
    _VERSION_1,
    Column("instance_id", String, primary_key=True),
    Column("expires_at", _TIMESTAMP, nullable=False),
)


def _create_version_1_tables(connection: Connection) -> None:
    _VERSION_1.create_all(connection)


# Both databases: page indexes that end in (created_at, id), an index for prune and one
# for claim_next, and the columns of tags, origin and trace parent.
_TASKS_V2 = (
    "DROP INDEX ix_taskflow_tasks_created_at",
    "DROP INDEX ix_taskflow_tasks_status_created_at",
    "DROP INDEX ix_taskflow_tasks_name_created_at",
    "CREATE INDEX ix_taskflow_tasks_created_at_id ON taskflow_tasks (created_at, id)",
    "CREATE INDEX ix_taskflow_tasks_status_created_at_id"
    " ON taskflow_tasks (status, created_at, id)",
    "CREATE INDEX ix_taskflow_tasks_name_created_at_id ON taskflow_tasks (name, created_at, id)",
    "CREATE INDEX ix_taskflow_tasks_finished_at_id ON taskflow_tasks (finished_at, id)",
    "DROP INDEX ix_taskflow_tasks_claimable",
    "CREATE INDEX ix_taskflow_tasks_ownerless_pending ON taskflow_tasks (created_at, id)"
    f" WHERE {OWNERLESS_PENDING.text}",
    "ALTER TABLE taskflow_tasks ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE taskflow_tasks ADD COLUMN origin TEXT",
    "ALTER TABLE taskflow_tasks ADD COLUMN trace_parent VARCHAR",
)

# SQLite: every write transaction appends its changes to a journal that the change feed of
# each store polls (see ChangeRow).
_SQLITE_CHANGES_V2 = (
    """CREATE TABLE taskflow_changes (
        id INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
        task_id VARCHAR NOT NULL,
        summary TEXT,
        log_id INTEGER
    )""",
)

# PostgreSQL: triggers send each task write and each new log entry on CHANGE_CHANNEL, so
# writes by any client reach the change feed without an extra round trip. NOTIFY is sent
# at commit, in commit order. A payload carries the task's summary columns, or the log
# entry. Payloads must stay under 8000 bytes: a larger one leaves out the columns
# that can be long (the listener reads them from the table), or names the log entry by id.
_POSTGRES_CHANGES_V2 = (
    f"""CREATE FUNCTION taskflow_notify_task_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        task jsonb := to_jsonb(NEW) - 'traceback' - 'origin' - 'trace_parent';
        payload text := jsonb_build_object('task', task)::text;
    BEGIN
        IF octet_length(payload) > {_MAX_PAYLOAD} THEN
            payload := jsonb_build_object(
                'task', task - 'args' - 'kwargs' - 'error_message', 'partial', true
            )::text;
        END IF;
        PERFORM pg_notify('{CHANGE_CHANNEL}', payload);
        RETURN NULL;
    END
    $$""",
    f"""CREATE FUNCTION taskflow_notify_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        payload text := jsonb_build_object('log', to_jsonb(NEW))::text;
    BEGIN
        IF octet_length(payload) > {_MAX_PAYLOAD} THEN
            payload := jsonb_build_object('log_id', NEW.id, 'task_id', NEW.task_id)::text;
        END IF;
        PERFORM pg_notify('{CHANGE_CHANNEL}', payload);
        RETURN NULL;
    END
    $$""",
    """CREATE TRIGGER taskflow_tasks_notify AFTER INSERT OR UPDATE ON taskflow_tasks
        FOR EACH ROW EXECUTE FUNCTION taskflow_notify_task_change()""",
    """CREATE TRIGGER taskflow_logs_notify AFTER INSERT ON taskflow_logs
        FOR EACH ROW EXECUTE FUNCTION taskflow_notify_log_change()""",
    # A busy app can write 2**31 log entries in under a year, so log ids become 64-bit.
    "ALTER TABLE taskflow_logs ALTER COLUMN id TYPE BIGINT",
    """DO $$
    BEGIN
        EXECUTE 'ALTER SEQUENCE ' || pg_get_serial_sequence('taskflow_logs', 'id') || ' AS BIGINT';
    END
    $$""",
)


def _add_page_indexes_and_change_feed(connection: Connection) -> None:
    dialect_statements = {"sqlite": _SQLITE_CHANGES_V2, "postgresql": _POSTGRES_CHANGES_V2}
    for statement in _TASKS_V2 + dialect_statements[connection.dialect.name]:
        connection.exec_driver_sql(statement)


# The tags table as migration 3 creates it; taskflow_tasks is named only for the foreign key.
_VERSION_3 = MetaData()
Table("taskflow_tasks", _VERSION_3, Column("id", String, primary_key=True))
_TAGS_V3 = Table(
    "taskflow_tags",
    _VERSION_3,
    Column("task_id", String, ForeignKey("taskflow_tasks.id"), primary_key=True),
    Column("key", String, primary_key=True),
    Column("value", String, nullable=False),
    Column("created_at", _TIMESTAMP, nullable=False),
    Index("ix_taskflow_tags_key_value_created_at_task_id", "key", "value", "created_at", "task_id"),
)

_BACKFILL_BATCH = 1000


def _add_tags_table(connection: Connection) -> None:
    """Create ``taskflow_tags`` and fill it from the ``tags`` column of existing tasks."""
    _VERSION_3.create_all(connection, tables=[_TAGS_V3])
    tagged = connection.execute(text("SELECT id, tags FROM taskflow_tasks WHERE tags <> '{}'"))
    # created_at is copied in SQL, so that it keeps the exact form the store wrote.
    copy = text(
        "INSERT INTO taskflow_tags (task_id, key, value, created_at)"
        " SELECT id, :key, :value, created_at FROM taskflow_tasks WHERE id = :task_id"
    )
    while batch := tagged.fetchmany(_BACKFILL_BATCH):
        rows = [
            {"task_id": task_id, "key": key, "value": value}
            for task_id, tags in batch
            for key, value in json.loads(tags).items()
        ]
        if rows:
            connection.execute(copy, rows)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _create_version_1_tables,
    _add_page_indexes_and_change_feed,
    _add_tags_table,
    add_count_tables,
)
"""Schema migrations in order: ``MIGRATIONS[n]`` takes the schema from version n to n + 1."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The schema version that this code reads and writes."""


def migrate(session: Session, location: str) -> None:
    """Apply the migrations that the database at ``location`` has not seen yet.

    Runs in the caller's transaction. Concurrent starts wait for each other, so each
    migration is applied once: SQLite serializes write transactions, and on PostgreSQL
    the transaction first takes an advisory lock.

    Raises:
        SchemaVersionError: the database was migrated by a newer app-taskflow.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
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
