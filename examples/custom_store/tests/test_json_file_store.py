"""Tests of what JsonFileStore adds to the contract: the file, its lock and its writes.

The contract itself runs in ``tests/stores`` as the ``example-json`` kind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from dependency_injector import providers
from fastapi import Depends, FastAPI

from app_taskflow import TaskflowContainer, TaskflowTasks, TaskStatus, task_log
from app_taskflow.config import parse_settings
from app_taskflow.errors import SchemaVersionError, StoreError
from app_taskflow.models import (
    TERMINAL_STATUSES,
    AttemptOutcome,
    LogEntry,
    TaskChange,
    TaskQuery,
    TaskRecord,
    new_task_id,
)
from examples.custom_store import JsonFileStore, json_file_store, snapshot_file
from examples.custom_store.snapshot_file import lock_exclusively

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
INSTANCE = "instance-a"


def make_record(**fields: Any) -> TaskRecord:
    values: dict[str, Any] = {
        "id": new_task_id(),
        "name": "send_email",
        "status": TaskStatus.PENDING,
        "args": ["user@example.com"],
        "kwargs": {"subject": "Welcome"},
        "created_at": NOW,
    }
    values.update(fields)
    return TaskRecord(**values)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "tasks.json"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[JsonFileStore]:
    task_store = JsonFileStore(path)
    await task_store.open()
    try:
        yield task_store
    finally:
        await task_store.close()


async def reopened(path: Path) -> JsonFileStore:
    task_store = JsonFileStore(path)
    await task_store.open()
    return task_store


async def test_reopen_returns_same_record(store: JsonFileStore, path: Path) -> None:
    [task_id] = await store.create([make_record(idempotency_key="welcome-42")])
    assert await store.claim(task_id, INSTANCE, NOW) is not None
    await store.append_logs(task_id, [LogEntry(timestamp=NOW, message="sent", attempt=1)])
    outcome = AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=NOW, duration=0.5)
    assert await store.finish(task_id, INSTANCE, 1, outcome)
    before = await store.get(task_id)
    await store.close()

    later = await reopened(path)
    try:
        after = await later.get(task_id)
    finally:
        await later.close()

    assert after is not None
    assert after == before


async def test_reopen_keeps_idempotency_key(store: JsonFileStore, path: Path) -> None:
    [first_id] = await store.create([make_record(idempotency_key="welcome-42")])
    await store.close()

    later = await reopened(path)
    try:
        [second_id] = await later.create([make_record(idempotency_key="welcome-42")])
    finally:
        await later.close()

    assert second_id == first_id


async def test_reopen_recovers_running_task(store: JsonFileStore, path: Path) -> None:
    [task_id] = await store.create([make_record()])
    await store.heartbeat(INSTANCE, NOW, NOW + timedelta(seconds=30))
    assert await store.claim(task_id, INSTANCE, NOW) is not None
    # Closed without release(), as a crash leaves it, while the lease is still valid.
    await store.close()

    later = await reopened(path)
    try:
        report = await later.recover_expired(NOW + timedelta(seconds=1))
    finally:
        await later.close()

    assert report.interrupted == [task_id]


async def test_open_while_open_raises(store: JsonFileStore, path: Path) -> None:
    second = JsonFileStore(path)

    with pytest.raises(StoreError, match="already open in another JsonFileStore"):
        await second.open()


async def test_open_after_close_succeeds(store: JsonFileStore, path: Path) -> None:
    [task_id] = await store.create([make_record()])
    await store.close()

    later = await reopened(path)
    try:
        record = await later.get(task_id)
    finally:
        await later.close()

    assert record is not None


@pytest.fixture
def newer_file(path: Path) -> Path:
    path.write_text('{"format": 2, "tasks": []}', encoding="utf-8")
    return path


@pytest.fixture(
    params=[
        pytest.param("{not json", id="invalid_json"),
        pytest.param('{"format": 1, "tasks": [{"id": 7}]}', id="invalid_task"),
        pytest.param("[]", id="not_an_object"),
    ]
)
def invalid_file(path: Path, request: pytest.FixtureRequest) -> Path:
    path.write_text(request.param, encoding="utf-8")
    return path


async def test_open_newer_format_raises(newer_file: Path) -> None:
    with pytest.raises(SchemaVersionError, match="has format 2"):
        await JsonFileStore(newer_file).open()


async def test_open_failure_releases_lock(newer_file: Path) -> None:
    with pytest.raises(SchemaVersionError):
        await JsonFileStore(newer_file).open()

    # Raises StoreError if the failed open kept the lock.
    lock_exclusively(newer_file).close()


async def test_open_invalid_file_raises(invalid_file: Path) -> None:
    with pytest.raises(StoreError, match="is not a JsonFileStore file"):
        await JsonFileStore(invalid_file).open()


class Disk:
    """Replaces the store's file writes, to fill the disk or hold writes back.

    While ``full`` is set, each write fails. While ``gate`` is set and not open, each write
    waits for it. ``started`` is set by the first write, and ``max_running`` is the largest
    number of writes that ran at once.
    """

    def __init__(self) -> None:
        self.full = False
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def write(self, target: Path, data: bytes) -> None:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        self.started.set()
        try:
            if self.gate is not None:
                self.gate.wait(timeout=10)
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            snapshot_file.replace_atomically(target, data)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    replacement = Disk()
    monkeypatch.setattr(json_file_store, "replace_atomically", replacement.write)
    return replacement


async def test_failed_save_undoes_change(store: JsonFileStore, path: Path, disk: Disk) -> None:
    first = make_record()
    disk.full = True
    with pytest.raises(StoreError, match="No space left on device"):
        await store.create([first])
    undone = await store.get(first.id)
    disk.full = False
    second = make_record()
    await store.create([second])
    await store.close()

    later = await reopened(path)
    try:
        saved = [await later.get(first.id), await later.get(second.id)]
    finally:
        await later.close()

    assert undone is None
    assert saved[0] is None
    assert saved[1] is not None


async def test_failed_save_undoes_concurrent_changes(store: JsonFileStore, disk: Disk) -> None:
    disk.full = True

    results = await asyncio.gather(
        *(store.create([make_record()]) for _ in range(5)), return_exceptions=True
    )

    assert [type(result) for result in results] == [StoreError] * 5
    assert (await store.list(TaskQuery())).items == []


async def test_claim_after_failed_save_succeeds(store: JsonFileStore, disk: Disk) -> None:
    # The dispatcher repeats a store call that failed, so the repeated claim must find the
    # task PENDING again rather than already claimed.
    [task_id] = await store.create([make_record()])
    disk.full = True
    with pytest.raises(StoreError):
        await store.claim(task_id, INSTANCE, NOW)
    disk.full = False

    claimed = await store.claim(task_id, INSTANCE, NOW)

    assert claimed is not None
    assert claimed.attempts == 1


async def test_failed_save_sends_resync(store: JsonFileStore, disk: Disk) -> None:
    disk.full = True
    changes = store.watch()
    first = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0)
    try:
        with pytest.raises(StoreError):
            await store.create([make_record()])
        created = await asyncio.wait_for(first, 5)
        resync = await asyncio.wait_for(anext(changes), 5)
    finally:
        await changes.aclose()

    assert created.summary is not None
    assert resync == TaskChange(resync=True)


async def test_unserializable_change_undone(store: JsonFileStore) -> None:
    with pytest.raises(StoreError, match="Unable to serialize"):
        await store.create([make_record(args=[object()])])

    [task_id] = await store.create([make_record()])
    assert [item.id for item in (await store.list(TaskQuery())).items] == [task_id]


async def test_cancelled_save_still_writes(store: JsonFileStore, path: Path, disk: Disk) -> None:
    disk.gate = threading.Event()
    first, second = make_record(), make_record()
    creating = asyncio.ensure_future(store.create([first]))
    assert await asyncio.to_thread(disk.started.wait, 5)
    creating.cancel()
    await asyncio.gather(creating, return_exceptions=True)

    # A write of its own for the second task would start now, beside the first one.
    creating_second = asyncio.ensure_future(store.create([second]))
    await asyncio.sleep(0.1)
    disk.gate.set()
    await creating_second
    await store.close()

    later = await reopened(path)
    try:
        saved = [await later.get(first.id), await later.get(second.id)]
    finally:
        await later.close()

    assert disk.max_running == 1
    assert None not in saved


async def test_concurrent_creates_share_writes(
    store: JsonFileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshots: list[int] = []
    writes: list[int] = []
    dump = snapshot_file.dump_snapshot
    write = snapshot_file.replace_atomically

    def count_snapshot(tasks: Iterable[TaskRecord]) -> bytes:
        snapshots.append(1)
        return dump(tasks)

    def count_write(target: Path, data: bytes) -> None:
        writes.append(1)
        write(target, data)

    monkeypatch.setattr(json_file_store, "dump_snapshot", count_snapshot)
    monkeypatch.setattr(json_file_store, "replace_atomically", count_write)

    await asyncio.gather(*(store.create([make_record()]) for _ in range(20)))

    # The 20 creates run before the write task that the first one started, so that
    # write saves all of them.
    assert len(snapshots) == 1
    assert len(writes) == 1


async def test_saves_leave_only_file_and_lock(store: JsonFileStore, tmp_path: Path) -> None:
    [task_id] = await store.create([make_record()])
    await store.cancel(task_id, NOW)

    assert sorted(os.listdir(tmp_path)) == ["tasks.json", "tasks.json.lock"]


async def test_file_readable_by_owner_only(store: JsonFileStore, path: Path) -> None:
    await store.create([make_record()])

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_container_override_runs_task(path: Path) -> None:
    container = TaskflowContainer.from_settings(parse_settings({"store": {"kind": "memory"}}))
    container.store.override(providers.Singleton(JsonFileStore, path))
    taskflow = container.taskflow()
    app = FastAPI(lifespan=taskflow.lifespan)
    taskflow.install(app)

    @taskflow.task()
    def send_email(address: str) -> None:
        task_log(f"Sending to {address}")

    @app.post("/signup")
    def signup(email: str, tasks: TaskflowTasks = Depends()) -> dict[str, str]:
        return {"task_id": tasks.add_task(send_email, address=email)}

    async with taskflow.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            response = await client.post("/signup", params={"email": "user@example.com"})
            task_id = response.json()["task_id"]
            await wait_until(lambda: taskflow.store.get(task_id), TERMINAL_STATUSES)

    later = await reopened(path)
    try:
        record = await later.get(task_id)
    finally:
        await later.close()

    assert record is not None
    assert record.status is TaskStatus.SUCCESS
    assert [entry.message for entry in record.logs] == ["Sending to user@example.com"]


async def wait_until(read: Callable[[], Any], statuses: frozenset[TaskStatus]) -> None:
    async with asyncio.timeout(10):
        while True:
            record = await read()
            if record is not None and record.status in statuses:
                return
            await asyncio.sleep(0.01)
