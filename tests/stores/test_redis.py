"""Tests of RedisStore beyond the contract: instances, processes, schema, watch and layout.

Most tests use the shared Redis server with a key prefix of their own. The reconnect test
starts its own ``redis-server`` on a free port and stops it by pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from contract_support import (
    INSTANCE_A,
    INSTANCE_B,
    TASK_NAMES,
    failure,
    log_entry,
    make_outcome,
)
from servers import REDIS

from app_taskflow.errors import (
    ConfigurationError,
    MissingExtraError,
    SchemaVersionError,
    StoreError,
)
from app_taskflow.models import TaskChange, TaskQuery, TaskRecord, TaskStatus
from app_taskflow.stores import redis as redis_store_module
from app_taskflow.stores.base import TaskStore
from app_taskflow.stores.memory import MemoryStore
from app_taskflow.stores.redis import SCHEMA_VERSION, RedisStore
from app_taskflow.stores.redis_scripts import DURATION_SAMPLES

if TYPE_CHECKING:
    import redis

RecordFactory = Callable[..., TaskRecord]
Clock = Callable[[float], datetime]
StoreOpener = Callable[..., Awaitable[RedisStore]]

REDIS_URL = f"redis://{REDIS.address}/0"
CHANGE_TIMEOUT = 5.0
"""Seconds to wait for one change; changes normally arrive within milliseconds."""


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """Yield a fresh key prefix on the shared server; delete its keys after the test."""
    key_prefix = f"taskflow-test-{secrets.token_hex(6)}"
    yield key_prefix
    keys = list(redis_client.scan_iter(match=f"{key_prefix}*", count=1000))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
async def open_store(prefix: str) -> AsyncIterator[StoreOpener]:
    """Return a function that opens a RedisStore, by default on ``prefix`` of the shared server.

    Every store it opened is closed after the test.
    """
    stores: list[RedisStore] = []

    async def open_one(url: str = REDIS_URL, key_prefix: str = prefix) -> RedisStore:
        store = RedisStore(url, prefix=key_prefix)
        stores.append(store)
        await store.open()
        return store

    yield open_one
    for store in stores:
        await store.close()


def prefix_keys(redis_client: redis.Redis, prefix: str) -> set[str]:
    return {key.decode() for key in redis_client.scan_iter(match=f"{prefix}:*", count=1000)}


async def wait_for_subscriber(client: redis.Redis, channel: str) -> None:
    """Wait until a client subscribes to ``channel``, so that no change published is missed."""
    for _ in range(100):
        [(_, subscribers)] = client.pubsub_numsub(channel)
        if subscribers:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"Nothing subscribed to {channel} within 5 s.")


async def close_watch(changes: AsyncIterator[TaskChange]) -> None:
    """Close what ``watch()`` returned: an async generator, though typed as an iterator."""
    assert isinstance(changes, AsyncGenerator)
    await changes.aclose()


# instances and processes


async def test_redis_concurrent_claims_two_instances(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    first, second = await open_store(), await open_store()
    records = [make_record() for _ in range(50)]
    await first.create(records)

    results = await asyncio.gather(
        *(
            store.claim(record.id, instance, clock(1))
            for record in records
            for store, instance in ((first, INSTANCE_A), (second, INSTANCE_B))
        )
    )

    claimed_ids = [claimed.id for claimed in results if claimed is not None]
    assert sorted(claimed_ids) == sorted(record.id for record in records)


async def test_redis_concurrent_creates_two_instances(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    first, second = await open_store(), await open_store()
    batches = [
        [make_record(idempotency_key=f"order-{number}") for number in range(20)] for _ in range(4)
    ]

    results = await asyncio.gather(
        *(store.create(batch) for store, batch in zip([first, second] * 2, batches, strict=True))
    )

    for position in range(20):
        assert len({ids[position] for ids in results}) == 1
    page = await first.list(TaskQuery(limit=1000))
    assert len(page.items) == 20


WORKER = """
import asyncio, json, sys
from datetime import UTC, datetime
from app_taskflow.models import TaskRecord, TaskStatus, new_task_id
from app_taskflow.stores.redis import RedisStore

