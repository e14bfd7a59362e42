"""SqlStore: tasks kept in SQLite (the embedded default) or PostgreSQL through SQLAlchemy."""

from __future__ import annotations

import builtins
import random
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar, TypeVarTuple

import anyio
import anyio.to_thread
from sqlalchemy import URL, Connection, Engine, StaticPool, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    OperationalError,
    SQLAlchemyError,
    StatementError,
)
from sqlmodel import Session

from app_taskflow.errors import (
    ConfigurationError,
    MissingExtraError,
    StoreError,
    StoreUnavailableError,
)
from app_taskflow.logs import log
from app_taskflow.models import (
    AttemptOutcome,
    LogEntry,
    RecoveryReport,
    TaskChange,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    decode_cursor,
)
from app_taskflow.stores import sql_operations as operations
from app_taskflow.stores.base import TaskStore
from app_taskflow.stores.sql_batches import BATCH_FORMS
from app_taskflow.stores.sql_migrations import migrate
from app_taskflow.stores.sql_queries import (
    earliest_lease_end,
    list_page,
    load_record,
    read_metrics,
)
from app_taskflow.stores.sql_watch import (
    TRIM_EVERY,
    ChangeFeed,
    PostgresListener,
    SqlitePoller,
    begin_write_changes,
    write_journal,
)
from app_taskflow.stores.sql_writer import GroupWriter, PendingWrite

Ts = TypeVarTuple("Ts")
T = TypeVar("T")

_WORKER_THREADS = 4
"""Maximum number of database calls that run at once, each in a worker thread."""

_GROUP_LIMIT = 200
"""Maximum number of writes that one transaction of the writer thread commits."""

_GROUPED_ON_POSTGRES = frozenset(
    {"create", "claim", "claim_next", "finish", "append_logs", "heartbeat"}
)
"""The writes that the writer thread runs in groups on PostgreSQL.

These are the frequent writes, and each locks only the rows it names (claim_next skips
locked rows), so a group holds its locks for milliseconds. The others (recover_expired,
release, prune, cancel and retry) run in worker threads, one transaction each. They are
rare, and they lock many rows or wait for the locks of other instances, which would hold
up every write of a group.
"""

_GROUP_LOCK_TIMEOUT = 1.0
"""Seconds a write of a PostgreSQL group waits for a row lock before it leaves the group.

Another group holds its locks for milliseconds, so a longer wait means a long transaction
elsewhere. The write then runs again alone in a worker thread, which waits up to
``busy_timeout``, and the rest of its group commits without it.
"""

_FIRST_RETRY_DELAY = 0.01
_MAX_RETRY_DELAY = 0.2
_WRITE_OPTION = "taskflow_write"
_DRIVER_EXTRAS = {"postgresql": "postgres"}
_SUPPORTED_BACKENDS = ("sqlite", "postgresql")
_MIN_SQLITE_VERSION = (3, 35, 0)
"""The first SQLite with UPDATE ... RETURNING, which claims use."""

# PostgreSQL error codes (SQLSTATE) that SqlStore handles itself.
_RETRIED_SQLSTATES = {"40001", "40P01"}
"""Serialization failure and deadlock: the transaction runs again from the start."""
_LOCK_TIMEOUT_SQLSTATE = "55P03"
_SERVER_GONE_SQLSTATES = {"57P01", "57P02", "57P03"}
"""The server shut down, crashed or is starting: like a lost connection, this passes."""


