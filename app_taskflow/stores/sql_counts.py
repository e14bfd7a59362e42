"""Task counts per name and status, kept by database triggers, so metrics read no task rows.

``taskflow_counts`` contains, per task name and status, the number of tasks, the number of
them with a duration, and the sum of those durations. Triggers on ``taskflow_tasks``
keep it right through every write, by this store or by any other client of the database.

On SQLite, which runs one write transaction at a time, row-level triggers update the
counts in place. On PostgreSQL several instances write at once. A trigger that updated a
shared count row would make every write of that name and status wait for the others, and
two statements that claim tasks of several names in different orders could deadlock. So
statement-level triggers append one delta row per name and status that a statement
changed to ``taskflow_count_deltas``, which takes no lock that another writer waits for.
One transaction at a time folds the deltas into ``taskflow_counts`` (see
``_POSTGRES_FOLD``), and a read sums the counts and the deltas not folded yet.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from sqlalchemy import Connection, text
from sqlmodel import Session

from app_taskflow.models import TERMINAL_STATUSES, TaskStatus

FOLD_LOCK_KEY = 0x7466636F756E7473
"""PostgreSQL advisory lock of the transaction that folds count deltas: ASCII "tfcounts"."""

FOLD_EVERY = 1000
"""Delta-writing statements on PostgreSQL between two folds by the trigger functions."""


class NameTotals(NamedTuple):
    """Counts of one task name, summed over its finished statuses."""

    timed: int
    """Finished tasks with a duration."""
    total_duration: float
    """Sum of their durations in seconds."""


def add_count_tables(connection: Connection) -> None:
    """Create the count tables and their triggers, then count the tasks already stored.

    The triggers are created before the count. On PostgreSQL, ``CREATE TRIGGER`` waits for
    the transactions that are writing tasks and makes new ones wait until this transaction
    commits, so no write falls between the count and the first trigger. SQLite runs one
    write transaction at a time anyway.
    """
    postgres = connection.dialect.name == "postgresql"
    for statement in _POSTGRES_COUNTS if postgres else _SQLITE_COUNTS:
        connection.exec_driver_sql(statement)
    # NOT INDEXED makes SQLite read the table in storage order: the name index would give
    # the groups in order, but costs a random read of the table per task.
    source = "taskflow_tasks" if postgres else "taskflow_tasks NOT INDEXED"
    connection.exec_driver_sql(
        "INSERT INTO taskflow_counts (name, status, tasks, timed, total_duration)"
        " SELECT name, status, count(*), count(duration), coalesce(sum(duration), 0)"
        f" FROM {source} GROUP BY name, status"
    )


def read_counts(
    session: Session,
) -> tuple[dict[str, dict[TaskStatus, int]], dict[str, NameTotals]]:
    """Return the task counts per name and status, and the duration totals per name.

    Names without tasks are left out. The totals cover the finished tasks of each name
    that have a duration. On PostgreSQL this first folds the pending deltas, unless
    another transaction is folding them.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT taskflow_fold_count_deltas()"))
        statement = _POSTGRES_READ
    else:
        statement = _SQLITE_READ

    counts: dict[str, dict[TaskStatus, int]] = defaultdict(dict)
    timed: dict[str, int] = defaultdict(int)
    total_duration: dict[str, float] = defaultdict(float)
    for name, status_value, tasks, timed_tasks, duration_sum in session.execute(statement):
        if tasks == 0:
            continue
        status = TaskStatus(status_value)
        counts[name][status] = tasks
        if status in TERMINAL_STATUSES and timed_tasks:
            timed[name] += timed_tasks
            total_duration[name] += duration_sum
    totals = {name: NameTotals(timed[name], total_duration[name]) for name in timed}
    return counts, totals


_SQLITE_READ = text("SELECT name, status, tasks, timed, total_duration FROM taskflow_counts")
# sum() of BIGINT is NUMERIC in PostgreSQL, hence the casts back.
_POSTGRES_READ = text(
    "SELECT name, status, sum(tasks)::bigint, sum(timed)::bigint, sum(total_duration)"
    " FROM (SELECT name, status, tasks, timed, total_duration FROM taskflow_counts"
    " UNION ALL SELECT name, status, tasks, timed, total_duration FROM taskflow_count_deltas)"
    " AS counted GROUP BY name, status"
)