async def run(job):
    store = RedisStore(job["url"], prefix=job["prefix"])
    await store.open()
    print("ready", flush=True)
    sys.stdin.readline()
    now = datetime(2030, 1, 2, tzinfo=UTC)
    results = []
    if job["mode"] == "claim":
        for task_id in job["work"]:
            if await store.claim(task_id, job["instance"], now) is not None:
                results.append(task_id)
    elif job["mode"] == "claim_next":
        while batch := await store.claim_next(job["instance"], now, 3, ["send_email"]):
            results.extend(record.id for record in batch)
    else:
        for key in job["work"]:
            record = TaskRecord(
                id=new_task_id(), name="send_email", status=TaskStatus.PENDING,
                args=[key], created_at=now, idempotency_key=key,
            )
            results.extend(await store.create([record]))
    await store.close()
    return results

while line := sys.stdin.readline():
    print(json.dumps(asyncio.run(run(json.loads(line)))), flush=True)
"""

WORKER_COUNT = 4


@pytest.fixture(scope="module")
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    """Yield worker processes that run jobs on RedisStores of their own, stopped at the end.

    Started once per module, because importing app-taskflow takes seconds on a busy host.
    """
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(WORKER_COUNT)
    ]
    yield processes
    for process in processes:
        assert process.stdin is not None
        process.stdin.close()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def run_jobs(
    workers: list[subprocess.Popen[str]], prefix: str, mode: str, work: list[str]
) -> list[list[str]]:
    """Run one job in every worker, all starting at once; return the ids each one output.

    Each worker opens a RedisStore on ``prefix``, reports ready and waits for a go line.
    Then it claims tasks (``claim`` each id in ``work``, or ``claim_next`` until none is
    left) or creates one task per idempotency key in ``work``.
    """
    for number, process in enumerate(workers):
        job = {"url": REDIS_URL, "prefix": prefix, "mode": mode, "work": work}
        job["instance"] = f"instance-{number}"
        _send_line(process, json.dumps(job))
    for process in workers:
        assert _read_line(process) == "ready"
    for process in workers:
        _send_line(process, "go")
    return [json.loads(_read_line(process)) for process in workers]


def _send_line(process: subprocess.Popen[str], line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line + "\n")
    process.stdin.flush()


def _read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"Worker process {process.pid} exited with code {process.poll()}."
    return line.rstrip("\n")


@pytest.mark.parametrize("mode", ["claim", "claim_next"])
async def test_redis_processes_claim_each_task_once(
    open_store: StoreOpener,
    prefix: str,
    make_record: RecordFactory,
    workers: list[subprocess.Popen[str]],
    mode: str,
) -> None:
    store = await open_store()
    records = [make_record() for _ in range(200)]
    await store.create(records)
    task_ids = [record.id for record in records]

    results = await asyncio.to_thread(run_jobs, workers, prefix, mode, task_ids)

    claimed_ids = [task_id for result in results for task_id in result]
    assert sorted(claimed_ids) == sorted(task_ids)
    page = await store.list(TaskQuery(statuses=[TaskStatus.RUNNING], limit=1000))
    assert len(page.items) == 200


async def test_redis_processes_create_one_task_per_key(
    open_store: StoreOpener, prefix: str, workers: list[subprocess.Popen[str]]
) -> None:
    store = await open_store()
    keys = [f"order-{number}" for number in range(50)]

    results = await asyncio.to_thread(run_jobs, workers, prefix, "create", keys)

    for position in range(len(keys)):
        assert len({result[position] for result in results}) == 1
    page = await store.list(TaskQuery(limit=1000))
    assert sorted(task.idempotency_key or "" for task in page.items) == sorted(keys)


# watch


async def test_redis_watch_other_instance_change(
    open_store: StoreOpener, redis_client: redis.Redis, prefix: str, make_record: RecordFactory
) -> None:
    watching, writing = await open_store(), await open_store()
    changes = watching.watch()
    next_change = asyncio.ensure_future(anext(changes))
    await wait_for_subscriber(redis_client, f"{prefix}:changes")
    record = make_record()

    await writing.create([record])

    change = await asyncio.wait_for(next_change, CHANGE_TIMEOUT)
    assert change == TaskChange(task_id=record.id, summary=record.summary())
    await close_watch(changes)


class OwnServer:
    """A redis-server on a free port that a test starts, kills and starts again."""

    def __init__(self, executable: str, folder: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._command = [executable, "--port", str(self.port), "--bind", "127.0.0.1"]
        self._command += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._process = subprocess.Popen(self._command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not listen on port {self.port} within 10 s.")

    def kill(self) -> None:
        """Kill the server by its pid, as a crash would stop it, and wait until it exits."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    """Yield a started redis-server of this test only, killed after the test.

    Skips when redis-server is not installed, and fails instead in CI.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        message = "redis-server is not installed, so this test cannot start its own server."
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = OwnServer(executable, tmp_path)
    server.start()
    yield server
    server.kill()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_redis_watch_resync_after_reconnect(
    own_server: OwnServer, open_store: StoreOpener, make_record: RecordFactory
) -> None:
    import redis

    store = await open_store(own_server.url, "taskflow-reconnect")
    changes = store.watch()
    next_change = asyncio.ensure_future(anext(changes))
    with redis.Redis.from_url(own_server.url) as client:
        await wait_for_subscriber(client, "taskflow-reconnect:changes")
    own_server.kill()
    own_server.start()

    # The bound covers redis-py's own retries, with backoff of seconds, before the store's.
    resync = await asyncio.wait_for(next_change, 30)
    record = make_record()
    await store.create([record])
    change = await asyncio.wait_for(anext(changes), CHANGE_TIMEOUT)

    assert resync == TaskChange(resync=True)
    assert change.summary == record.summary()
    await close_watch(changes)


