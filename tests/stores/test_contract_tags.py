"""The tags, origin and trace parent part of the TaskStore contract: kept, returned, filtered."""

from __future__ import annotations

import pytest
from contract_support import (
    INSTANCE_A,
    Clock,
    RecordFactory,
    create_in_status,
    create_running,
    create_task,
    failure,
    make_outcome,
)
from test_contract_watch import WatchOpener, read_changes, watch_changes  # noqa: F401

from app_taskflow.models import TaskOrigin, TaskQuery, TaskStatus, TaskSummary
from app_taskflow.stores.base import TaskStore

TAGS = {"user_id": "42", "plan": "pro"}
ORIGIN = TaskOrigin(method="POST", path="/signup", request_id="req-7f3a")
TRACE_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def page_ids(items: list[TaskSummary]) -> list[str]:
    return [item.id for item in items]


# round trips


async def test_tags_round_trip(store: TaskStore, make_record: RecordFactory) -> None:
    task_id = await create_task(store, make_record(tags=TAGS))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.tags == TAGS


async def test_tags_in_list_summary(store: TaskStore, make_record: RecordFactory) -> None:
    await create_task(store, make_record(tags=TAGS))

    page = await store.list(TaskQuery())

    assert page.items[0].tags == TAGS


async def test_tags_keep_any_text(store: TaskStore, make_record: RecordFactory) -> None:
    tags = {
        "note": 'a: b = "c" \\ d',
        "city": "Zürich 東京 🙂",
        "empty": "",
        "long": "x" * 256,
        "dotted.key-name_2": "v",
    }
    task_id = await create_task(store, make_record(tags=tags))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.tags == tags


async def test_origin_round_trip(store: TaskStore, make_record: RecordFactory) -> None:
    task_id = await create_task(store, make_record(origin=ORIGIN))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.origin == ORIGIN


async def test_origin_without_request_id(store: TaskStore, make_record: RecordFactory) -> None:
    origin = TaskOrigin(method="GET", path="/reports/ü")
    task_id = await create_task(store, make_record(origin=origin))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.origin == origin


async def test_trace_parent_round_trip(store: TaskStore, make_record: RecordFactory) -> None:
    task_id = await create_task(store, make_record(trace_parent=TRACE_PARENT))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.trace_parent == TRACE_PARENT


async def test_new_fields_default_empty(store: TaskStore, make_record: RecordFactory) -> None:
    task_id = await create_task(store, make_record())

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.tags == {}
    assert stored.origin is None
    assert stored.trace_parent is None


