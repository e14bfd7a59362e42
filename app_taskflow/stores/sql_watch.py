"""The change feed of SqlStore: every task and log write, of any instance, in commit order.

On SQLite every write transaction appends its changes to a journal table, and a poll loop
reads the entries after its position every 0.25 s (and right after each commit of its own
store). On PostgreSQL triggers NOTIFY each change at commit (see ``sql_migrations.py``),
and a connection of its own LISTENs. Either way a store receives its own changes through
the feed too, so that its watchers get the changes of all instances in one order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import Connection, delete, func, insert, select
from sqlmodel import Session

from app_taskflow.errors import StoreError
from app_taskflow.events import ChangeFanout
from app_taskflow.logs import log
from app_taskflow.models import LogEntry, TaskChange, TaskSummary
from app_taskflow.stores.sql_migrations import CHANGE_CHANNEL
from app_taskflow.stores.sql_schema import (
    CHANGE_TABLE,
    LOG_TABLE,
    TASK_TABLE,
    TaskRow,
    log_entry_from_mapping,
    summary_from_mapping,
)

if TYPE_CHECKING:
    import psycopg

T = TypeVar("T")

POLL_INTERVAL = 0.25
"""Seconds between two reads of the SQLite change journal."""

POLL_PAGE = 1000
"""Journal entries read at once; a feed further behind reads again at once."""

JOURNAL_KEEP = 10_000
"""Journal entries kept; a feed that falls further behind publishes a resync change."""

TRIM_EVERY = 500
"""Journaling transactions of one store between two trims of the journal."""

ERROR_LOG_INTERVAL = 60.0
"""Seconds between two log lines about a change feed that keeps failing."""

_INSERT_CHANGES = insert(CHANGE_TABLE)
_RESYNC = TaskChange(resync=True)
_WRITE_CHANGES_KEY = "taskflow_write_changes"
_SUMMARY_FIELDS = tuple(TaskSummary.model_fields)
_SUMMARY_TIMES = ("created_at", "scheduled_at", "started_at", "finished_at")


class Reader(Protocol):
    """Runs ``work`` in a read transaction of the store, in a worker thread."""

    def __call__(self, operation: str, work: Callable[[Session], T]) -> Awaitable[T]: ...


@dataclass
class WriteChanges:
    """The task and log changes of one write transaction, for the SQLite change journal.

    Operations report each change here; on PostgreSQL, where triggers report them, the
    reports are ignored.
    """

    session: Session
    journals: bool
    tasks: dict[str, TaskRow | Mapping[str, Any]] = field(default_factory=dict)
    """The state of each task written, as an ORM row or as column values, in write order."""
    log_ids: list[tuple[str, int]] = field(default_factory=list)

    def task_changed(self, row: TaskRow) -> None:
        """Note a change to a task row that the session will write."""
        if self.journals and (row.id in self.tasks or self.session.is_modified(row)):
            self.tasks[row.id] = row

    def tasks_written(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Note tasks inserted or updated by a statement, given by their column values."""
        if self.journals:
            for values in rows:
                self.tasks[values["id"]] = values

    def logs_added(self, task_id: str, ids: Sequence[int]) -> None:
        """Note log entries inserted by this transaction, by their row ids."""
        if self.journals:
            self.log_ids.extend((task_id, log_id) for log_id in ids)

    def write_journal(self, trim: bool) -> bool:
        """Append the changes to the journal; return whether there were any.

        With ``trim``, entries older than the ``JOURNAL_KEEP`` newest are deleted too.
        """
        entries = self.journal_entries()
        if entries:
            write_journal(self.session, entries, trim)
        return bool(entries)

    def journal_entries(self) -> list[dict[str, Any]]:
        """Return the journal rows of the changes, tasks first, in write order."""
        entries: list[dict[str, Any]] = [
            {"task_id": task_id, "summary": _summary_json(state), "log_id": None}
            for task_id, state in self.tasks.items()
        ]
        entries.extend(
            {"task_id": task_id, "summary": None, "log_id": log_id}
            for task_id, log_id in self.log_ids
        )
        return entries


