"""RedisStore: tasks kept in Redis and changed atomically by Lua scripts."""

from __future__ import annotations

import asyncio
import builtins
import json
from collections import defaultdict
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from app_taskflow.errors import (
    ConfigurationError,
    MissingExtraError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    TaskNotFoundError,
    TaskStateError,
)
from app_taskflow.events import ChangeFanout
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
    TaskStatus,
    TaskSummary,
    decode_cursor,
)
from app_taskflow.stores.base import TaskStore, build_metrics, build_page
from app_taskflow.stores.records import check_cancellable, check_retryable, check_same_task
from app_taskflow.stores.redis_scripts import (
    decode_change,
    decode_record,
    decode_summary,
    from_micros,
    load_scripts,
    log_arguments,
    optional,
    outcome_arguments,
    position,
    record_arguments,
    to_micros,
)

try:
    import redis.asyncio as redis_asyncio
    from redis.commands.core import AsyncScript
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as error:
    raise MissingExtraError(
        "RedisStore needs the redis package, which is not installed. "
        "Install it with: pip install 'app-taskflow[redis]'"
    ) from error

SCHEMA_VERSION = 1
"""Version of the key layout that this code reads and writes."""

PRUNE_BATCH = 500
"""Tasks deleted by one prune call, so that no prune blocks the Redis server for long."""

RECOVERY_BATCH = 1000
"""Tasks taken back by one recover_expired call, so that it blocks the server for little time."""

SEARCH_SCAN = 1000
"""Tasks that one round trip of a search reads at most."""

_CONNECT_TIMEOUT = 10.0
_MAX_CONNECTIONS = 1_000
"""Connections one store may open. redis-py's default of 100 raises MaxConnectionsError
once 100 tasks and the requests adding them use the store at once."""
# NOTE: redis-py's BlockingConnectionPool, which would wait instead, raised errors of its
# own under pytest (redis 8.2), so the store relies on a pool larger than its concurrency.
_LISTEN_TIMEOUT = 5.0
_HEALTH_CHECK_INTERVAL = 15
_FIRST_RECONNECT_DELAY = 0.1
_MAX_RECONNECT_DELAY = 10.0