async def test_claim_returns_new_fields(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(tags=TAGS, origin=ORIGIN, trace_parent=TRACE_PARENT)
    task_id = await create_task(store, record)

    claimed = await store.claim(task_id, INSTANCE_A, clock(1))

    assert claimed is not None
    assert claimed.tags == TAGS
    assert claimed.origin == ORIGIN
    assert claimed.trace_parent == TRACE_PARENT


async def test_claim_next_returns_new_fields(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record(tags=TAGS, origin=ORIGIN, trace_parent=TRACE_PARENT))

    [claimed] = await store.claim_next(INSTANCE_A, clock(1), 10, ["send_email"])

    assert claimed.tags == TAGS
    assert claimed.origin == ORIGIN
    assert claimed.trace_parent == TRACE_PARENT


async def test_new_fields_survive_lifecycle(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(tags=TAGS, origin=ORIGIN, trace_parent=TRACE_PARENT, max_attempts=2)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    assert await store.finish(task_id, INSTANCE_A, 1, failure(clock(2)))
    await store.retry(task_id, clock(3), 1)
    assert await store.claim(task_id, INSTANCE_A, clock(4)) is not None
    assert await store.finish(task_id, INSTANCE_A, 2, make_outcome(TaskStatus.SUCCESS, clock(5)))

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.status is TaskStatus.SUCCESS
    assert stored.tags == TAGS
    assert stored.origin == ORIGIN
    assert stored.trace_parent == TRACE_PARENT


async def test_cancel_returns_tags(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(tags=TAGS))

    cancelled = await store.cancel(task_id, clock(1))

    assert cancelled.tags == TAGS


async def test_idempotent_create_keeps_first_tags(
    store: TaskStore, make_record: RecordFactory
) -> None:
    first_id = await create_task(store, make_record(idempotency_key="k", tags={"try": "1"}))

    second_id = await create_task(store, make_record(idempotency_key="k", tags={"try": "2"}))
    stored = await store.get(first_id)

    assert second_id == first_id
    assert stored is not None
    assert stored.tags == {"try": "1"}


async def test_watch_summary_has_tags(
    store: TaskStore,
    watch_changes: WatchOpener,  # noqa: F811
    make_record: RecordFactory,
    clock: Clock,
) -> None:
    reader = await watch_changes()
    task_id = await create_task(store, make_record(tags=TAGS))

    changes = await read_changes(reader, store, [task_id], clock)

    [created] = changes[task_id]
    assert created.summary is not None
    assert created.summary.tags == TAGS


# list filter


async def test_list_filters_one_tag(store: TaskStore, make_record: RecordFactory) -> None:
    tagged_id = await create_task(store, make_record(tags={"user_id": "42"}))
    await create_task(store, make_record(tags={"user_id": "43"}))
    await create_task(store, make_record())

    page = await store.list(TaskQuery(tags={"user_id": "42"}))

    assert page_ids(page.items) == [tagged_id]


async def test_list_requires_every_tag(store: TaskStore, make_record: RecordFactory) -> None:
    both_id = await create_task(store, make_record(tags={"user_id": "42", "plan": "pro"}))
    await create_task(store, make_record(tags={"user_id": "42", "plan": "free"}))
    await create_task(store, make_record(tags={"user_id": "42"}))
    await create_task(store, make_record(tags={"plan": "pro"}))

    page = await store.list(TaskQuery(tags={"user_id": "42", "plan": "pro"}))

    assert page_ids(page.items) == [both_id]


async def test_list_tag_matches_value_exactly(store: TaskStore, make_record: RecordFactory) -> None:
    await create_task(store, make_record(tags={"user_id": "420"}))
    await create_task(store, make_record(tags={"user_id": "4"}))
    await create_task(store, make_record(tags={"user": "42"}))
    await create_task(store, make_record(tags={"user_id": "USER 42"}))

    page = await store.list(TaskQuery(tags={"user_id": "42"}))

    assert page.items == []


async def test_list_tag_key_and_value_stay_apart(
    store: TaskStore, make_record: RecordFactory
) -> None:
    await create_task(store, make_record(tags={"a": "b:c"}))
    colon_id = await create_task(store, make_record(tags={"a": "b:c:d"}))

    page = await store.list(TaskQuery(tags={"a": "b:c:d"}))

    assert page_ids(page.items) == [colon_id]


async def test_list_tag_with_status_and_name(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    tags = {"user_id": "42"}
    await create_task(store, make_record(name="send_email", tags=tags))
    await create_in_status(store, make_record(name="send_sms", tags=tags), TaskStatus.FAILED, clock)
    await create_in_status(store, make_record(name="send_email"), TaskStatus.FAILED, clock)
    match_id = await create_in_status(
        store, make_record(name="send_email", tags=tags), TaskStatus.FAILED, clock
    )

    page = await store.list(TaskQuery(tags=tags, statuses=[TaskStatus.FAILED], name="send_email"))

    assert page_ids(page.items) == [match_id]


async def test_list_tag_with_search(store: TaskStore, make_record: RecordFactory) -> None:
    tags = {"user_id": "42"}
    match_id = await create_task(store, make_record(tags=tags, args=["invoice-7"]))
    await create_task(store, make_record(tags=tags, args=["receipt-7"]))
    await create_task(store, make_record(args=["invoice-8"]))

    page = await store.list(TaskQuery(tags=tags, search="INVOICE"))

    assert page_ids(page.items) == [match_id]


async def test_list_search_ignores_tags(store: TaskStore, make_record: RecordFactory) -> None:
    await create_task(store, make_record(tags={"topic": "invoice"}, args=["a"]))

    page = await store.list(TaskQuery(search="invoice"))

    assert page.items == []


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_list_tag_cursor_pages(
    store: TaskStore, make_record: RecordFactory, order: str
) -> None:
    tagged = [make_record(tags={"batch": "b1"}) for _ in range(5)]
    for record in tagged:
        await create_task(store, record)
        await create_task(store, make_record(tags={"batch": "b2"}))
    expected = [record.id for record in tagged]
    if order == "newest":
        expected.reverse()

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        query = TaskQuery(tags={"batch": "b1"}, order=order, limit=2, cursor=cursor)
        page = await store.list(query)
        seen.extend(page_ids(page.items))
        cursor = page.next_cursor
        if cursor is None:
            break

    assert seen == expected


async def test_list_tag_offset(store: TaskStore, make_record: RecordFactory) -> None:
    tagged = [make_record(tags={"batch": "b1"}) for _ in range(4)]
    for record in tagged:
        await create_task(store, record)
        await create_task(store, make_record())

    page = await store.list(TaskQuery(tags={"batch": "b1"}, order="oldest", offset=1, limit=2))

    assert page_ids(page.items) == [tagged[1].id, tagged[2].id]
    assert page.has_more


async def test_list_empty_tags_filter_all(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record(tags={"a": "1"}), make_record()]
    await store.create(records)

    page = await store.list(TaskQuery(tags={}))

    assert len(page.items) == 2


async def test_list_tag_after_prune(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    tags = {"user_id": "42"}
    await create_in_status(store, make_record(tags=tags), TaskStatus.SUCCESS, clock)
    pending_id = await create_task(store, make_record(tags=tags))
    while await store.prune(clock(100), max_age=0, max_count=None):
        pass

    page = await store.list(TaskQuery(tags=tags))

    assert page_ids(page.items) == [pending_id]