_SQLITE_ADD_NEW = """
        INSERT INTO taskflow_counts (name, status, tasks, timed, total_duration)
        VALUES (new.name, new.status, 1, new.duration IS NOT NULL, coalesce(new.duration, 0))
        ON CONFLICT (name, status) DO UPDATE SET
            tasks = tasks + 1,
            timed = timed + excluded.timed,
            total_duration = total_duration + excluded.total_duration;"""
# When the last task with a duration leaves a group, its sum is set to 0, so that rounding
# errors of the additions and subtractions do not stay behind.
_SQLITE_REMOVE_OLD = """
        UPDATE taskflow_counts SET
            tasks = tasks - 1,
            timed = timed - (old.duration IS NOT NULL),
            total_duration = CASE WHEN timed = (old.duration IS NOT NULL) THEN 0
                ELSE total_duration - coalesce(old.duration, 0) END
        WHERE name = old.name AND status = old.status;"""

# NOTE: SQLite fires no delete trigger for the rows that INSERT OR REPLACE replaces, unless
# PRAGMA recursive_triggers is on, so a client that replaces task rows that way leaves the
# counts of the replaced rows behind. The store itself never replaces task rows.
_SQLITE_COUNTS = (
    """CREATE TABLE taskflow_counts (
        name VARCHAR NOT NULL,
        status VARCHAR(16) NOT NULL,
        tasks INTEGER NOT NULL,
        timed INTEGER NOT NULL,
        total_duration FLOAT NOT NULL,
        PRIMARY KEY (name, status)
    ) WITHOUT ROWID""",
    f"""CREATE TRIGGER taskflow_tasks_count_insert AFTER INSERT ON taskflow_tasks
    BEGIN{_SQLITE_ADD_NEW}
    END""",
    f"""CREATE TRIGGER taskflow_tasks_count_delete AFTER DELETE ON taskflow_tasks
    BEGIN{_SQLITE_REMOVE_OLD}
    END""",
    f"""CREATE TRIGGER taskflow_tasks_count_update AFTER UPDATE OF name, status, duration
        ON taskflow_tasks
        WHEN old.name IS NOT new.name OR old.status IS NOT new.status
            OR old.duration IS NOT new.duration
    BEGIN{_SQLITE_REMOVE_OLD}{_SQLITE_ADD_NEW}
    END""",
)

_POSTGRES_FOLD = f"""CREATE FUNCTION taskflow_fold_count_deltas() RETURNS void
    LANGUAGE plpgsql AS $$
    BEGIN
        -- Under REPEATABLE READ or SERIALIZABLE, deleting deltas that another fold deleted
        -- after this transaction began fails, so only READ COMMITTED transactions fold.
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RETURN;
        END IF;
        -- One fold at a time, so that no fold waits for another's row locks; a transaction
        -- that does not get the lock leaves the deltas to the one that has it.
        IF NOT pg_try_advisory_xact_lock({FOLD_LOCK_KEY}) THEN
            RETURN;
        END IF;
        WITH folded AS (
            DELETE FROM taskflow_count_deltas
            RETURNING name, status, tasks, timed, total_duration
        )
        INSERT INTO taskflow_counts AS counts (name, status, tasks, timed, total_duration)
        SELECT name, status, sum(tasks), sum(timed), sum(total_duration)
        FROM folded GROUP BY name, status
        ON CONFLICT (name, status) DO UPDATE SET
            tasks = counts.tasks + excluded.tasks,
            timed = counts.timed + excluded.timed,
            total_duration = CASE WHEN counts.timed + excluded.timed = 0 THEN 0
                ELSE counts.total_duration + excluded.total_duration END;
    END
    $$"""