def write_journal(
    executor: Session | Connection, entries: Sequence[Mapping[str, Any]], trim: bool
) -> None:
    """Append journal rows; with ``trim``, delete those older than the ``JOURNAL_KEEP`` newest."""
    executor.execute(_INSERT_CHANGES, entries)
    if trim:
        newest = select(func.max(CHANGE_TABLE.c.id)).scalar_subquery()
        executor.execute(delete(CHANGE_TABLE).where(CHANGE_TABLE.c.id <= newest - JOURNAL_KEEP))


def begin_write_changes(session: Session, journals: bool) -> WriteChanges:
    """Attach a new ``WriteChanges`` to ``session`` and return it."""
    changes = WriteChanges(session, journals)
    session.info[_WRITE_CHANGES_KEY] = changes
    return changes


def write_changes(session: Session) -> WriteChanges:
    """Return the ``WriteChanges`` of the write transaction that ``session`` runs."""
    changes: WriteChanges = session.info[_WRITE_CHANGES_KEY]
    return changes


def _summary_json(state: TaskRow | Mapping[str, Any]) -> str:
    # The values are those of the columns, so args and kwargs stay JSON text inside.
    if isinstance(state, TaskRow):
        values = {name: getattr(state, name) for name in _SUMMARY_FIELDS}
    else:
        values = {name: state[name] for name in _SUMMARY_FIELDS}
    return json.dumps(values, default=_utc_iso)


def _utc_iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"Cannot write {type(value).__name__} into the change journal.")


class ChangeFeed:
    """Delivers the changes of a database to a store's watchers while anyone watches."""

    def __init__(self) -> None:
        self.fanout = ChangeFanout(feed=self._run)
        self._failures = 0
        self._error_logged_at = -ERROR_LOG_INTERVAL

    def wake(self) -> None:
        """Tell the feed that this store committed changes. Any thread may call it."""

    async def close(self) -> None:
        """Stop the feed."""
        await self.fanout.close()

    async def _run(self, fanout: ChangeFanout) -> None:
        await self._follow()

    async def _follow(self) -> None:
        raise NotImplementedError

    def _record_failure(self, error: StoreError) -> None:
        # A database that stays unreachable would fail every read: log once a minute.
        self._failures += 1
        now = time.monotonic()
        if now - self._error_logged_at < ERROR_LOG_INTERVAL:
            return
        self._error_logged_at = now
        log.opt(exception=error).error(
            "The change feed could not read the task store ({} failures in a row); retrying",
            self._failures,
        )

    def _record_success(self) -> None:
        if self._failures:
            log.info("The change feed reads the task store again after {} failures", self._failures)
            self._failures = 0
            self._error_logged_at = -ERROR_LOG_INTERVAL


class SqlitePoller(ChangeFeed):
    """Follows a SQLite database by reading its change journal after the last entry read."""

    def __init__(self, read: Reader, interval: float = POLL_INTERVAL) -> None:
        super().__init__()
        self._read = read
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken = asyncio.Event()

    def wake(self) -> None:
        loop = self._loop
        if loop is not None:
            # The loop may have closed since the feed stopped, and then no poll waits.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._woken.set)

    async def _follow(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._woken = asyncio.Event()
        position: int | None = None
        try:
            while True:
                self._woken.clear()
                poll = await self._poll_after(position)
                if poll is not None:
                    for change in poll.changes:
                        self.fanout.publish(change)
                    position = poll.end
                if poll is None or not poll.full:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._interval):
                            await self._woken.wait()
        finally:
            self._loop = None

    async def _poll_after(self, position: int | None) -> _Poll | None:
        """Read the changes after ``position``, or find the position to start from.

        Returns ``None`` when the read failed; the next poll tries again from the same
        position, so no change is lost.
        """
        try:
            if position is None:
                poll = _Poll(await self._read("watch", _last_journal_id))
            else:
                poll = await self._read("watch", partial(_poll, after=position))
        except StoreError as error:
            self._record_failure(error)
            return None
        self._record_success()
        return poll


