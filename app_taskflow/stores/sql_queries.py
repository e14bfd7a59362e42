"""The read queries of SqlStore: one task, pages of tasks, metrics and the next lease end."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Select,
    exists,
    func,
    literal,
    or_,
    text,
    tuple_,
    union_all,
)
from sqlalchemy import select as select_columns
from sqlmodel import Session, col, select

from app_taskflow.models import (
    ACTIVE_STATUSES,
    DurationStats,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
)
from app_taskflow.stores.base import build_metrics, build_page, percentile
from app_taskflow.stores.sql_counts import read_counts
from app_taskflow.stores.sql_schema import (
    SUMMARY_COLUMNS,
    TAG_TABLE,
    TASK_TABLE,
    AttemptRow,
    LeaseRow,
    LogRow,
    TaskRow,
    UtcDateTime,
    record_from_row,
    summary_from_mapping,
)


def load_record(session: Session, task_id: str) -> TaskRecord | None:
    """Return a task with its attempts and logs, or ``None``."""
    row = session.get(TaskRow, task_id)
    return None if row is None else full_record(session, row)


def full_record(session: Session, row: TaskRow) -> TaskRecord:
    """Return the record of a task row with its attempts and logs."""
    attempt_statement = select(AttemptRow).where(col(AttemptRow.task_id) == row.id)
    attempts = session.exec(attempt_statement.order_by(col(AttemptRow.number))).all()
    log_statement = select(LogRow).where(col(LogRow.task_id) == row.id)
    logs = session.exec(log_statement.order_by(col(LogRow.id))).all()
    return record_from_row(row, attempts=attempts, logs=logs)


def earliest_lease_end(session: Session) -> datetime | None:
    """Return the earliest end among the stored leases, or ``None`` when none is stored."""
    statement = select(LeaseRow.expires_at).order_by(col(LeaseRow.expires_at)).limit(1)
    return session.exec(statement).first()


def list_page(session: Session, query: TaskQuery, after: tuple[datetime, str] | None) -> TaskPage:
    """Return the page of tasks that ``query`` selects, starting after the task ``after``.

    Every page is read along an index that ends in ``(created_at, id)``, so that the
    database stops after the rows of the page. A filter on several statuses reads one
    such range per status and merges them, since a single index range cannot return
    several statuses in ``created_at`` order. A tag filter reads the tasks of its first
    tag (in key order) from the tag index, which is in page order too, and looks up the
    other tags of each task.

    NOTE: no index serves a search, or a status or name filter combined with a tag, so they
    are checked task by task along the page's index. A text that few tasks contain makes a
    page read many tasks. A search that matched none of 1,000,000 tasks took 0.6 s on
    SQLite 3.40 and 1.2 s on PostgreSQL 15, measured once on a shared 2-CPU machine.
    """
    newest_first = query.order == "newest"
    offset = 0 if after is not None else query.offset
    conditions: list[ColumnElement[bool]] = []
    if query.name is not None:
        conditions.append(col(TaskRow.name) == query.name)
    source, position = _page_source(query.tags or {}, conditions)
    if query.search:
        conditions.append(_mentions(query.search, session.get_bind().dialect.name))
    if after is not None:
        cursor = tuple_(literal(after[0], UtcDateTime()), literal(after[1]))
        conditions.append(
            tuple_(*position) < cursor if newest_first else tuple_(*position) > cursor
        )

    summaries = select_columns(*SUMMARY_COLUMNS).select_from(source)
    statuses = None if query.statuses is None else sorted({s.value for s in query.statuses})
    if statuses is not None and len(statuses) > 1:
        ranges = [
            _ordered(
                summaries.where(col(TaskRow.status) == status, *conditions),
                newest_first,
                position,
            )
            .limit(offset + query.limit + 1)
            .subquery()
            for status in statuses
        ]
        merged = union_all(*(select_columns(*page.c) for page in ranges)).subquery()
        statement = select_columns(*merged.c)
        order: list[Any] = [merged.c.created_at, merged.c.id]
    else:
        if statuses is not None:
            conditions.append(col(TaskRow.status).in_(statuses))
        statement = summaries.where(*conditions)
        order = list(position)
    if newest_first:
        order = [column.desc() for column in order]
    statement = statement.order_by(*order).offset(offset).limit(query.limit + 1)

    rows = session.execute(statement).mappings().all()
    return build_page([summary_from_mapping(row) for row in rows], query.limit, offset)


def _ordered(statement: Select[Any], newest_first: bool, position: tuple[Any, Any]) -> Select[Any]:
    if newest_first:
        return statement.order_by(*(column.desc() for column in position))
    return statement.order_by(*position)


def _page_source(
    tags: dict[str, str], conditions: list[ColumnElement[bool]]
) -> tuple[FromClause, tuple[Any, Any]]:
    """Return the tables a page reads and its position columns; add the tag conditions.

    Without tags, the page reads the task table along ``(created_at, id)``. With tags, it
    reads the rows of the first tag from ``taskflow_tags``, whose index gives them in
    ``(created_at, task_id)`` order, and keeps the tasks that also carry the other tags.
    """
    if not tags:
        return TASK_TABLE, (col(TaskRow.created_at), col(TaskRow.id))
    (key, value), *other_tags = sorted(tags.items())
    page_tag = TAG_TABLE.alias("page_tag")
    conditions.extend((page_tag.c.key == key, page_tag.c.value == value))
    for other_key, other_value in other_tags:
        carriers = select_columns(TAG_TABLE.c.task_id).where(
            TAG_TABLE.c.key == other_key, TAG_TABLE.c.value == other_value
        )
        conditions.append(col(TaskRow.id).in_(carriers))
    source = TASK_TABLE.join(page_tag, page_tag.c.task_id == TASK_TABLE.c.id)
    return source, (page_tag.c.created_at, page_tag.c.task_id)


def _mentions(search: str, dialect: str) -> ColumnElement[bool]:
    """Return the condition that ``search`` occurs in a task's text or one of its log messages.

    NOTE: SQLite's LIKE ignores case for ASCII letters only, so on SQLite a search for "é"
    does not find "É". PostgreSQL's ILIKE follows the database's locale.
    """
    escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    pattern = f"%{escaped}%"

    def matches(column: Any) -> ColumnElement[bool]:
        if dialect == "postgresql":
            return col(column).ilike(pattern, escape="\\")
        return col(column).like(pattern, escape="\\")

    columns = (
        TaskRow.id,
        TaskRow.name,
        TaskRow.args,
        TaskRow.kwargs,
        TaskRow.error_type,
        TaskRow.error_message,
    )
    in_logs = exists().where(col(LogRow.task_id) == col(TaskRow.id), matches(LogRow.message))
    return or_(*(matches(column) for column in columns), in_logs)


def read_metrics(session: Session) -> TaskMetrics:
    """Return the counts per name and status, success rates and duration statistics.

    Counts, and the count and mean of durations, come from the counters that triggers
    keep (see ``sql_counts.py``), so they cover every task without reading task rows.

    NOTE: p50 and p95 come from the durations of the ``DURATION_SAMPLE`` most recently
    finished tasks, because ranking every duration would read every finished task. A
    name's percentiles come from its tasks among those, or, when it has none there, from
    its own ``DURATION_SAMPLE`` most recently created finished tasks. They are exact while
    the store keeps fewer finished tasks than that.
    """
    counts, totals = read_counts(session)
    metrics = build_metrics(counts, {})
    if not totals:
        return metrics

    if session.get_bind().dialect.name == "postgresql":
        percentiles_of = _postgres_percentiles
    else:
        percentiles_of = _sqlite_percentiles
    overall, by_name = percentiles_of(session, _recent_durations())
    for name in totals.keys() - by_name.keys():
        _, of_name = percentiles_of(session, _recent_durations(name))
        by_name.update(of_name)

    timed = sum(name_totals.timed for name_totals in totals.values())
    total_duration = sum(name_totals.total_duration for name_totals in totals.values())
    metrics.duration = _stats(timed, total_duration, overall)
    for name, name_totals in totals.items():
        metrics.by_name[name].duration = _stats(
            name_totals.timed, name_totals.total_duration, by_name.get(name, {})
        )
    return metrics


DURATION_SAMPLE = 10_000
"""Most recently finished tasks whose durations give the percentiles."""

_PERCENTS = (50, 95)
"""The percentiles of ``DurationStats``: p50 and p95, by the nearest-rank method."""

_ACTIVE_SQL = ", ".join(f"'{status.value}'" for status in sorted(ACTIVE_STATUSES))
# "Not active" rather than an IN list of finished statuses, because SQLite would read such a
# list from the status index and sort every finished task, instead of reading the index of
# the ORDER BY from its end.
_FINISHED_WITH_DURATION = text(
    f"status NOT IN ({_ACTIVE_SQL}) AND duration IS NOT NULL AND finished_at IS NOT NULL"
)

Percentiles = dict[int, float]
"""Durations keyed by percent."""


def _recent_durations(name: str | None = None) -> Select[str, float | None]:
    """Return the query of the names and durations of the most recently finished tasks.

    With ``name``, it reads the most recently created ones of that name, along the
    (name, created_at, id) index, which stops after the sample. Ordering by finished_at
    would read every task of the name.
    """
    statement = select_columns(col(TaskRow.name), col(TaskRow.duration)).where(
        _FINISHED_WITH_DURATION
    )
    order: tuple[Any, ...]
    if name is None:
        order = (col(TaskRow.finished_at).desc(), col(TaskRow.id).desc())
    else:
        statement = statement.where(col(TaskRow.name) == name)
        order = (col(TaskRow.created_at).desc(), col(TaskRow.id).desc())
    return statement.order_by(*order).limit(DURATION_SAMPLE)


def _sqlite_percentiles(
    session: Session, recent: Select[str, float | None]
) -> tuple[Percentiles, dict[str, Percentiles]]:
    """Return the percentiles of the sample ``recent`` overall and per name.

    SQLite has no percentile function. Ranking the sample with window functions took
    43 ms, against 18 ms for sorting it here (a million tasks, a shared 2-CPU machine).
    """
    samples: dict[str, list[float]] = defaultdict(list)
    for name, duration in session.execute(recent):
        samples[name].append(duration)
    overall = sorted(duration for durations in samples.values() for duration in durations)
    by_name = {name: _percentiles(sorted(durations)) for name, durations in samples.items()}
    return _percentiles(overall), by_name


def _percentiles(sorted_sample: list[float]) -> Percentiles:
    if not sorted_sample:
        return {}
    return {percent: percentile(sorted_sample, percent / 100) for percent in _PERCENTS}


def _postgres_percentiles(
    session: Session, recent: Select[str, float | None]
) -> tuple[Percentiles, dict[str, Percentiles]]:
    """Return the percentiles of the sample ``recent`` overall and per name."""
    sample = recent.subquery("recent")
    # percentile_disc returns the first value whose cumulative distribution reaches the
    # fraction, which is the nearest-rank percentile.
    statement = select_columns(
        sample.c.name,
        func.grouping(sample.c.name),
        *(
            func.percentile_disc(percent / 100).within_group(sample.c.duration)
            for percent in _PERCENTS
        ),
    ).group_by(text("GROUPING SETS ((name), ())"))
    overall: Percentiles = {}
    by_name: dict[str, Percentiles] = {}
    for name, is_overall, *values in session.execute(statement):
        percentiles = dict(zip(_PERCENTS, values, strict=True))
        if is_overall:
            overall = percentiles
        else:
            by_name[name] = percentiles
    return overall, by_name


def _stats(count: int, total: float, percentiles: Percentiles) -> DurationStats:
    return DurationStats(
        count=count, mean=total / count, p50=percentiles.get(50), p95=percentiles.get(95)
    )