class RedisStore(TaskStore):
    """A store in Redis, shared safely by app instances on any number of hosts.

    Every method after ``open()`` runs one Lua script (sent by SHA, loaded once per
    server), so each read-modify-write is atomic and takes one round trip. Only a search
    or tag filter in ``list()`` may take several. Keys start with ``prefix``: a task is a
    hash, its attempts and logs are lists, and sorted sets index tasks by creation, status,
    name, owner, due time and tag. The scripts keep counts per name and status for
    ``metrics()``.
    ``watch()`` listens on the pub/sub channel ``<prefix>:changes``, on which the scripts
    publish every change while any client subscribes to it.

    NOTE: the scripts reach keys that they compute, not only those passed in ``KEYS``, so
    Redis Cluster is not supported; only a single Redis server (7.0) is tested. Tasks are
    as durable as the server's persistence settings (RDB snapshots or AOF) make them.

    Args:
        url: a redis-py URL, such as ``redis://localhost:6379/0`` or ``rediss://...``.
        prefix: the start of every key and of the change channel, so that several apps can
            share one database.

    Raises:
        ConfigurationError: the URL is invalid.
    """

    supports_multiple_instances = True

    def __init__(self, url: str, *, prefix: str = "taskflow") -> None:
        self._prefix = prefix
        self._location = _location(url)
        try:
            # Options in the URL's query string take precedence over these.
            self._client: redis_asyncio.Redis = redis_asyncio.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=_CONNECT_TIMEOUT,
                health_check_interval=_HEALTH_CHECK_INTERVAL,
                max_connections=_MAX_CONNECTIONS,
            )
        except ValueError as error:
            raise ConfigurationError(
                f"Invalid Redis URL {self._location!r}: {error}. Use a URL such as "
                "'redis://localhost:6379/0'."
            ) from error
        self._scripts: dict[str, AsyncScript] = {
            name: self._client.register_script(source) for name, source in load_scripts().items()
        }
        self._changes = ChangeFanout(self._listen)

    async def open(self) -> None:
        schema_key = self._key("schema")
        try:
            stored = await self._client.get(schema_key)
            version = int(stored) if stored is not None else 0
            if version > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"The Redis task store at {self._location} (prefix {self._prefix!r}) has "
                    f"schema version {version}, but this version of app-taskflow supports up "
                    f"to version {SCHEMA_VERSION}. Upgrade app-taskflow, or use another prefix."
                )
            for number in range(version + 1, SCHEMA_VERSION + 1):
                await _MIGRATIONS[number](self)
                await self._client.set(schema_key, number)
        except RedisError as error:
            raise self._store_error("open", error) from error
        except ValueError as error:
            raise StoreError(
                f"The Redis task store at {self._location} has an invalid schema version in "
                f"{schema_key!r}: {error}. Delete the key only if no tasks use this prefix."
            ) from error

    async def close(self) -> None:
        await self._changes.close()
        await self._client.aclose()

    async def create(self, records: Sequence[TaskRecord]) -> list[str]:
        ids: list[str] = []
        remaining = list(records)
        while remaining:
            arguments = [str(len(remaining))]
            for record in remaining:
                arguments.extend(record_arguments(record))
            created, holder_fields = await self._run("create", args=arguments)
            ids.extend(created)
            if holder_fields is None:
                break

            # The script stopped at a key held by a task whose name or argument JSON differs.
            record = remaining[len(created)]
            holder = decode_record(holder_fields)
            check_same_task(holder, record)
            ids.append(holder.id)
            remaining = remaining[len(created) + 1 :]
        return ids

    async def get(self, task_id: str) -> TaskRecord | None:
        reply = await self._run("get", args=[task_id])
        return None if reply is None else decode_record(reply)

    async def list(self, query: TaskQuery) -> TaskPage:
        after = position(*decode_cursor(query.cursor)) if query.cursor else ""
        offset = 0 if query.cursor else query.offset
        if query.statuses is not None and not query.statuses:
            found: builtins.list[TaskSummary] = []
        elif query.search or query.tags:
            found = await self._search(query, after, offset)
        else:
            arguments = [query.order, after, str(offset), str(query.limit + 1)]
            reply = await self._run("list", keys=self._index_keys(query), args=arguments)
            found = [decode_summary(fields) for fields in json.loads(reply)]

        return build_page(found, query.limit, offset)

    async def metrics(self) -> TaskMetrics:
        flat_counts, flat_durations = await self._run("metrics")
        counts: dict[str, dict[TaskStatus, int]] = defaultdict(dict)
        for counter, count in zip(flat_counts[::2], flat_counts[1::2], strict=True):
            status, _, name = counter.partition(":")
            counts[name][TaskStatus(status)] = int(count)
        durations = {
            name: [float(duration) for duration in values.split()]
            for name, values in zip(flat_durations[::2], flat_durations[1::2], strict=True)
        }
        # NOTE: durations are those of the DURATION_SAMPLES most recently finished tasks
        # of each name (see redis_scripts.py), so percentiles describe recent tasks only.
        return build_metrics(counts, durations)

    async def claim(self, task_id: str, instance_id: str, now: datetime) -> TaskRecord | None:
        reply = await self._run("claim", args=[task_id, instance_id, to_micros(now)])
        return None if reply is None else decode_record(reply)

    async def claim_next(
        self, instance_id: str, now: datetime, limit: int, names: Collection[str]
    ) -> builtins.list[TaskRecord]:
        if limit <= 0 or not names:
            return []
        arguments = [instance_id, to_micros(now), str(limit), *sorted(set(names))]
        replies = await self._run("claim_next", args=arguments)
        return [decode_record(reply) for reply in replies]

    async def finish(
        self, task_id: str, instance_id: str, attempt: int, outcome: AttemptOutcome
    ) -> bool:
        arguments = [task_id, instance_id, str(attempt), *outcome_arguments(outcome)]
        return bool(await self._run("finish", args=arguments))

    async def append_logs(self, task_id: str, entries: Sequence[LogEntry]) -> None:
        if entries:
            await self._run("append_logs", args=[task_id, *log_arguments(entries)])

    async def heartbeat(
        self, instance_id: str, now: datetime, expires_at: datetime
    ) -> builtins.list[str]:
        ids: builtins.list[str] = await self._run(
            "heartbeat", args=[instance_id, to_micros(expires_at)]
        )
        return ids

    async def recover_expired(self, now: datetime) -> RecoveryReport:
        released, requeued, interrupted = await self._run(
            "recover_expired", args=[to_micros(now), str(RECOVERY_BATCH)]
        )
        return RecoveryReport(released=released, requeued=requeued, interrupted=interrupted)

    async def earliest_lease_end(self) -> datetime | None:
        # The score of each lease is its end, in microseconds since the Unix epoch.
        try:
            first = await self._client.zrange(
                self._key("leases"), 0, 0, withscores=True, score_cast_func=str
            )
        except RedisError as error:
            raise self._store_error("earliest_lease_end", error) from error
        return from_micros(str(first[0][1])) if first else None

    async def release(self, instance_id: str, now: datetime) -> RecoveryReport:
        released, requeued, interrupted = await self._run(
            "release", args=[instance_id, to_micros(now)]
        )
        return RecoveryReport(released=released, requeued=requeued, interrupted=interrupted)

    async def cancel(self, task_id: str, now: datetime) -> TaskRecord:
        reply = await self._run("cancel", args=[task_id, to_micros(now)])
        if reply[0] == "missing":
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        record = decode_record(reply[1])
        if reply[0] == "finished":
            check_cancellable(record)
        return record

    async def retry(self, task_id: str, now: datetime, extra_attempts: int) -> TaskRecord:
        reply = await self._run("retry", args=[task_id, str(extra_attempts)])
        if reply[0] == "missing":
            raise TaskNotFoundError(f"No task has id {task_id!r}.")
        record = decode_record(reply[1])
        if reply[0] == "status":
            check_retryable(record)
        if reply[0] == "key_held":
            raise TaskStateError(
                f"Task {task_id} cannot be retried: its idempotency key "
                f"{record.idempotency_key!r} is now held by task {reply[2]}."
            )
        return record

    async def prune(self, now: datetime, max_age: float | None, max_count: int | None) -> int:
        if max_age is None and max_count is None:
            return 0
        cutoff = "" if max_age is None else to_micros(now - timedelta(seconds=max_age))
        keep = "" if max_count is None else str(max(max_count, 0))
        return int(await self._run("prune", args=[cutoff, keep, str(PRUNE_BATCH)]))

    def watch(self) -> AsyncGenerator[TaskChange, None]:
        return self._changes.watch()

    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    def _index_keys(self, query: TaskQuery) -> builtins.list[str]:
        """Return the sets of positions whose union contains the tasks ``query`` filters."""
        statuses = sorted(set(query.statuses or TaskStatus))
        if len(statuses) == len(TaskStatus):
            return [self._key("all") if query.name is None else self._key("name", query.name)]
        if query.name is None:
            return [self._key("status", status) for status in statuses]
        return [self._key("status-name", status, query.name) for status in statuses]

    async def _search(
        self, query: TaskQuery, after: str, offset: int
    ) -> builtins.list[TaskSummary]:
        """Return up to ``offset + limit + 1`` matches of ``query``, from ``offset`` on.

        Used for a search, a tag filter or both. With tags, the script scans the position
        set of the rarest tag and checks the other filters on each task. Without tags, it
        scans the sets of the status and name filters.

        NOTE: a search scans the tasks that the other filters leave, in list order and
        SEARCH_SCAN per round trip, until it has enough matches. A text found in few tasks
        therefore reads every one of them, and each round trip blocks Redis for a few ms.
        """
        text = query.search.casefold() if query.search else None
        search_argument = ""
        if text is not None:
            # The script folds ASCII only, and it reads log entries as JSON text, in which
            # quotes, backslashes and control characters are escaped. So it takes other
            # texts as matching every task, and Python checks them all.
            plain = text.isascii() and text.isprintable() and not any(c in text for c in '"\\')
            search_argument = "=" + (text if plain else "")
        filters = ["", ""]
        keys = self._index_keys(query)
        if query.tags:
            statuses = " ".join(sorted(query.statuses)) if query.statuses is not None else ""
            filters = [statuses, optional(query.name)]
            for key, value in sorted(query.tags.items()):
                filters.extend((key, value))
            keys = [self._key("tag", key, value) for key, value in sorted(query.tags.items())]

        needed = offset + query.limit + 1
        matches: builtins.list[TaskSummary] = []
        while len(matches) < needed:
            arguments = [
                query.order,
                after,
                search_argument,
                str(SEARCH_SCAN),
                str(needed - len(matches)),
                *filters,
            ]
            last, exhausted, candidates = await self._run("search", keys=keys, args=arguments)
            for candidate in json.loads(candidates):
                if text is None or _mentions(candidate["task"], candidate["logs"], text):
                    matches.append(decode_summary(candidate["task"]))
            if exhausted or last is None:
                break
            after = last
        return matches[offset:needed]

    async def _run(self, script: str, keys: Sequence[str] = (), args: Sequence[str] = ()) -> Any:
        """Run one of the Lua scripts; every Redis error leaves here as ``StoreError``."""
        try:
            return await self._scripts[script](keys=keys, args=[self._prefix, *args])
        except RedisError as error:
            raise self._store_error(script, error) from error

    def _store_error(self, operation: str, error: RedisError) -> StoreError:
        message = (
            f"The Redis task store at {self._location} failed during {operation}: "
            f"{type(error).__name__}: {str(error).rstrip('.')}."
        )
        if isinstance(error, RedisConnectionError | RedisTimeoutError):
            # The dispatcher waits out this class of error as an outage, but retries other
            # errors only a few times.
            return StoreUnavailableError(
                f"{message} Check that the Redis server is running and reachable from this host."
            )
        return StoreError(message)

    async def _listen(self, changes: ChangeFanout) -> None:
        """Hand every message of the change channel to ``changes``, reconnecting on errors.

        Messages published while the subscription is down are lost, so after every
        subscription but the first, watchers get a resync change. redis-py may also
        reconnect by itself; its new subscription is noticed the same way.
        """
        channel = self._key("changes")
        delay = _FIRST_RECONNECT_DELAY
        failures = 0
        subscribed_before = False
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=_LISTEN_TIMEOUT)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        if subscribed_before:
                            log.warning(
                                "Subscribed again to the change channel of the Redis task "
                                "store at {}; watchers get a resync for the changes missed",
                                self._location,
                            )
                            changes.publish(TaskChange(resync=True))
                        subscribed_before = True
                        failures = 0
                        delay = _FIRST_RECONNECT_DELAY
                    elif message["type"] == "message":
                        _publish_message(changes, message["data"])
            except RedisError as error:
                # One warning per outage; the attempts that follow it go to DEBUG.
                failures += 1
                if failures == 1:
                    log.warning(
                        "Lost the change channel of the Redis task store at {} ({}: {}); "
                        "reconnecting with backoff of up to {:g} s",
                        self._location,
                        type(error).__name__,
                        error,
                        _MAX_RECONNECT_DELAY,
                    )
                else:
                    log.debug(
                        "Reconnect attempt {} to the Redis task store at {} failed: {}",
                        failures,
                        self._location,
                        error,
                    )
            finally:
                await _close_quietly(pubsub)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RECONNECT_DELAY)