# schema, configuration and errors


async def test_redis_open_stores_schema_version(
    open_store: StoreOpener, redis_client: redis.Redis, prefix: str
) -> None:
    await open_store()

    assert redis_client.get(f"{prefix}:schema") == str(SCHEMA_VERSION).encode()


async def test_redis_open_rejects_newer_schema(
    open_store: StoreOpener, redis_client: redis.Redis, prefix: str
) -> None:
    redis_client.set(f"{prefix}:schema", SCHEMA_VERSION + 1)

    pattern = rf"schema version {SCHEMA_VERSION + 1}.*up to version {SCHEMA_VERSION}"
    with pytest.raises(SchemaVersionError, match=pattern):
        await open_store()


def test_redis_missing_driver_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from app_taskflow.container import build_redis_store

    for module in ("redis", "redis.asyncio", "redis.commands.core", "redis.exceptions"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "app_taskflow.stores.redis")

    with pytest.raises(MissingExtraError, match=r"pip install 'app-taskflow\[redis\]'"):
        build_redis_store(REDIS_URL, "taskflow")


def test_redis_invalid_url_raises() -> None:
    with pytest.raises(ConfigurationError, match="Invalid Redis URL 'http://localhost"):
        RedisStore("http://localhost:6379/0")


async def test_redis_unreachable_server_raises_store_error(open_store: StoreOpener) -> None:
    url = f"redis://user:secret@127.0.0.1:{_free_port()}/0"

    with pytest.raises(StoreError, match="during open: ConnectionError") as caught:
        await open_store(url)

    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is not None


async def test_redis_script_error_raises_store_error(
    open_store: StoreOpener, redis_client: redis.Redis, prefix: str, make_record: RecordFactory
) -> None:
    store = await open_store()
    redis_client.set(f"{prefix}:counts", "not a hash")

    with pytest.raises(StoreError, match=r"during create: ResponseError.*WRONGTYPE"):
        await store.create([make_record()])


# records and indexes