class SqlStore(TaskStore):
    """A store in a SQL database, shared safely by several processes.

    SQLite (``sqlite:///path/to/tasks.db``) runs in WAL mode with ``synchronous=NORMAL``,
    in which readers and the writer do not block each other. Every write transaction starts
    with ``BEGIN IMMEDIATE``, so writers queue for the lock instead of failing halfway.

    PostgreSQL (``postgresql+psycopg://user:password@host/database``, with the
    ``[postgres]`` extra) runs transactions at READ COMMITTED and relies on row locks:
    claims use ``SELECT ... FOR UPDATE SKIP LOCKED``, so instances take different tasks,
    and a unique partial index keeps each idempotency key on one task. Migrations run
    under an advisory lock, so instances that start at once migrate once.

    Calls run in a few worker threads, so the event loop does not wait on the database.
    Writes run in one thread instead, which commits all the writes waiting in one
    transaction (group commit), with a few statements for all the claims of a group and a
    few for all its finishes. A write that fails does not fail the others of its group. On
    PostgreSQL only the frequent writes run in groups (see ``_GROUPED_ON_POSTGRES``), on a
    connection of their own, and a group that ends in a deadlock or serialization failure
    runs again as a whole.
    ``watch()`` delivers the changes of every instance, this one's included, in commit
    order: on SQLite from a change journal read every 0.25 s and after each commit of this
    store, on PostgreSQL through LISTEN/NOTIFY.

    NOTE: with ``synchronous=NORMAL`` a SQLite commit survives a crash of the app but can be
    lost in a power failure or operating system crash. Other databases that SQLAlchemy
    reaches are not supported.

    Args:
        url: a SQLAlchemy database URL, such as ``sqlite:///var/tasks.db``.
        busy_timeout: seconds a call waits for a lock held by another connection before it
            raises ``StoreUnavailableError``.
    """

    supports_multiple_instances = True

    def __init__(self, url: str, *, busy_timeout: float = 30.0) -> None:
        self._busy_timeout = busy_timeout
        self._engine, self._location = _create_engine(url, busy_timeout)
        self._write_engine = self._engine.execution_options(**{_WRITE_OPTION: True})
        self._is_sqlite = self._engine.dialect.name == "sqlite"
        threads = 1 if isinstance(self._engine.pool, StaticPool) else _WORKER_THREADS
        self._limiter = anyio.CapacityLimiter(threads)
        self._journal_writes = 0
        # An in-memory database has one connection, which the worker threads take in turn.
        self._writer = GroupWriter(self._run_group, _GROUP_LIMIT) if threads > 1 else None
        self._group_engine: Engine = self._write_engine
        self._commit_lock_timeout = _milliseconds(busy_timeout)
        if not self._is_sqlite:
            # The writer thread's own connection, whose lock_timeout is that of a group.
            self._group_engine = _create_group_engine(self._engine, busy_timeout)
        self._feed: ChangeFeed
        if self._is_sqlite:
            self._feed = SqlitePoller(self._read)
        else:
            listen_url = self._engine.url.set(drivername="postgresql")
            self._feed = PostgresListener(
                listen_url.render_as_string(hide_password=False), self._read
            )

    async def open(self) -> None:
        try:
            await anyio.to_thread.run_sync(
                self._run_in_thread, "open", True, migrate, self._location, limiter=self._limiter
            )
        except BaseException:
            # The caller does not close a store that failed to open.
            await anyio.to_thread.run_sync(self._engine.dispose, limiter=self._limiter)
            raise

    async def close(self) -> None:
        await self._feed.close()
        if self._writer is not None:
            await self._writer.close()
        if self._group_engine is not self._write_engine:
            await anyio.to_thread.run_sync(self._group_engine.dispose, limiter=self._limiter)
        await anyio.to_thread.run_sync(self._engine.dispose, limiter=self._limiter)

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        if not records:
            return []
        try:
            ids, conflict = await self._write("create", operations.create, records)
        except operations.RecordsAfterConflictError as stop:
            ids, conflict = await self._write(
                "create", operations.create, records[: stop.position + 1]
            )
        if conflict is not None:
            raise conflict
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        return await self._read("get", load_record, task_id)

    async def list(self, query: TaskQuery) -> TaskPage:
        after = decode_cursor(query.cursor) if query.cursor else None
        return await self._read("list", list_page, query, after)

    async def metrics(self) -> TaskMetrics:
        return await self._read("metrics", read_metrics)

    async def claim(self, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
        return await self._write("claim", operations.claim, task_id, instance_id, now)

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        if limit <= 0 or not names:
            return []
        return await self._write(
            "claim_next", operations.claim_next, instance_id, now, limit, list(names)
        )

    async def finish(
        self, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
    ) -> bool:
        return await self._write(
            "finish", operations.finish, task_id, instance_id, attempt, outcome
        )

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        if entries:
            await self._write("append_logs", operations.append_logs, task_id, entries)

    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        return await self._write("heartbeat", operations.heartbeat, instance_id, expires_at)

    async def recover_expired(self, now: datetime) -> RecoveryReport:
        return await self._write("recover_expired", operations.recover_expired, now)

    async def earliest_lease_end(self) -> datetime | None:
        return await self._read("earliest_lease_end", earliest_lease_end)

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        return await self._write("release", operations.release, instance_id, now)

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        return await self._write("cancel", operations.cancel, task_id, now)

    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        return await self._write("retry", operations.retry, task_id, extra_attempts)

    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        return await self._write("prune", operations.prune, now, max_age, max_count)

    def watch(self) -> AsyncGenerator[TaskChange, None]:
        return self._feed.fanout.watch()

    async def _read(self, operation: str, work: Callable[[Session, *Ts], T], *args: *Ts) -> T:
        return await anyio.to_thread.run_sync(
            self._run_in_thread, operation, False, work, *args, limiter=self._limiter
        )

    async def _write(self, operation: str, work: Callable[[Session, *Ts], T], *args: *Ts) -> T:
        if self._writer is not None and (self._is_sqlite or operation in _GROUPED_ON_POSTGRES):
            try:
                result: T = await self._writer.submit(operation, work, args)
            except _LockWaitInGroupError:
                pass  # The write runs alone below, and waits as long as busy_timeout.
            else:
                return result
        return await anyio.to_thread.run_sync(
            self._run_in_thread, operation, True, work, *args, limiter=self._limiter
        )

    def _run_in_thread(
        self, operation: str, write: bool, work: Callable[[Session, *Ts], T], *args: *Ts
    ) -> T:
        """Run ``work(session, *args)`` in one transaction, retried on transient conflicts.

        A write also appends its changes to the change journal (SQLite). Every driver error
        leaves here as ``StoreError``. Errors of the library itself, such as
        ``TaskStateError``, roll the transaction back and pass through unchanged.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = _FIRST_RETRY_DELAY
        retries = 0
        while True:
            try:
                if not write:
                    with Session(self._engine) as session, session.begin():
                        return work(session, *args)
                return self._write_in_thread(work, *args)
            except DBAPIError as error:
                if self._is_lock_timeout(error):
                    raise self._lock_timeout_error(operation) from error
                if not self._is_transient(error):
                    raise self._store_error(operation, error) from error
                pause = delay * random.uniform(0.5, 1.0)
                if time.monotonic() + pause > deadline:
                    raise self._lock_timeout_error(operation) from error
            except SQLAlchemyError as error:
                raise self._store_error(operation, error) from error

            # The busy handler of SQLite waits for most locks itself (see busy_timeout), but
            # some busy errors return at once; PostgreSQL ends one transaction of a deadlock.
            # The transaction was rolled back, so it runs again from the start. Jitter keeps
            # processes that collided from retrying in step.
            retries += 1
            log.debug("Task store busy during {}; retry {} in {:.3f} s", operation, retries, pause)
            time.sleep(pause)
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _write_in_thread(self, work: Callable[[Session, *Ts], T], *args: *Ts) -> T:
        with Session(self._write_engine, expire_on_commit=False) as session:
            session.begin()
            changes = begin_write_changes(session, journals=self._is_sqlite)
            result = work(session, *args)
            journaled = changes.write_journal(trim=self._journal_writes % TRIM_EVERY == 0)
            session.commit()
        if journaled:
            self._journal_writes += 1
            self._feed.wake()
        return result

    def _run_group(self, group: builtins.list[PendingWrite]) -> None:
        """Commit the writes of ``group`` in one transaction, retried on transient conflicts.

        Sets the result or error of every write, like ``_run_in_thread`` for one write. A
        retry runs the whole group again, because a deadlock or serialization failure on
        PostgreSQL rolls back the whole transaction.
        """
        deadline = time.monotonic() + self._busy_timeout
        delay = _FIRST_RETRY_DELAY
        retries = 0
        isolated = False
        # The writes still in the group: a write that waited too long for a lock leaves it.
        running = list(group)
        while True:
            try:
                if self._commit_group(running, isolated):
                    return
                # A write failed: run the group again with each write in a savepoint.
                isolated = True
                continue
            except DBAPIError as error:
                if self._is_lock_timeout(error):
                    self._time_out_group(running, error)
                    return
                if not self._is_transient(error):
                    self._fail_group(running, error)
                    return
                pause = delay * random.uniform(0.5, 1.0)
                if time.monotonic() + pause > deadline:
                    self._time_out_group(running, error)
                    return
            except SQLAlchemyError as error:
                self._fail_group(running, error)
                return

            retries += 1
            log.debug(
                "Task store busy during a group of {} writes; retry {} in {:.3f} s",
                len(running),
                retries,
                pause,
            )
            time.sleep(pause)
            delay = min(delay * 2, _MAX_RETRY_DELAY)

    def _commit_group(self, group: builtins.list[PendingWrite], isolated: bool) -> bool:
        """Run the writes of ``group`` in one transaction and commit it.

        With ``isolated`` each write runs in a savepoint, and a write that fails leaves the
        others to commit. Without, the writes share one session, because savepoints cost as
        much as the writes themselves and writes seldom fail: the first write that fails
        rolls the transaction back, and this returns False unless it was the only write.
        Without ``isolated``, the writes of each kind that has a batch form (claims and
        finishes) also run as one batch, and a batch fails as a whole.

        On PostgreSQL a write (or batch) that times out waiting for a row lock leaves
        ``group``, with ``_LockWaitInGroupError`` as its error, so that the caller runs it
        alone. Without ``isolated`` this then returns False. With it, the next write runs.
        A deadlock or serialization failure raises, and the caller runs the whole group
        again.
        """
        for pending in group:
            pending.result = pending.error = None
        batches = [[pending] for pending in group] if isolated else _batches(group)
        entries: builtins.list[dict[str, Any]] = []
        with (
            self._group_engine.connect() as connection,
            Session(
                bind=connection, join_transaction_mode="rollback_only", expire_on_commit=False
            ) as shared,
        ):
            connection.begin()
            for batch in batches:
                try:
                    if isolated:
                        entries.extend(self._write_in_savepoint(connection, batch[0]))
                    else:
                        entries.extend(self._write_in_session(shared, batch))
                except Exception as error:
                    if isinstance(error, DBAPIError) and self._is_transient(error):
                        raise  # The whole group runs again.
                    if isinstance(error, DBAPIError) and self._is_lock_timeout(error):
                        _leave_group(group, batch)
                        if isolated:
                            continue  # Its savepoint was rolled back.
                        return False
                    if not isolated and len(group) > 1:
                        return False
                    batch[0].error = self._write_error(batch[0].operation, error)
                    if not isolated:
                        return True  # The only write failed, so its transaction rolls back unused.
            if entries:
                write_journal(connection, entries, trim=self._journal_writes % TRIM_EVERY == 0)
            if not self._is_sqlite:
                # A commit that sends notifications waits for a lock of the server's
                # notification queue, which every database of the server shares. Under load
                # that wait can pass the group's lock timeout, so the commit gets the whole
                # busy_timeout, as a write in a worker thread does.
                connection.exec_driver_sql(
                    f"SET LOCAL lock_timeout = '{self._commit_lock_timeout}'"
                )
            connection.commit()
        if entries:
            self._journal_writes += 1
            self._feed.wake()
        return True

    def _write_in_session(
        self, session: Session, batch: builtins.list[PendingWrite]
    ) -> builtins.list[dict[str, Any]]:
        """Run one write of a group, or a batch of them, in the session of the group.

        Returns the journal entries of the writes. The session expunges its rows after each
        write, because some writes change rows with Core statements, which would leave the
        session's copies stale.
        """
        try:
            changes = begin_write_changes(session, journals=self._is_sqlite)
            if len(batch) == 1:
                batch[0].result = batch[0].work(session, *batch[0].args)
            else:
                batch_form = BATCH_FORMS[batch[0].work]
                results = batch_form(session, [pending.args for pending in batch])
                for pending, result in zip(batch, results, strict=True):
                    pending.result = result
            session.flush()
            return changes.journal_entries()
        finally:
            session.expunge_all()

    def _write_in_savepoint(
        self, connection: Connection, pending: PendingWrite
    ) -> builtins.list[dict[str, Any]]:
        """Run one write of a group in a savepoint; return its journal entries."""
        with Session(
            bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
        ) as session:
            session.begin()
            try:
                changes = begin_write_changes(session, journals=self._is_sqlite)
                pending.result = pending.work(session, *pending.args)
                session.commit()
            except BaseException:
                session.rollback()
                raise
            return changes.journal_entries()

    def _write_error(self, operation: str, error: Exception) -> Exception:
        """Return the error that the caller of a failed write gets."""
        if not isinstance(error, SQLAlchemyError):
            return error  # An error of the library, such as TaskStateError.
        store_error = self._store_error(operation, error)
        store_error.__cause__ = error
        return store_error

    def _time_out_group(self, group: builtins.list[PendingWrite], error: DBAPIError) -> None:
        for pending in group:
            pending.error = self._lock_timeout_error(pending.operation)
            pending.error.__cause__ = error

    def _fail_group(self, group: builtins.list[PendingWrite], error: SQLAlchemyError) -> None:
        for pending in group:
            pending.result = None
            pending.error = self._store_error(pending.operation, error)
            pending.error.__cause__ = error

    def _is_transient(self, error: DBAPIError) -> bool:
        if self._is_sqlite:
            code = getattr(error.orig, "sqlite_errorcode", None)
            return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_BUSY
        return getattr(error.orig, "sqlstate", None) in _RETRIED_SQLSTATES

    def _is_lock_timeout(self, error: DBAPIError) -> bool:
        return getattr(error.orig, "sqlstate", None) == _LOCK_TIMEOUT_SQLSTATE

    def _lock_timeout_error(self, operation: str) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"Timed out after {self._busy_timeout:g} s waiting for a lock on the task store "
            f"at {self._location} during {operation}. Another connection kept a write "
            "transaction open that long, so end that transaction or raise busy_timeout."
        )

    def _store_error(self, operation: str, error: SQLAlchemyError) -> StoreError:
        # Quote the driver's message only, because the SQL parameters may contain task arguments.
        cause = error.orig if isinstance(error, StatementError) else error
        if self._is_disconnect(error):
            return StoreUnavailableError(
                f"The task store at {self._location} could not be reached during "
                f"{operation}: {type(cause).__name__}: {cause}"
            )
        return StoreError(
            f"The task store at {self._location} failed during {operation}: "
            f"{type(cause).__name__}: {cause}"
        )

    def _is_disconnect(self, error: SQLAlchemyError) -> bool:
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if self._is_sqlite or not isinstance(error, OperationalError):
            return False
        # psycopg sets no SQLSTATE for errors of the connection itself (refused, lost).
        sqlstate = getattr(error.orig, "sqlstate", None)
        return sqlstate is None or sqlstate[:2] == "08" or sqlstate in _SERVER_GONE_SQLSTATES


def _create_engine(url: str, busy_timeout: float) -> tuple[Engine, str]:
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ConfigurationError(
            f"Invalid database URL {url!r}: {error}. Use a SQLAlchemy URL such as "
            "'sqlite:///var/tasks.db'."
        ) from error
    location = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend not in _SUPPORTED_BACKENDS:
        raise ConfigurationError(
            f"Unsupported database URL {location}: SqlStore works with SQLite "
            "('sqlite:///var/tasks.db') and PostgreSQL "
            "('postgresql+psycopg://user:password@host/database')."
        )

    if backend == "sqlite" and sqlite3.sqlite_version_info < _MIN_SQLITE_VERSION:
        raise ConfigurationError(
            f"SqlStore needs SQLite {'.'.join(map(str, _MIN_SQLITE_VERSION))} or newer, "
            f"but this Python uses SQLite {sqlite3.sqlite_version}. Use a Python built with "
            "a newer SQLite, or PostgreSQL."
        )

    options: dict[str, Any] = {"pool_size": _WORKER_THREADS}
    if backend == "sqlite":
        options["connect_args"] = {"timeout": busy_timeout, "check_same_thread": False}
        if parsed.database in (None, "", ":memory:"):
            # An in-memory database lives in one connection, so every thread must share it.
            options = {**options, "poolclass": StaticPool}
            del options["pool_size"]
    else:
        # One connection per worker thread; the change feed listens on one of its own. A
        # connection that the server closed (restart, idle timeout) is replaced at checkout.
        options.update(max_overflow=0, pool_pre_ping=True)

    try:
        engine = create_engine(parsed, **options)
    except ImportError as error:
        raise _missing_driver_error(parsed, location, error) from error
    except ArgumentError as error:
        raise ConfigurationError(f"Invalid database URL {location}: {error}.") from error

    if backend == "sqlite":
        _configure_sqlite(engine)
    else:
        _configure_postgres(engine, busy_timeout)
    return engine, location


def _create_group_engine(engine: Engine, busy_timeout: float) -> Engine:
    """Create the engine of the writer thread on PostgreSQL: one connection, short lock waits."""
    group_engine = create_engine(engine.url, pool_size=1, max_overflow=0, pool_pre_ping=True)
    _configure_postgres(group_engine, min(busy_timeout, _GROUP_LOCK_TIMEOUT))
    return group_engine


def _milliseconds(seconds: float) -> str:
    """Return ``seconds`` as a PostgreSQL duration in whole milliseconds, at least 1 ms."""
    return f"{max(1, round(seconds * 1000))}ms"


def _missing_driver_error(parsed: URL, location: str, error: ImportError) -> MissingExtraError:
    extra = _DRIVER_EXTRAS.get(parsed.get_backend_name())
    advice = (
        f"Install it with: pip install 'app-taskflow[{extra}]'"
        if extra
        else "Install the driver package that the URL names."
    )
    return MissingExtraError(
        f"The database driver for {location} is not installed ({error}). {advice}"
    )


class _LockWaitInGroupError(Exception):
    """The error of a write that left its group because it waited too long for a row lock."""


def _leave_group(group: builtins.list[PendingWrite], batch: builtins.list[PendingWrite]) -> None:
    """Take the writes of ``batch`` out of ``group``, to run alone (see _GROUP_LOCK_TIMEOUT)."""
    for pending in batch:
        group.remove(pending)
        pending.result = None
        pending.error = _LockWaitInGroupError()
    log.debug(
        "{} {} timed out waiting for a row lock in a group of writes; they run alone",
        len(batch),
        batch[0].operation,
    )


def _batches(group: builtins.list[PendingWrite]) -> builtins.list[builtins.list[PendingWrite]]:
    """Split a group into single writes and batches of the writes that have a batch form.

    The writes of one kind with a batch form make one batch, at the place of the first of
    them. That reorders writes, which is safe. Every write of a group waits for its result
    until the group commits, so the writes of a group are concurrent, and any order of
    them is one in which their callers could have sent them.
    """
    batches: builtins.list[builtins.list[PendingWrite]] = []
    by_work: dict[Callable[..., Any], builtins.list[PendingWrite]] = {}
    for pending in group:
        if pending.work not in BATCH_FORMS:
            batches.append([pending])
        elif pending.work in by_work:
            by_work[pending.work].append(pending)
        else:
            by_work[pending.work] = [pending]
            batches.append(by_work[pending.work])
    return batches


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: sqlite3.Connection, connection_record: object) -> None:
        # SQLAlchemy emits BEGIN itself (below), as its SQLite documentation advises, because
        # the sqlite3 module leaves SELECT and SAVEPOINT outside of transactions.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        # A transaction that reads and then writes must take the write lock at its start,
        # because taking it later fails with SQLITE_BUSY at once if another writer got in.
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _configure_postgres(engine: Engine, lock_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, connection_record: object) -> None:
        # Session settings: UTC times in change notifications, and how long a statement
        # waits for a row lock before it fails.
        cursor = dbapi_connection.cursor()
        cursor.execute(
            "SELECT set_config('TimeZone', 'UTC', false), set_config('lock_timeout', %s, false)",
            [_milliseconds(lock_timeout)],
        )
        cursor.close()
        # The settings are undone if the transaction that made them rolls back.
        dbapi_connection.commit()