def _postgres_delta_function(name: str, deltas: str) -> str:
    """Return a trigger function that appends the deltas that the query ``deltas`` selects.

    Every ``FOLD_EVERY``-th statement that appends deltas also folds them, so that the
    delta table stays small when metrics are seldom read.
    """
    return f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        appended bigint;
    BEGIN
        INSERT INTO taskflow_count_deltas (name, status, tasks, timed, total_duration)
        {deltas};
        GET DIAGNOSTICS appended = ROW_COUNT;
        IF appended > 0 AND mod(nextval('taskflow_count_delta_statements'), {FOLD_EVERY}) = 0 THEN
            PERFORM taskflow_fold_count_deltas();
        END IF;
        RETURN NULL;
    END
    $$"""


# An UPDATE counts the rows whose name, status or duration changed: minus their old
# values, plus their new ones. Rows are paired by id. A row whose id changed has no pair,
# so it counts once on each side, and any UPDATE keeps the counts right.
_UPDATE_DELTAS = """WITH changed AS (
            SELECT old_tasks.name AS old_name, old_tasks.status AS old_status,
                old_tasks.duration AS old_duration, new_tasks.name AS new_name,
                new_tasks.status AS new_status, new_tasks.duration AS new_duration
            FROM old_tasks FULL JOIN new_tasks ON new_tasks.id = old_tasks.id
            WHERE (old_tasks.name, old_tasks.status, old_tasks.duration)
                IS DISTINCT FROM (new_tasks.name, new_tasks.status, new_tasks.duration)
        )
        SELECT name, status, sum(tasks), sum(timed), sum(total_duration)
        FROM (
            SELECT old_name, old_status, -1, -(old_duration IS NOT NULL)::int,
                -coalesce(old_duration, 0)
            FROM changed WHERE old_name IS NOT NULL
            UNION ALL
            SELECT new_name, new_status, 1, (new_duration IS NOT NULL)::int,
                coalesce(new_duration, 0)
            FROM changed WHERE new_name IS NOT NULL
        ) AS moved (name, status, tasks, timed, total_duration)
        GROUP BY name, status"""

_POSTGRES_COUNTS = (
    """CREATE TABLE taskflow_counts (
        name VARCHAR NOT NULL,
        status VARCHAR(16) NOT NULL,
        tasks BIGINT NOT NULL,
        timed BIGINT NOT NULL,
        total_duration DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (name, status)
    )""",
    # Append-only between folds, so it needs no index.
    """CREATE TABLE taskflow_count_deltas (
        name VARCHAR NOT NULL,
        status VARCHAR(16) NOT NULL,
        tasks BIGINT NOT NULL,
        timed BIGINT NOT NULL,
        total_duration DOUBLE PRECISION NOT NULL
    )""",
    "CREATE SEQUENCE taskflow_count_delta_statements",
    _POSTGRES_FOLD,
    _postgres_delta_function(
        "taskflow_count_inserted_tasks",
        "SELECT name, status, count(*), count(duration), coalesce(sum(duration), 0)"
        " FROM new_tasks GROUP BY name, status",
    ),
    _postgres_delta_function(
        "taskflow_count_deleted_tasks",
        "SELECT name, status, -count(*), -count(duration), -coalesce(sum(duration), 0)"
        " FROM old_tasks GROUP BY name, status",
    ),
    _postgres_delta_function("taskflow_count_updated_tasks", _UPDATE_DELTAS),
    """CREATE FUNCTION taskflow_clear_counts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM taskflow_count_deltas;
        DELETE FROM taskflow_counts;
        RETURN NULL;
    END
    $$""",
    # PostgreSQL takes transition tables only on triggers of a single event.
    """CREATE TRIGGER taskflow_tasks_count_insert AFTER INSERT ON taskflow_tasks
        REFERENCING NEW TABLE AS new_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION taskflow_count_inserted_tasks()""",
    """CREATE TRIGGER taskflow_tasks_count_delete AFTER DELETE ON taskflow_tasks
        REFERENCING OLD TABLE AS old_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION taskflow_count_deleted_tasks()""",
    """CREATE TRIGGER taskflow_tasks_count_update AFTER UPDATE ON taskflow_tasks
        REFERENCING OLD TABLE AS old_tasks NEW TABLE AS new_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION taskflow_count_updated_tasks()""",
    """CREATE TRIGGER taskflow_tasks_count_truncate AFTER TRUNCATE ON taskflow_tasks
        FOR EACH STATEMENT EXECUTE FUNCTION taskflow_clear_counts()""",
)