@dataclass
class _Poll:
    end: int
    full: bool = False
    changes: list[TaskChange] = field(default_factory=list)


def _last_journal_id(session: Session) -> int:
    last_id = session.execute(select(func.max(CHANGE_TABLE.c.id))).scalar_one_or_none()
    return last_id or 0


def _poll(session: Session, after: int) -> _Poll:
    """Read the journal entries after the entry ``after``, with the log entries they name."""
    statement = (
        select(
            CHANGE_TABLE.c.id.label("change_id"),
            CHANGE_TABLE.c.task_id,
            CHANGE_TABLE.c.summary,
            CHANGE_TABLE.c.log_id,
            LOG_TABLE.c.timestamp,
            LOG_TABLE.c.level,
            LOG_TABLE.c.message,
            LOG_TABLE.c.attempt,
            LOG_TABLE.c.extra,
        )
        .select_from(CHANGE_TABLE.outerjoin(LOG_TABLE, LOG_TABLE.c.id == CHANGE_TABLE.c.log_id))
        .where(CHANGE_TABLE.c.id > after)
        .order_by(CHANGE_TABLE.c.id)
        .limit(POLL_PAGE)
    )
    rows = session.execute(statement).mappings().all()
    if not rows:
        return _Poll(after)

    poll = _Poll(rows[-1]["change_id"], full=len(rows) == POLL_PAGE)
    # Entry ids have no gaps, so a gap means that a trim removed entries not read yet.
    if after and rows[0]["change_id"] != after + 1:
        poll.changes.append(_RESYNC)
    for row in rows:
        if row["summary"] is not None:
            summary = summary_from_mapping(json.loads(row["summary"]))
            poll.changes.append(TaskChange(task_id=row["task_id"], summary=summary))
        elif row["timestamp"] is not None:
            # A log entry that prune deleted has no row any more, and is skipped.
            entry = log_entry_from_mapping(row)
            poll.changes.append(TaskChange(task_id=row["task_id"], log=entry))
    return poll


LISTENER_NAME = "app-taskflow change feed"
"""The ``application_name`` of the listening connection, as ``pg_stat_activity`` shows it."""

_FIRST_RECONNECT_DELAY = 0.2
_MAX_RECONNECT_DELAY = 10.0
_HEALTH_CHECK_INTERVAL = 10.0
"""Seconds without a notification after which the listening connection is checked."""