async def test_redis_create_equal_arguments_other_json(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    holder = make_record(args=[1], kwargs={"a": 1, "b": 2}, idempotency_key="order-42")
    await store.create([holder])
    same_call = make_record(args=[1.0], kwargs={"b": 2, "a": 1}, idempotency_key="order-42")
    other = make_record()

    task_ids = await store.create([same_call, other])

    assert task_ids == [holder.id, other.id]
    assert await store.get(same_call.id) is None


async def test_redis_get_converts_offsets_to_utc(
    open_store: StoreOpener, make_record: RecordFactory
) -> None:
    store = await open_store()
    created_at = datetime(2030, 1, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    record = make_record(created_at=created_at)
    await store.create([record])

    stored = await store.get(record.id)

    assert stored is not None
    assert stored.created_at == created_at
    assert stored.created_at.tzinfo == UTC


async def test_redis_duration_keeps_every_bit(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    record = make_record()
    await store.create([record])
    await store.claim(record.id, INSTANCE_A, clock(1))
    duration = 0.1 + 0.2

    await store.finish(
        record.id, INSTANCE_A, 1, make_outcome(TaskStatus.SUCCESS, clock(2), duration)
    )

    stored = await store.get(record.id)
    assert stored is not None
    assert stored.duration == duration


async def play_scenario(store: TaskStore, records: list[TaskRecord], clock: Clock) -> list[Any]:
    """Take five tasks through claims, retries, cancels, recovery and release.

    The third task is owned by ``INSTANCE_A`` and scheduled, so recovery releases it.

    Returns what every call returned and, at the end, every task, a list page and metrics.
    Claimed tasks are compared without logs, which ``claim`` may omit.
    """
    waiting, requeued, _, cancelled, plain = records
    results: list[Any] = [await store.create(records)]

    def claimed(task: TaskRecord | None) -> Any:
        return None if task is None else task.model_copy(update={"logs": []})

    results.append(claimed(await store.claim(waiting.id, INSTANCE_A, clock(1))))
    await store.append_logs(waiting.id, [log_entry(clock, 1.5, "connecting")])
    results.append(await store.finish(waiting.id, INSTANCE_A, 1, failure(clock(2), 1.0, clock(3))))
    results.append(claimed(await store.claim(requeued.id, INSTANCE_A, clock(1))))
    results.append(claimed(await store.claim(cancelled.id, INSTANCE_B, clock(1))))
    results.append(await store.cancel(cancelled.id, clock(2)))
    results.append(await store.finish(cancelled.id, INSTANCE_B, 1, failure(clock(2), 1, clock(3))))
    results.append(await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10)))
    results.append(await store.recover_expired(clock(20)))

    batch = await store.claim_next(INSTANCE_B, clock(200), limit=10, names=TASK_NAMES)
    results.append([claimed(task) for task in batch])
    for task in batch[:2]:
        outcome = make_outcome(TaskStatus.SUCCESS, clock(201), duration=1.25)
        results.append(await store.finish(task.id, INSTANCE_B, task.attempts, outcome))
    results.append(await store.release(INSTANCE_B, clock(210)))
    results.append(await store.retry(batch[-1].id, clock(220), extra_attempts=2))
    results.append(await store.cancel(plain.id, clock(230)))

    results.extend([await store.get(record.id) for record in records])
    results.append(await store.list(TaskQuery(limit=3)))
    results.append(await store.list(TaskQuery(search="connect")))
    results.append(await store.metrics())
    return results


async def test_redis_scenario_matches_memory_store(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    records = [
        make_record(max_attempts=3),
        make_record(requeue_on_interrupt=True),
        make_record(owner=INSTANCE_A, scheduled_at=clock(100)),
        make_record(max_attempts=2, idempotency_key="order-42"),
        make_record(),
    ]

    expected = await play_scenario(MemoryStore(), records, clock)
    results = await play_scenario(await open_store(), records, clock)

    assert len(results) == len(expected)
    for result, expected_result in zip(results, expected, strict=True):
        assert result == expected_result


async def test_redis_list_merges_status_sets(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    records = [make_record(created_at=clock(-(number % 4))) for number in range(24)]
    await store.create(records)
    for record in records[::3]:
        await store.cancel(record.id, clock(1))
    for record in records[1::3]:
        await store.claim(record.id, INSTANCE_A, clock(1))
    statuses = [TaskStatus.PENDING, TaskStatus.CANCELLED]
    kept = [record for index, record in enumerate(records) if index % 3 != 1]
    newest = sorted(kept, key=lambda record: (record.created_at, record.id), reverse=True)

    by_cursor: list[str] = []
    query = TaskQuery(statuses=statuses, limit=5)
    for _ in range(10):
        page = await store.list(query)
        by_cursor.extend(task.id for task in page.items)
        if page.next_cursor is None:
            break
        query = query.model_copy(update={"cursor": page.next_cursor})
    by_offset = await store.list(TaskQuery(statuses=statuses, limit=5, offset=7))

    assert by_cursor == [record.id for record in newest]
    assert [task.id for task in by_offset.items] == [record.id for record in newest[7:12]]


async def test_redis_search_across_round_trips(
    open_store: StoreOpener,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_store_module, "SEARCH_SCAN", 2)
    store = await open_store()
    decoys = [make_record() for _ in range(7)]
    folded = make_record(args=["Straße 1"])
    logged = make_record()
    quoted = make_record()
    await store.create([decoys[0], folded, *decoys[1:4], logged, quoted, *decoys[4:]])
    await store.append_logs(logged.id, [log_entry(clock, 1, "Wrote to STRASSE 1")])
    await store.append_logs(quoted.id, [log_entry(clock, 1, 'Said "hi" to the user')])

    by_folding = await store.list(TaskQuery(search="strasse 1", order="oldest"))
    by_quote = await store.list(TaskQuery(search='"hi"'))
    paged = await store.list(TaskQuery(search="strasse", order="oldest", limit=1, offset=1))

    assert [task.id for task in by_folding.items] == [folded.id, logged.id]
    assert [task.id for task in by_quote.items] == [quoted.id]
    assert [task.id for task in paged.items] == [logged.id]
    assert not paged.has_more


async def test_redis_metrics_keep_recent_durations(
    open_store: StoreOpener, make_record: RecordFactory, clock: Clock
) -> None:
    store = await open_store()
    records = [make_record() for _ in range(DURATION_SAMPLES + 1)]
    await store.create(records)
    for number, record in enumerate(records):
        await store.claim(record.id, INSTANCE_A, clock(1))
        duration = 1000.0 if number == 0 else 1.0
        outcome = make_outcome(TaskStatus.SUCCESS, clock(2 + number), duration)
        await store.finish(record.id, INSTANCE_A, 1, outcome)

    metrics = await store.metrics()

    assert metrics.counts[TaskStatus.SUCCESS] == DURATION_SAMPLES + 1
    assert metrics.duration.count == DURATION_SAMPLES
    assert metrics.duration.mean == 1.0


async def test_redis_prune_deletes_a_batch_per_call(
    open_store: StoreOpener,
    make_record: RecordFactory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_store_module, "PRUNE_BATCH", 2)
    store = await open_store()
    records = [make_record() for _ in range(5)]
    await store.create(records)
    for record in records:
        await store.cancel(record.id, clock(1))

    counts = [await store.prune(clock(100), max_age=0, max_count=None) for _ in range(4)]

    assert counts == [2, 2, 1, 0]


async def test_redis_prune_leaves_no_keys_of_tasks(
    open_store: StoreOpener,
    redis_client: redis.Redis,
    prefix: str,
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    store = await open_store()
    records = [
        make_record(name=name, idempotency_key=f"key-{index}")
        for index, name in enumerate(TASK_NAMES * 3)
    ]
    await store.create(records)
    for index, record in enumerate(records):
        await store.claim(record.id, INSTANCE_A, clock(1))
        await store.append_logs(record.id, [log_entry(clock, 1.5, "working")])
        await store.cancel(record.id, clock(2))
        status = [TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELLED][index % 3]
        await store.finish(record.id, INSTANCE_A, 1, make_outcome(status, clock(3)))
    await store.release(INSTANCE_A, clock(4))

    while await store.prune(clock(100), max_age=0, max_count=None):
        pass

    assert prefix_keys(redis_client, prefix) == {f"{prefix}:schema"}
