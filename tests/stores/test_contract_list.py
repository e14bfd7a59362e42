"""The list() part of the TaskStore contract: filters, search, order and cursor pages."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

import pytest
from contract_support import (
    INSTANCE_A,
    Clock,
    RecordFactory,
    create_in_status,
    create_running,
    create_task,
    failure,
    log_entry,
    make_outcome,
)

from app_taskflow.models import LogEntry, TaskQuery, TaskRecord, TaskStatus, new_task_id
from app_taskflow.stores.base import TaskStore

Order = Literal["newest", "oldest"]
"""A value of ``TaskQuery.order``."""

# list


def page_ids(items: list[Any]) -> list[str]:
    return [item.id for item in items]


async def test_list_newest_first(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(3)]
    await store.create(records)

    page = await store.list(TaskQuery())

    assert page_ids(page.items) == [record.id for record in reversed(records)]


async def test_list_filters_statuses(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record())
    await create_in_status(store, make_record(), TaskStatus.RUNNING, clock)
    success_id = await create_in_status(store, make_record(), TaskStatus.SUCCESS, clock)
    await create_in_status(store, make_record(), TaskStatus.FAILED, clock)

    page = await store.list(TaskQuery(statuses=[TaskStatus.PENDING, TaskStatus.SUCCESS]))

    assert page_ids(page.items) == [success_id, pending_id]


async def test_list_filters_name(store: TaskStore, make_record: RecordFactory) -> None:
    email_id = await create_task(store, make_record(name="send_email"))
    await create_task(store, make_record(name="resize_image"))

    page = await store.list(TaskQuery(name="send_email"))

    assert page_ids(page.items) == [email_id]


async def test_list_combines_filters(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record(name="send_email"))
    await create_in_status(store, make_record(name="resize_image"), TaskStatus.FAILED, clock)
    failed_email_id = await create_in_status(
        store, make_record(name="send_email"), TaskStatus.FAILED, clock
    )

    page = await store.list(TaskQuery(statuses=[TaskStatus.FAILED], name="send_email"))

    assert page_ids(page.items) == [failed_email_id]


async def test_list_first_page_has_more(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)

    page = await store.list(TaskQuery(limit=2))

    assert page_ids(page.items) == [records[4].id, records[3].id]
    assert page.has_more
    assert page.limit == 2
    assert page.offset == 0


async def test_list_offset_skips_newer(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)

    page = await store.list(TaskQuery(limit=2, offset=2))

    assert page_ids(page.items) == [records[2].id, records[1].id]
    assert page.has_more
    assert page.offset == 2


async def test_list_last_page_has_no_more(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(4)]
    await store.create(records)

    page = await store.list(TaskQuery(limit=2, offset=2))

    assert page_ids(page.items) == [records[1].id, records[0].id]
    assert not page.has_more


async def test_list_empty_store(store: TaskStore) -> None:
    page = await store.list(TaskQuery())

    assert page.items == []
    assert not page.has_more


async def test_list_pages_never_overlap(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    records = [make_record(created_at=clock(-60)) for _ in range(7)]
    await store.create(records)

    listed_ids: list[str] = []
    for offset in range(0, 9, 3):
        page = await store.list(TaskQuery(limit=3, offset=offset))
        listed_ids.extend(page_ids(page.items))

    assert listed_ids == sorted((record.id for record in records), reverse=True)


async def test_list_items_have_no_logs(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.append_logs(task_id, [log_entry(clock, 1.5, "connecting")])
    await store.finish(task_id, INSTANCE_A, 1, failure(clock(2)))

    page = await store.list(TaskQuery())

    fields = page.items[0].model_dump()
    assert "logs" not in fields
    assert "attempt_history" not in fields
    assert "traceback" not in fields


async def test_list_items_carry_summary_fields(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_in_status(store, make_record(), TaskStatus.FAILED, clock)
    stored = await store.get(task_id)
    assert stored is not None

    page = await store.list(TaskQuery())

    assert page.items[0].model_dump() == stored.summary().model_dump()


# list: order


async def test_list_oldest_first(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(3)]
    await store.create(records)

    page = await store.list(TaskQuery(order="oldest"))

    assert page_ids(page.items) == [record.id for record in records]


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_list_same_time_ordered_by_id(
    store: TaskStore, make_record: RecordFactory, clock: Clock, order: Order
) -> None:
    records = [make_record(created_at=clock(-60)) for _ in range(5)]
    await store.create(records)

    page = await store.list(TaskQuery(order=order))

    expected = sorted((record.id for record in records), reverse=order == "newest")
    assert page_ids(page.items) == expected


# list: search


async def create_search_targets(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> dict[str, str]:
    """Create one task per searchable field, with words found in no other task.

    Returns the task ids by field: name, args, kwargs, error (type and message) and log.
    Two tasks with the ``make_record`` defaults, one of them FAILED, are the decoys.
    """
    task_ids = {
        "name": await create_task(store, make_record(name="generate_invoice")),
        "args": await create_task(store, make_record(args=["Zebra@Example.org", 7])),
        "kwargs": await create_task(store, make_record(kwargs={"subject": "Quarterly Report"})),
    }

    error_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    outcome = make_outcome(
        TaskStatus.FAILED,
        clock(2),
        error_type="QuotaExceededError",
        error_message="Mailbox FULL for the recipient",
        traceback="Traceback (most recent call last):\nQuotaExceededError: hidden-traceback\n",
    )
    assert await store.finish(error_id, INSTANCE_A, 1, outcome)
    task_ids["error"] = error_id

    log_id = await create_task(store, make_record())
    entry = LogEntry(
        timestamp=clock(1), message="Connecting to SMTP relay", extra={"host": "hidden-extra"}
    )
    await store.append_logs(log_id, [entry])
    task_ids["log"] = log_id

    await create_task(store, make_record())
    await create_in_status(store, make_record(), TaskStatus.FAILED, clock)
    return task_ids


@pytest.mark.parametrize(
    ("field", "search"),
    [
        pytest.param("name", "INVOICE", id="name"),
        pytest.param("args", "zebra@example", id="args"),
        pytest.param("kwargs", "quarterly REPORT", id="kwargs"),
        pytest.param("error", "quotaexceeded", id="error_type"),
        pytest.param("error", "mailbox full", id="error_message"),
        pytest.param("log", "smtp Relay", id="log_message"),
    ],
)
async def test_list_search_matches_field(
    store: TaskStore, make_record: RecordFactory, clock: Clock, field: str, search: str
) -> None:
    task_ids = await create_search_targets(store, make_record, clock)

    page = await store.list(TaskQuery(search=search))

    assert page_ids(page.items) == [task_ids[field]]


async def test_list_search_matches_id(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_search_targets(store, make_record, clock)
    task_id = await create_task(store, make_record())

    page = await store.list(TaskQuery(search=task_id[9:23].upper()))

    assert page_ids(page.items) == [task_id]


@pytest.mark.parametrize(
    "search",
    [
        pytest.param("hidden-traceback", id="traceback"),
        pytest.param("hidden-extra", id="log_extra"),
        pytest.param("no such text", id="absent"),
    ],
)
async def test_list_search_other_text_no_match(
    store: TaskStore, make_record: RecordFactory, clock: Clock, search: str
) -> None:
    await create_search_targets(store, make_record, clock)

    page = await store.list(TaskQuery(search=search))

    assert page.items == []
    assert not page.has_more


@pytest.mark.parametrize(
    ("target", "decoy", "search"),
    [
        pytest.param("50% off", "50 days off", "50%", id="percent"),
        pytest.param("a_c", "abc", "a_c", id="underscore"),
    ],
)
async def test_list_search_wildcards_literal(
    store: TaskStore, make_record: RecordFactory, target: str, decoy: str, search: str
) -> None:
    target_id = await create_task(store, make_record(args=[target]))
    await create_task(store, make_record(args=[decoy]))

    page = await store.list(TaskQuery(search=search))

    assert page_ids(page.items) == [target_id]


async def test_list_search_non_ascii_args(store: TaskStore, make_record: RecordFactory) -> None:
    target_id = await create_task(store, make_record(args=["Jürgen Müller"]))
    await create_task(store, make_record(args=["Jurgen Muller"]))

    page = await store.list(TaskQuery(search="jürgen müller"))

    assert page_ids(page.items) == [target_id]


async def test_list_combines_status_name_search(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    match_id = await create_in_status(
        store, make_record(name="send_email", args=["vip@example.com"]), TaskStatus.FAILED, clock
    )
    await create_in_status(
        store, make_record(name="send_email", args=["user@example.com"]), TaskStatus.FAILED, clock
    )
    await create_in_status(
        store, make_record(name="send_sms", args=["vip@example.com"]), TaskStatus.FAILED, clock
    )
    await create_task(store, make_record(name="send_email", args=["vip@example.com"]))

    page = await store.list(
        TaskQuery(statuses=[TaskStatus.FAILED], name="send_email", search="VIP@")
    )

    assert page_ids(page.items) == [match_id]


# list: cursor pages


def expected_ids(records: list[TaskRecord], order: Order) -> list[str]:
    ordered = sorted(
        records, key=lambda record: (record.created_at, record.id), reverse=order == "newest"
    )
    return [record.id for record in ordered]


async def read_pages(store: TaskStore, query: TaskQuery) -> list[Any]:
    """Return the pages of ``query`` from the first to the one without ``next_cursor``.

    Stops after 10 pages, so that a store that never ends the chain fails the test instead
    of looping.
    """
    pages = [await store.list(query)]
    while pages[-1].next_cursor is not None and len(pages) < 10:
        next_query = query.model_copy(update={"cursor": pages[-1].next_cursor})
        pages.append(await store.list(next_query))
    return pages


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_list_cursor_reads_each_task_once(
    store: TaskStore, make_record: RecordFactory, clock: Clock, order: Order
) -> None:
    # Tasks come in pairs that share created_at, and pairs are one microsecond apart, so
    # page ends depend on the id tie-break and on the full precision of created_at.
    records = [
        make_record(created_at=clock(-100) + timedelta(microseconds=n // 2)) for n in range(25)
    ]
    await store.create(records)

    pages = await read_pages(store, TaskQuery(order=order, limit=10))

    assert [len(page.items) for page in pages] == [10, 10, 5]
    assert [item_id for page in pages for item_id in page_ids(page.items)] == expected_ids(
        records, order
    )
    assert [page.has_more for page in pages] == [True, True, False]
    assert [page.next_cursor is None for page in pages] == [False, False, True]
    assert [page.offset for page in pages] == [0, 0, 0]


async def test_list_cursor_ignores_offset(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(6)]
    await store.create(records)
    first = await store.list(TaskQuery(limit=2))

    page = await store.list(TaskQuery(limit=2, offset=3, cursor=first.next_cursor))

    assert page_ids(page.items) == [records[3].id, records[2].id]
    assert page.offset == 0


async def test_list_offset_page_cursor_continues(
    store: TaskStore, make_record: RecordFactory
) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)
    middle = await store.list(TaskQuery(limit=2, offset=2))
    assert middle.next_cursor is not None

    page = await store.list(TaskQuery(limit=2, cursor=middle.next_cursor))

    assert page_ids(page.items) == [records[0].id]
    assert not page.has_more
    assert page.next_cursor is None


async def test_list_cursor_with_filters(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    matching: list[TaskRecord] = []
    for _ in range(3):
        matching.append(make_record(name="send_email", args=["vip@example.com"]))
        await create_task(store, matching[-1])
        await create_task(store, make_record(name="send_sms", args=["vip@example.com"]))
        await create_task(store, make_record(name="send_email"))
    query = TaskQuery(statuses=[TaskStatus.PENDING], name="send_email", search="vip", limit=2)

    pages = await read_pages(store, query)

    assert [page_ids(page.items) for page in pages] == [
        [matching[2].id, matching[1].id],
        [matching[0].id],
    ]


async def test_list_cursor_after_task_left_filter(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    records = [make_record() for _ in range(4)]
    await store.create(records)
    query = TaskQuery(statuses=[TaskStatus.PENDING], limit=2)
    first = await store.list(query)
    # The task that the cursor names is RUNNING from now on, so it no longer matches.
    await store.claim(records[2].id, INSTANCE_A, clock(1))

    page = await store.list(query.model_copy(update={"cursor": first.next_cursor}))

    assert page_ids(first.items) == [records[3].id, records[2].id]
    assert page_ids(page.items) == [records[1].id, records[0].id]


async def test_list_cursor_skips_later_tasks(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(3)]
    await store.create(records)
    first = await store.list(TaskQuery(limit=2))
    await store.create([make_record()])

    page = await store.list(TaskQuery(limit=2, cursor=first.next_cursor))

    assert page_ids(page.items) == [records[0].id]


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("not-a-cursor", id="garbage"),
        pytest.param("2030-01-01T12:00:00+00:00", id="no_id"),
        pytest.param(f"2030-01-01T12:00:00_{new_task_id()}", id="no_time_zone"),
        pytest.param(f"yesterday_{new_task_id()}", id="bad_time"),
    ],
)
async def test_list_invalid_cursor_raises(store: TaskStore, cursor: str) -> None:
    with pytest.raises(ValueError, match="cursor"):
        await store.list(TaskQuery(cursor=cursor))