class PostgresListener(ChangeFeed):
    """Follows a PostgreSQL database by LISTENing on ``CHANGE_CHANNEL``.

    The listening connection is a psycopg connection of its own, outside the pool. When it
    is lost, the listener reconnects with backoff and publishes a resync change, since the
    notifications sent meanwhile are lost.

    Args:
        conninfo: the libpq connection string or URL of the database.
        read: runs a read transaction of the store.
    """

    def __init__(self, conninfo: str, read: Reader) -> None:
        super().__init__()
        self._conninfo = conninfo
        self._read = read

    async def _follow(self) -> None:
        import psycopg

        delay = _FIRST_RECONNECT_DELAY
        failures = 0
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=10,
                    application_name=LISTENER_NAME,
                ) as connection:
                    await connection.execute(f"LISTEN {CHANGE_CHANNEL}")
                    if failures:
                        log.warning(
                            "The change feed listens to PostgreSQL again after {} failed "
                            "connection attempts; watchers resync",
                            failures,
                        )
                        self.fanout.publish(_RESYNC)
                    failures = 0
                    delay = _FIRST_RECONNECT_DELAY
                    await self._relay(connection)
            except psycopg.OperationalError as error:
                failures += 1
                pause = delay * random.uniform(0.5, 1.0)
                # One warning per outage; the attempts during it are logged at DEBUG.
                level = "WARNING" if failures == 1 else "DEBUG"
                log.log(
                    level,
                    "The change feed has no PostgreSQL connection ({}); reconnecting in {:.2f} s",
                    error,
                    pause,
                )
                await asyncio.sleep(pause)
                delay = min(delay * 2, _MAX_RECONNECT_DELAY)

    async def _relay(self, connection: psycopg.AsyncConnection[Any]) -> None:
        while True:
            batch = [
                notify
                async for notify in connection.notifies(
                    timeout=_HEALTH_CHECK_INTERVAL, stop_after=1
                )
            ]
            if not batch:
                # No notification for a while: make sure that the connection still works.
                await connection.execute("SELECT 1")
                continue
            # Notifications that arrived meanwhile come at once; this waits for no others.
            batch.extend([notify async for notify in connection.notifies(timeout=0)])
            await self._publish([notify.payload for notify in batch])

    async def _publish(self, payloads: Sequence[str]) -> None:
        notified: list[dict[str, Any]] = []
        for payload in payloads:
            try:
                notified.append(json.loads(payload))
            except ValueError:
                log.debug("Skipped a notification that is not a change: {!r}", payload)

        missing = _missing_columns(notified)
        if missing.task_ids or missing.log_ids:
            try:
                await self._read("watch", partial(_read_missing, missing=missing))
            except StoreError as error:
                self._record_failure(error)
                self.fanout.publish(_RESYNC)
                return
            self._record_success()

        for item in notified:
            change = _change_from_payload(item, missing)
            if change is not None:
                self.fanout.publish(change)


@dataclass
class _Missing:
    """The columns and log entries that notifications left out, read from the tables."""

    task_ids: set[str] = field(default_factory=set)
    log_ids: set[int] = field(default_factory=set)
    task_columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_entries: dict[int, LogEntry] = field(default_factory=dict)


def _missing_columns(notified: Sequence[Mapping[str, Any]]) -> _Missing:
    missing = _Missing()
    for item in notified:
        if item.get("partial"):
            missing.task_ids.add(item["task"]["id"])
        elif "log_id" in item:
            missing.log_ids.add(item["log_id"])
    return missing


def _read_missing(session: Session, missing: _Missing) -> None:
    if missing.task_ids:
        columns = (TASK_TABLE.c.id, TASK_TABLE.c.args, TASK_TABLE.c.kwargs)
        statement = select(*columns, TASK_TABLE.c.error_message).where(
            TASK_TABLE.c.id.in_(missing.task_ids)
        )
        for row in session.execute(statement).mappings():
            missing.task_columns[row["id"]] = dict(row)
    if missing.log_ids:
        statement = select(LOG_TABLE).where(LOG_TABLE.c.id.in_(missing.log_ids))
        for row in session.execute(statement).mappings():
            missing.log_entries[row["id"]] = log_entry_from_mapping(row)


def _change_from_payload(item: Mapping[str, Any], missing: _Missing) -> TaskChange | None:
    """Return the change that a notification announced, or ``None`` when it is gone.

    NOTE: a payload too large for NOTIFY leaves out the arguments and the error message.
    They are read from the table afterwards, so the error message is the task's current
    one, which a later write may have changed.
    """
    if "task" in item:
        values = dict(item["task"])
        if item.get("partial"):
            columns = missing.task_columns.get(values["id"])
            if columns is None:
                return None
            values.update(columns)
        for name in _SUMMARY_TIMES:
            if values.get(name) is not None:
                values[name] = datetime.fromisoformat(values[name]).astimezone(UTC)
        summary = summary_from_mapping(values)
        return TaskChange(task_id=summary.id, summary=summary)

    if "log" in item:
        values = dict(item["log"])
        values["timestamp"] = datetime.fromisoformat(values["timestamp"]).astimezone(UTC)
        return TaskChange(task_id=values["task_id"], log=log_entry_from_mapping(values))
    entry = missing.log_entries.get(item["log_id"])
    return None if entry is None else TaskChange(task_id=item["task_id"], log=entry)
