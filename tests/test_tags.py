"""Task tags and origin: checks, storage through a request, log lines, API filter and config."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import APIRouter, BackgroundTasks, Depends
from integration_fixtures import MakeApp, RunningApp, wait_for_status
from integration_fixtures import make_app as make_app  # registers the fixture
from logging_support import build_taskflow, captured_records, run_task, started
from sqlalchemy import event
from sqlalchemy.engine import Engine

from app_taskflow import (
    ConfigurationError,
    TaskArgumentError,
    TaskflowContainer,
    TaskflowRoute,
    TaskflowTasks,
    TaskRecord,
    TaskStatus,
    task_log,
)
from app_taskflow.config import parse_settings
from app_taskflow.logfile import TaskLogFileOptions
from app_taskflow.middleware import MAX_REQUEST_ID_CHARS
from app_taskflow.models import TERMINAL_STATUSES, TaskOrigin, TaskQuery, new_task_id, utcnow
from app_taskflow.stores import SqlStore
from app_taskflow.taskflow import Taskflow, check_tags

Tasks = Annotated[TaskflowTasks, Depends()]

TAGS = {"user_id": "42", "plan": "pro"}


# check_tags


def test_check_tags_none_is_empty() -> None:
    assert check_tags(None) == {}


def test_check_tags_returns_copy() -> None:
    tags = {"user_id": "42"}

    checked = check_tags(tags)
    tags["user_id"] = "43"

    assert checked == {"user_id": "42"}


def test_check_tags_accepts_limits() -> None:
    tags = {f"k{number}": "v" for number in range(19)}
    tags["_" + "a" * 63] = "x" * 256

    assert check_tags(tags) == tags


@pytest.mark.parametrize(
    "key",
    ["", "1st", "user id", "user:id", "a" * 65, "über", "-x", ".x"],
    ids=["empty", "digit-first", "space", "colon", "65-chars", "non-ascii", "dash-first", "dot"],
)
def test_check_tags_invalid_key(key: str) -> None:
    with pytest.raises(TaskArgumentError, match=f"Invalid tag key '{key}'"):
        check_tags({key: "v"})


def test_check_tags_value_too_long() -> None:
    with pytest.raises(TaskArgumentError, match=r"tag 'note'.* 257 characters.* at most 256"):
        check_tags({"note": "x" * 257})


def test_check_tags_too_many() -> None:
    tags = {f"k{number}": "v" for number in range(21)}

    with pytest.raises(TaskArgumentError, match=r"Too many tags: 21 .* at most 20"):
        check_tags(tags)


def test_check_tags_lone_surrogate() -> None:
    with pytest.raises(TaskArgumentError, match=r"tag 'name'.* lone surrogate"):
        check_tags({"name": "bad\udcff"})


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        (["user_id", "42"], r"Invalid tags \['user_id', '42'\]: expected a dict"),
        ("user_id=42", "Invalid tags 'user_id=42': expected a dict"),
        ({1: "v"}, "Invalid tag key 1: expected a string"),
        ({"user_id": 42}, r"Invalid value 42 of tag 'user_id': expected a string.*str\(42\)"),
        ({"user_id": None}, "Invalid value None of tag 'user_id'"),
    ],
    ids=["list", "string", "int-key", "int-value", "none-value"],
)
def test_check_tags_wrong_type(tags: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        check_tags(tags)


# add_task in a request


def add_signup_routes(running: RunningApp, received: list[dict[str, Any]]) -> None:
    """Declare task ``welcome`` and routes that add it, sync and async, with ``TAGS``."""

    @running.taskflow.task(name="welcome")
    def welcome(**kwargs: Any) -> None:
        received.append(kwargs)
        task_log("Welcome sent")

    @running.app.post("/signup")
    def signup(email: str, tasks: Tasks) -> dict[str, str]:
        return {"task_id": tasks.add_task(welcome, email=email, tags=TAGS)}

    @running.app.post("/signup-async")
    async def signup_async(email: str, tasks: Tasks) -> dict[str, str]:
        return {"task_id": await tasks.add_task_async(welcome, email=email, tags=TAGS)}


@pytest.mark.parametrize("path", ["/signup", "/signup-async"])
async def test_add_task_stores_tags(make_app: MakeApp, path: str) -> None:
    running = await make_app()
    received: list[dict[str, Any]] = []
    add_signup_routes(running, received)

    response = await running.client.post(path, params={"email": "ada@example.com"})
    record = await running.wait_for_status(response.json()["task_id"], TaskStatus.SUCCESS)

    assert record.tags == TAGS
    assert record.kwargs == {"email": "ada@example.com"}
    assert received == [{"email": "ada@example.com"}]


@pytest.mark.parametrize("path", ["/signup", "/signup-async"])
async def test_add_task_records_origin(make_app: MakeApp, path: str) -> None:
    running = await make_app()
    add_signup_routes(running, [])

    response = await running.client.post(
        path, params={"email": "ada@example.com"}, headers={"X-Request-ID": "req-7f3a"}
    )
    record = await running.store.get(response.json()["task_id"])

    assert record is not None
    assert record.origin == TaskOrigin(method="POST", path=path, request_id="req-7f3a")


async def test_origin_without_request_id(make_app: MakeApp) -> None:
    running = await make_app()
    add_signup_routes(running, [])

    response = await running.client.post("/signup", params={"email": "ada@example.com"})
    record = await running.store.get(response.json()["task_id"])

    assert record is not None
    assert record.origin == TaskOrigin(method="POST", path="/signup", request_id=None)


async def test_origin_request_id_cut(make_app: MakeApp) -> None:
    running = await make_app()
    add_signup_routes(running, [])

    response = await running.client.post(
        "/signup", params={"email": "a@example.com"}, headers={"X-Request-ID": "r" * 500}
    )
    record = await running.store.get(response.json()["task_id"])

    assert record is not None
    assert record.origin is not None
    assert record.origin.request_id == "r" * MAX_REQUEST_ID_CHARS


async def test_origin_custom_header(make_app: MakeApp) -> None:
    running = await make_app()
    running.taskflow.request_id_header = "X-Correlation-ID"
    add_signup_routes(running, [])

    response = await running.client.post(
        "/signup",
        params={"email": "ada@example.com"},
        headers={"X-Request-ID": "ignored", "x-correlation-id": "corr-1"},
    )
    record = await running.store.get(response.json()["task_id"])

    assert record is not None
    assert record.origin is not None
    assert record.origin.request_id == "corr-1"


async def test_origin_header_off(make_app: MakeApp) -> None:
    running = await make_app()
    running.taskflow.request_id_header = None
    add_signup_routes(running, [])

    response = await running.client.post(
        "/signup", params={"email": "ada@example.com"}, headers={"X-Request-ID": "req-1"}
    )
    record = await running.store.get(response.json()["task_id"])

    assert record is not None
    assert record.origin == TaskOrigin(method="POST", path="/signup")


async def test_routing_records_origin(make_app: MakeApp) -> None:
    running = await make_app()
    router = APIRouter(route_class=TaskflowRoute)

    @running.taskflow.task
    def rebuild(shard: int) -> None:
        pass

    @router.put("/shards/{shard}")
    def rebuild_shard(shard: int, background_tasks: BackgroundTasks) -> dict[str, str]:
        background_tasks.add_task(rebuild, shard)
        return {}

    running.app.include_router(router)
    await running.client.put("/shards/3", headers={"X-Request-ID": "req-9"})
    [summary] = (await running.store.list(TaskQuery())).items
    record = await running.store.get(summary.id)

    assert record is not None
    assert record.origin == TaskOrigin(method="PUT", path="/shards/3", request_id="req-9")


async def test_add_task_invalid_tags_raise(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task
    def welcome() -> None:
        pass

    @running.app.post("/bad")
    def bad(tasks: Tasks) -> dict[str, str]:
        try:
            tasks.add_task(welcome, tags={"user id": "1"})
        except TaskArgumentError as error:
            return {"error": str(error)}
        return {"error": ""}

    response = await running.client.post("/bad")
    page = await running.store.list(TaskQuery())

    assert response.json()["error"].startswith("Invalid tag key 'user id'")
    assert page.items == []


async def test_taskflow_add_task_tags() -> None:
    taskflow = build_taskflow()

    @taskflow.task
    def job() -> None:
        pass

    async with started(taskflow):
        task_id = await taskflow.add_task(job, tags={"batch": "b1"})
        record = await taskflow.store.get(task_id)

    assert record is not None
    assert record.tags == {"batch": "b1"}
    assert record.origin is None


# log lines


async def run_tagged(taskflow: Taskflow, func: Any, tags: dict[str, str]) -> TaskRecord:
    """Add a task with ``tags`` outside any request; return its record once finished."""
    task_id = await taskflow.add_task(func, tags=tags)
    return await wait_for_status(taskflow.store, task_id, *TERMINAL_STATUSES)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_timeline_lines_carry_tags(kind: str) -> None:
    taskflow = build_taskflow()

    def job() -> None:
        task_log("working", step=1)

    async def async_job() -> None:
        task_log("working", step=1)

    task = taskflow.task(name="job")(job if kind == "sync" else async_job)

    async with started(taskflow):
        with captured_records() as records:
            record = await run_tagged(taskflow, task, {"user_id": "42"})

    lines = [line for line in records if line["extra"].get("task_id") == record.id]
    events = [line["extra"].get("event", "task_log") for line in lines]
    assert events == ["added", "added", "started", "task_log", "succeeded"]
    assert all(line["extra"]["tag.user_id"] == "42" for line in lines)


async def test_task_log_extra_named_like_tag() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="job")
    def job() -> None:
        task_log("working", tags="mine", **{"tag.user_id": "spoofed"})

    async with started(taskflow):
        with captured_records() as records:
            record = await run_tagged(taskflow, job, {"user_id": "42"})

    [line] = [item for item in records if item["message"].endswith("working")]
    assert record.logs[0].extra == {"tags": "mine", "tag.user_id": "spoofed"}
    assert line["extra"]["tag.user_id"] == "42"
    assert line["extra"]["extra_tag.user_id"] == "spoofed"
    assert line["extra"]["tags"] == "mine"


async def test_log_file_lines_carry_tags(tmp_path: Path) -> None:
    path = tmp_path / "tasks.log"
    taskflow = build_taskflow(log_file=TaskLogFileOptions(path=str(path)))

    @taskflow.task(name="job")
    def job() -> None:
        task_log("working")

    async with started(taskflow):
        await run_tagged(taskflow, job, {"user_id": "42", "note": "two words"})

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    assert all(' tag.user_id=42 tag.note="two words"' in line for line in lines)


async def test_shutdown_line_carries_tags() -> None:
    taskflow = build_taskflow()
    began = asyncio.Event()

    @taskflow.task(name="index.rebuild")
    async def rebuild() -> None:
        began.set()
        await asyncio.sleep(30)

    with captured_records() as records:
        async with started(taskflow):
            task_id = await taskflow.add_task(rebuild, tags={"shard": "3"})
            await asyncio.wait_for(began.wait(), 5)

    [line] = [
        item
        for item in records
        if item["extra"].get("task_id") == task_id and item["extra"].get("event") == "interrupted"
    ]
    assert line["extra"]["tag.shard"] == "3"


async def test_untagged_lines_have_no_tag_fields() -> None:
    taskflow = build_taskflow()

    @taskflow.task(name="job")
    def job() -> None:
        task_log("working")

    async with started(taskflow):
        with captured_records() as records:
            record = await run_task(taskflow, job)

    fields = {
        key
        for line in records
        if line["extra"].get("task_id") == record.id
        for key in line["extra"]
    }
    assert not any(key.startswith("tag.") for key in fields)


# REST API


async def add_tagged(running: RunningApp, *tag_sets: dict[str, str]) -> list[str]:
    @running.taskflow.task(name="job")
    def job() -> None:
        pass

    ids = []
    for tags in tag_sets:
        task_id = await running.taskflow.add_task(job, tags=tags)
        await running.wait_for_status(task_id, TaskStatus.SUCCESS)
        ids.append(task_id)
    return ids


async def listed_ids(running: RunningApp, **params: Any) -> list[str]:
    response = await running.client.get("/tasks", params=params)
    assert response.status_code == 200
    return [item["id"] for item in response.json()["items"]]


async def test_api_filters_tag(make_app: MakeApp) -> None:
    running = await make_app()
    first, _, third = await add_tagged(
        running, {"user_id": "42"}, {"user_id": "43"}, {"user_id": "42", "plan": "pro"}
    )

    one_tag = await listed_ids(running, tag="user_id:42")
    two_tags = await listed_ids(running, tag=["user_id:42", "plan:pro"])
    no_match = await listed_ids(running, tag="user_id:44")

    assert one_tag == [third, first]
    assert two_tags == [third]
    assert no_match == []


async def test_api_tag_value_with_colon(make_app: MakeApp) -> None:
    running = await make_app()
    [task_id] = await add_tagged(running, {"url": "https://example.com"})

    assert await listed_ids(running, tag="url:https://example.com") == [task_id]


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ("user_id", "Invalid tag filter 'user_id': write it as key:value"),
        ("user id:1", "Invalid tag filter 'user id:1'"),
        (["a:1", "a:2"], "Tag filters a:1 and a:2 cannot both match"),
        ([f"k{n}:v" for n in range(21)], "Too many tag filters: 21"),
    ],
    ids=["no-colon", "invalid-key", "two-values", "too-many"],
)
async def test_api_invalid_tag_filter(make_app: MakeApp, tags: Any, message: str) -> None:
    running = await make_app()

    response = await running.client.get("/tasks", params={"tag": tags})

    assert response.status_code == 422
    assert response.json()["detail"].startswith(message)


async def test_api_bulk_retry_filters_tag(make_app: MakeApp) -> None:
    running = await make_app()

    @running.taskflow.task(name="flaky")
    def flaky() -> None:
        raise ValueError("down")

    untouched = await running.taskflow.add_task(flaky, tags={"user_id": "1"})
    retried = await running.taskflow.add_task(flaky, tags={"user_id": "2"})
    for task_id in (untouched, retried):
        await running.wait_for_status(task_id, TaskStatus.FAILED)

    response = await running.client.post("/tasks/retry", params={"tag": "user_id:2"})
    await running.wait_for_attempts(retried, 2)
    untouched_record = await running.store.get(untouched)

    assert response.json()["retried"] == 1
    assert untouched_record is not None
    assert untouched_record.attempts == 1


async def test_api_record_fields(make_app: MakeApp) -> None:
    running = await make_app()
    add_signup_routes(running, [])
    added = await running.client.post(
        "/signup", params={"email": "a@example.com"}, headers={"X-Request-ID": "req-1"}
    )
    task_id = added.json()["task_id"]
    await running.wait_for_status(task_id, TaskStatus.SUCCESS)

    record = (await running.client.get(f"/tasks/{task_id}")).json()
    [item] = (await running.client.get("/tasks")).json()["items"]

    assert record["tags"] == TAGS
    assert record["origin"] == {"method": "POST", "path": "/signup", "request_id": "req-1"}
    assert record["trace_parent"] is None
    assert item["tags"] == TAGS
    assert "origin" not in item


# configuration


def test_config_request_id_header() -> None:
    settings = parse_settings(
        {"store": {"kind": "memory"}, "api": {"request_id_header": "X-Correlation-ID"}}
    )

    taskflow = TaskflowContainer.from_settings(settings).taskflow()

    assert taskflow.request_id_header == "X-Correlation-ID"


def test_config_request_id_header_default() -> None:
    settings = parse_settings({"store": {"kind": "memory"}})

    taskflow = TaskflowContainer.from_settings(settings).taskflow()

    assert taskflow.request_id_header == "X-Request-ID"


def test_config_request_id_header_invalid() -> None:
    with pytest.raises(ConfigurationError, match=r"api\.request_id_header: invalid value 'X Id'"):
        parse_settings({"store": {"kind": "memory"}, "api": {"request_id_header": "X Id"}})


# SqlStore's tags table


@pytest.fixture
async def sql_store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    store = SqlStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def tagged_record(tags: dict[str, str], **fields: Any) -> TaskRecord:
    return TaskRecord(
        id=new_task_id(),
        name="job",
        status=TaskStatus.PENDING,
        created_at=utcnow(),
        tags=tags,
        **fields,
    )


def count_tag_rows(tmp_path: Path) -> int:
    with closing(sqlite3.connect(tmp_path / "tasks.db")) as connection:
        [count] = connection.execute("SELECT count(*) FROM taskflow_tags").fetchone()
    return int(count)


async def test_sql_tag_page_uses_tag_index(sql_store: SqlStore, tmp_path: Path) -> None:
    await sql_store.create([tagged_record({"user_id": str(n % 7)}) for n in range(40)])
    statements: list[tuple[str, Any]] = []

    def collect(*arguments: Any) -> None:
        statement, parameters = arguments[2], arguments[3]
        if statement.lstrip().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", collect)
    try:
        await sql_store.list(TaskQuery(tags={"user_id": "3"}, limit=2))
    finally:
        event.remove(Engine, "before_cursor_execute", collect)
    [(statement, parameters)] = statements
    with closing(sqlite3.connect(tmp_path / "tasks.db")) as connection:
        connection.execute("ANALYZE")
        plan = [
            row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
        ]

    assert any("ix_taskflow_tags_key_value_created_at_task_id" in step for step in plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan


async def test_sql_duplicate_key_adds_no_tags(sql_store: SqlStore, tmp_path: Path) -> None:
    first = tagged_record({"a": "1", "b": "2"}, idempotency_key="k")
    second = tagged_record({"a": "1", "b": "2"}, idempotency_key="k")

    ids = await sql_store.create([first])
    ids += await sql_store.create([second])

    assert ids == [first.id, first.id]
    assert count_tag_rows(tmp_path) == 2


async def test_sql_prune_deletes_tags(sql_store: SqlStore, tmp_path: Path) -> None:
    record = tagged_record({"a": "1"})
    [task_id] = await sql_store.create([record])
    await sql_store.cancel(task_id, utcnow())

    deleted = await sql_store.prune(utcnow(), max_age=0, max_count=None)

    assert deleted == 1
    assert count_tag_rows(tmp_path) == 0


async def test_sql_migration_fills_tags(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    store = SqlStore(url)
    await store.open()
    records = [tagged_record({"user_id": str(n % 3), "note": "a:b"}) for n in range(2500)]
    await store.create(records)
    await store.close()
    # Back to schema version 2, which kept tags only in the task table's tags column and had
    # no task counts.
    with closing(sqlite3.connect(tmp_path / "tasks.db")) as connection, connection:
        connection.execute("DROP TABLE taskflow_tags")
        for event in ("insert", "update", "delete"):
            connection.execute(f"DROP TRIGGER taskflow_tasks_count_{event}")
        connection.execute("DROP TABLE taskflow_counts")
        connection.execute("UPDATE taskflow_schema_version SET version = 2")

    store = SqlStore(url)
    await store.open()
    try:
        page = await store.list(TaskQuery(tags={"user_id": "1", "note": "a:b"}, limit=1000))
    finally:
        await store.close()

    expected = {record.id for record in records if record.tags["user_id"] == "1"}
    assert {item.id for item in page.items} == expected
    assert count_tag_rows(tmp_path) == 5000