async def _migrate_to_1(store: RedisStore) -> None:
    """Start the first key layout; its keys are created as tasks arrive."""


_MIGRATIONS = {1: _migrate_to_1}
"""Migration to each schema version from the one before it.

Two instances that start at once may both run a migration, so each must be idempotent.
"""


def _publish_message(changes: ChangeFanout, data: str) -> None:
    try:
        change = decode_change(data)
    except ValueError as error:
        log.error("Ignored an invalid message on the task change channel: {}", error)
        return
    changes.publish(change)


async def _close_quietly(pubsub: Any) -> None:
    try:
        await pubsub.aclose()
    except RedisError as error:
        log.debug("Closing the change channel subscription failed: {}", error)


def _mentions(
    fields: Mapping[str, str], logs: Sequence[Mapping[str, Any]], folded_text: str
) -> bool:
    """Return whether a task's searched fields or log messages contain ``folded_text``.

    ``args`` and ``kwargs`` are compared as stored: the JSON text that ``json.dumps`` makes.
    """
    for name in ("id", "name", "args", "kwargs", "error_type", "error_message"):
        value = fields.get(name)
        if value is not None and folded_text in value.casefold():
            return True
    return any(folded_text in str(entry["message"]).casefold() for entry in logs)


def _location(url: str) -> str:
    """Return the URL without user name and password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
