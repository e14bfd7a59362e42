"""The TaskStore contract, run unchanged against every store kind in conftest.py.

Each concept with many cases has its own test_contract_*.py file, such as list() and watch().
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from contract_support import (
    FINISHED_STATUSES,
    HOLDING_STATUSES,
    INSTANCE_A,
    INSTANCE_B,
    NOT_RETRYABLE_STATUSES,
    RELEASING_STATUSES,
    RETRYABLE_STATUSES,
    TASK_NAMES,
    TRACEBACK,
    Clock,
    RecordFactory,
    create_in_status,
    create_running,
    create_task,
    create_waiting_with_cancel,
    failure,
    log_entry,
    make_outcome,
    status_id,
)

from app_taskflow.errors import IdempotencyConflictError, TaskNotFoundError, TaskStateError
from app_taskflow.models import (
    AttemptRecord,
    DurationStats,
    RecoveryReport,
    TaskStatus,
    new_task_id,
)
from app_taskflow.stores.base import TaskStore

# create and get


async def test_create_returns_ids_in_order(store: TaskStore, make_record: RecordFactory) -> None:
    records = [make_record() for _ in range(3)]

    task_ids = await store.create(records)

    assert task_ids == [record.id for record in records]


async def test_get_unknown_id_returns_none(store: TaskStore) -> None:
    assert await store.get(new_task_id()) is None


async def test_get_returns_equal_record(store: TaskStore, make_record: RecordFactory) -> None:
    record = make_record(
        args=["user@example.com", 3, None, [1.5, "x"]],
        kwargs={"subject": "Welcome", "options": {"html": True, "tags": ["a", "b"]}},
        max_attempts=3,
        created_at=datetime(2030, 1, 1, 11, 59, 58, 123456, tzinfo=UTC),
        scheduled_at=datetime(2030, 1, 1, 12, 5, 0, 654321, tzinfo=UTC),
        owner=INSTANCE_A,
        idempotency_key="welcome-user-42",
        requeue_on_interrupt=True,
    )
    await store.create([record])

    assert await store.get(record.id) == record


async def test_get_returns_utc_datetimes(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(scheduled_at=clock(60))
    await store.create([record])

    stored = await store.get(record.id)

    assert stored is not None
    assert stored.created_at.utcoffset() == timedelta(0)
    assert stored.scheduled_at is not None
    assert stored.scheduled_at.utcoffset() == timedelta(0)


async def test_get_returns_logs_and_attempts(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    entries = [log_entry(clock, 1.5, "connecting"), log_entry(clock, 1.75, "sent")]
    await store.append_logs(task_id, entries)

    stored = await store.get(task_id)

    assert stored is not None
    assert stored.logs == entries
    assert stored.attempt_history == [
        AttemptRecord(number=1, instance_id=INSTANCE_A, started_at=clock(1))
    ]


# idempotency keys


@pytest.mark.parametrize("status", HOLDING_STATUSES, ids=status_id)
async def test_create_same_call_returns_holder_id(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    holder_id = await create_in_status(
        store, make_record(idempotency_key="order-42"), status, clock
    )
    duplicate = make_record(idempotency_key="order-42")

    task_ids = await store.create([duplicate])

    assert task_ids == [holder_id]
    assert await store.get(duplicate.id) is None


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"args": ["other@example.com"]}, id="args"),
        pytest.param({"kwargs": {"subject": "Goodbye"}}, id="kwargs"),
        pytest.param({"name": "send_sms"}, id="name"),
    ],
)
async def test_create_other_call_same_key_raises(
    store: TaskStore, make_record: RecordFactory, changes: dict[str, Any]
) -> None:
    holder_id = await create_task(store, make_record(idempotency_key="order-42"))

    with pytest.raises(IdempotencyConflictError, match=rf"order-42.*{holder_id}"):
        await store.create([make_record(idempotency_key="order-42", **changes)])


async def test_create_conflict_keeps_earlier_records(
    store: TaskStore, make_record: RecordFactory
) -> None:
    await create_task(store, make_record(idempotency_key="order-42"))
    earlier = make_record()
    conflicting = make_record(idempotency_key="order-42", args=["other@example.com"])

    with pytest.raises(IdempotencyConflictError):
        await store.create([earlier, conflicting])

    assert await store.get(earlier.id) is not None
    assert await store.get(conflicting.id) is None


@pytest.mark.parametrize("status", RELEASING_STATUSES, ids=status_id)
async def test_create_key_reusable_after_release(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    await create_in_status(store, make_record(idempotency_key="order-42"), status, clock)
    again = make_record(idempotency_key="order-42", args=["other@example.com"])

    task_ids = await store.create([again])

    assert task_ids == [again.id]
    assert await store.get(again.id) is not None


async def test_create_same_key_in_batch_one_task(
    store: TaskStore, make_record: RecordFactory
) -> None:
    first = make_record(idempotency_key="order-42")
    second = make_record(idempotency_key="order-42")

    task_ids = await store.create([first, second])

    assert task_ids == [first.id, first.id]
    assert await store.get(second.id) is None


async def test_create_concurrent_same_key_one_task(
    store: TaskStore, make_record: RecordFactory
) -> None:
    records = [make_record(idempotency_key="order-42") for _ in range(10)]

    results = await asyncio.gather(*(store.create([record]) for record in records))

    task_ids = {task_id for result in results for task_id in result}
    assert len(task_ids) == 1


# claim


async def test_claim_starts_attempt(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    await store.claim(task_id, INSTANCE_A, clock(5))

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.RUNNING
    assert stored.owner == INSTANCE_A
    assert stored.started_at == clock(5)
    assert stored.attempts == 1


async def test_claim_appends_attempt_record(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    await store.claim(task_id, INSTANCE_A, clock(5))

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.attempt_history == [
        AttemptRecord(number=1, instance_id=INSTANCE_A, started_at=clock(5))
    ]


async def test_claim_returns_claimed_task(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    claimed = await store.claim(task_id, INSTANCE_A, clock(5))

    assert claimed is not None
    assert claimed.id == task_id
    assert claimed.status == TaskStatus.RUNNING
    assert claimed.attempts == 1


async def test_claim_accepts_own_task(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(owner=INSTANCE_A))

    assert await store.claim(task_id, INSTANCE_A, clock(5)) is not None


async def test_claim_rejects_other_owner(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(owner=INSTANCE_B)
    await store.create([record])

    assert await store.claim(record.id, INSTANCE_A, clock(5)) is None
    assert await store.get(record.id) == record


async def test_claim_rejects_task_not_due(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(scheduled_at=clock(10))
    await store.create([record])

    assert await store.claim(record.id, INSTANCE_A, clock(9)) is None
    assert await store.get(record.id) == record


async def test_claim_accepts_task_due_now(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(scheduled_at=clock(10)))

    assert await store.claim(task_id, INSTANCE_A, clock(10)) is not None


async def test_claim_rejects_cancel_requested(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_waiting_with_cancel(store, make_record(max_attempts=2), clock)

    assert await store.claim(task_id, INSTANCE_A, clock(5)) is None


@pytest.mark.parametrize(
    "status",
    [TaskStatus.RUNNING, *FINISHED_STATUSES],
    ids=status_id,
)
async def test_claim_rejects_status_not_pending(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)
    before = await store.get(task_id)

    assert await store.claim(task_id, INSTANCE_A, clock(5)) is None
    assert await store.get(task_id) == before


async def test_claim_unknown_id_returns_none(store: TaskStore, clock: Clock) -> None:
    assert await store.claim(new_task_id(), INSTANCE_A, clock(5)) is None


async def test_claim_concurrent_one_wins(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    results = await asyncio.gather(
        *(store.claim(task_id, f"instance-{n}", clock(5)) for n in range(20))
    )

    winners = [claimed for claimed in results if claimed is not None]
    assert len(winners) == 1
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.owner == winners[0].owner
    assert stored.attempts == 1
    assert len(stored.attempt_history) == 1


# claim_next


async def test_claim_next_starts_attempt(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=10, names=TASK_NAMES)

    assert [record.id for record in claimed] == [task_id]
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.RUNNING
    assert stored.owner == INSTANCE_A
    assert stored.started_at == clock(5)
    assert stored.attempts == 1
    assert stored.attempt_history == [
        AttemptRecord(number=1, instance_id=INSTANCE_A, started_at=clock(5))
    ]


async def test_claim_next_skips_owned_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record(owner=INSTANCE_A))
    await create_task(store, make_record(owner=INSTANCE_B))
    ownerless_id = await create_task(store, make_record())

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=10, names=TASK_NAMES)

    assert [record.id for record in claimed] == [ownerless_id]


async def test_claim_next_skips_tasks_not_due(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record(scheduled_at=clock(6)))
    due_id = await create_task(store, make_record(scheduled_at=clock(5)))

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=10, names=TASK_NAMES)

    assert [record.id for record in claimed] == [due_id]


@pytest.mark.parametrize("status", [TaskStatus.INTERRUPTED, TaskStatus.CANCELLED], ids=status_id)
async def test_claim_next_skips_finished_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    await create_in_status(store, make_record(), status, clock)

    assert await store.claim_next(INSTANCE_A, clock(5), limit=10, names=TASK_NAMES) == []


async def test_claim_next_skips_cancel_requested(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_waiting_with_cancel(store, make_record(max_attempts=2), clock)
    await store.release(INSTANCE_A, clock(4))

    assert await store.claim_next(INSTANCE_B, clock(5), limit=10, names=TASK_NAMES) == []
    assert await store.claim(task_id, INSTANCE_B, clock(5)) is None


async def test_claim_next_oldest_first(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    middle = make_record(created_at=clock(-20))
    newest = make_record(created_at=clock(-10))
    oldest = make_record(created_at=clock(-30))
    await store.create([middle, newest, oldest])

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=10, names=TASK_NAMES)

    assert [record.id for record in claimed] == [oldest.id, middle.id, newest.id]


async def test_claim_next_respects_limit(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=2, names=TASK_NAMES)

    assert [record.id for record in claimed] == [records[0].id, records[1].id]


async def test_claim_next_never_claims_twice(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    records = [make_record() for _ in range(5)]
    await store.create(records)

    claimed_ids: list[str] = []
    for second in range(4):
        batch = await store.claim_next(INSTANCE_A, clock(5 + second), limit=2, names=TASK_NAMES)
        claimed_ids.extend(record.id for record in batch)

    assert claimed_ids == [record.id for record in records]


async def test_claim_next_concurrent_no_duplicates(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await store.create([make_record() for _ in range(10)])

    batches = await asyncio.gather(
        *(store.claim_next(f"instance-{n}", clock(5), limit=3, names=TASK_NAMES) for n in range(5))
    )

    claimed_ids = [record.id for batch in batches for record in batch]
    assert len(claimed_ids) == len(set(claimed_ids))


async def test_claim_next_skips_other_names(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    # The unknown task is the oldest, so a store that counted it against the limit of 1
    # would claim nothing.
    unknown = make_record(name="resize_image")
    known = make_record(name="send_email")
    await store.create([unknown, known])

    claimed = await store.claim_next(INSTANCE_A, clock(5), limit=1, names=["send_email"])

    assert [record.id for record in claimed] == [known.id]
    assert await store.get(unknown.id) == unknown


async def test_claim_next_other_name_left_for_others(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(name="resize_image"))
    assert await store.claim_next(INSTANCE_A, clock(5), limit=10, names=["send_email"]) == []

    claimed = await store.claim_next(INSTANCE_B, clock(6), limit=10, names=["resize_image"])

    assert [record.id for record in claimed] == [task_id]
    assert claimed[0].owner == INSTANCE_B


async def test_claim_next_no_names_claims_nothing(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record()
    await store.create([record])

    assert await store.claim_next(INSTANCE_A, clock(5), limit=10, names=[]) == []
    assert await store.get(record.id) == record


# finish


async def test_finish_success_writes_fields(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))

    written = await store.finish(
        task_id, INSTANCE_A, 1, make_outcome(TaskStatus.SUCCESS, clock(3), duration=2.0)
    )

    assert written
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.SUCCESS
    assert stored.finished_at == clock(3)
    assert stored.duration == 2.0
    assert stored.error_type is None


async def test_finish_failed_writes_error(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))

    written = await store.finish(task_id, INSTANCE_A, 1, failure(clock(3), duration=2.0))

    assert written
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.FAILED
    assert stored.finished_at == clock(3)
    assert stored.duration == 2.0
    assert stored.error_type == "ValueError"
    assert stored.error_message == "invalid address"
    assert stored.traceback == TRACEBACK


@pytest.mark.parametrize(
    ("status", "error_type", "error_message"),
    [
        pytest.param(TaskStatus.SUCCESS, None, None, id="SUCCESS"),
        pytest.param(TaskStatus.FAILED, "ValueError", "invalid address", id="FAILED"),
    ],
)
async def test_finish_ends_attempt_record(
    store: TaskStore,
    make_record: RecordFactory,
    clock: Clock,
    status: TaskStatus,
    error_type: str | None,
    error_message: str | None,
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    outcome = make_outcome(status, clock(3), error_type=error_type, error_message=error_message)

    await store.finish(task_id, INSTANCE_A, 1, outcome)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.attempt_history == [
        AttemptRecord(
            number=1,
            instance_id=INSTANCE_A,
            started_at=clock(1),
            finished_at=clock(3),
            status=status,
            error_type=error_type,
            error_message=error_message,
        )
    ]


async def test_finish_terminal_clears_cancel_requested(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.cancel(task_id, clock(2))

    await store.finish(task_id, INSTANCE_A, 1, make_outcome(TaskStatus.CANCELLED, clock(3)))

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.CANCELLED
    assert not stored.cancel_requested


async def test_finish_pending_keeps_owner(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))

    assert await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.PENDING
    assert stored.owner == INSTANCE_A
    assert stored.scheduled_at == clock(30)
    assert stored.attempts == 1


async def test_finish_pending_ends_attempt_as_failed(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))

    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.attempt_history == [
        AttemptRecord(
            number=1,
            instance_id=INSTANCE_A,
            started_at=clock(1),
            finished_at=clock(3),
            status=TaskStatus.FAILED,
            error_type="ValueError",
            error_message="invalid address",
        )
    ]


async def test_finish_pending_rejects_other_instances(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))
    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    assert await store.claim(task_id, INSTANCE_B, clock(30)) is None
    assert await store.claim_next(INSTANCE_B, clock(30), limit=10, names=TASK_NAMES) == []


async def test_finish_pending_rejects_claim_before_due(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))
    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    assert await store.claim(task_id, INSTANCE_A, clock(29)) is None


async def test_finish_pending_owner_claims_when_due(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))
    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    claimed = await store.claim(task_id, INSTANCE_A, clock(30))

    assert claimed is not None
    assert claimed.attempts == 2
    stored = await store.get(task_id)
    assert stored is not None
    assert [attempt.number for attempt in stored.attempt_history] == [1, 2]
    assert stored.attempt_history[1].started_at == clock(30)


async def test_finish_stale_attempt_returns_false(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    before = await store.get(task_id)

    assert not await store.finish(task_id, INSTANCE_A, 2, failure(clock(3)))
    assert await store.get(task_id) == before


async def test_finish_other_owner_returns_false(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    before = await store.get(task_id)

    assert not await store.finish(task_id, INSTANCE_B, 1, failure(clock(3)))
    assert await store.get(task_id) == before


async def test_finish_after_recovery_returns_false(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(max_attempts=3, requeue_on_interrupt=True)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))
    await store.recover_expired(clock(20))
    assert await store.claim(task_id, INSTANCE_B, clock(21)) is not None
    before = await store.get(task_id)

    outcome = make_outcome(TaskStatus.SUCCESS, clock(22))
    assert not await store.finish(task_id, INSTANCE_A, 1, outcome)
    assert await store.get(task_id) == before


async def test_finish_finished_task_returns_false(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_in_status(store, make_record(), TaskStatus.SUCCESS, clock)
    before = await store.get(task_id)

    assert not await store.finish(task_id, INSTANCE_A, 1, failure(clock(5)))
    assert await store.get(task_id) == before


# append_logs


async def test_append_logs_keeps_order(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())
    first_batch = [log_entry(clock, 1, "connecting"), log_entry(clock, 2, "connected")]
    second_batch = [log_entry(clock, 3, "sent")]

    await store.append_logs(task_id, first_batch)
    await store.append_logs(task_id, second_batch)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.logs == first_batch + second_batch


async def test_append_logs_unknown_id_ignored(store: TaskStore, clock: Clock) -> None:
    unknown_id = new_task_id()

    await store.append_logs(unknown_id, [log_entry(clock, 1, "lost")])

    assert await store.get(unknown_id) is None


# heartbeat


async def test_heartbeat_returns_cancel_requested(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    requested_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await create_running(store, make_record(), INSTANCE_A, clock(1))
    other_instance_id = await create_running(store, make_record(), INSTANCE_B, clock(1))
    await store.cancel(requested_id, clock(2))
    await store.cancel(other_instance_id, clock(2))

    cancelled_ids = await store.heartbeat(INSTANCE_A, clock(3), expires_at=clock(33))

    assert cancelled_ids == [requested_id]


async def test_heartbeat_skips_finished_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.cancel(task_id, clock(2))
    await store.finish(task_id, INSTANCE_A, 1, make_outcome(TaskStatus.CANCELLED, clock(3)))

    assert await store.heartbeat(INSTANCE_A, clock(4), expires_at=clock(34)) == []


async def test_heartbeat_renews_lease(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))
    await store.heartbeat(INSTANCE_A, clock(9), expires_at=clock(40))
    before = await store.get(task_id)

    assert await store.recover_expired(clock(20)) == RecoveryReport()
    assert await store.get(task_id) == before


# recover_expired


async def test_recover_expired_releases_pending(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(owner=INSTANCE_A, scheduled_at=clock(100)))
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(10))

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport(released=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.PENDING
    assert stored.owner is None
    assert stored.scheduled_at == clock(100)


async def test_recover_expired_interrupts_running(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport(interrupted=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.INTERRUPTED
    assert stored.finished_at == clock(20)
    assert stored.attempts == 1


async def test_recover_expired_ends_attempt_interrupted(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))

    await store.recover_expired(clock(20))

    stored = await store.get(task_id)
    assert stored is not None
    assert len(stored.attempt_history) == 1
    assert stored.attempt_history[0].status == TaskStatus.INTERRUPTED
    assert stored.attempt_history[0].finished_at == clock(20)


async def test_recover_expired_requeues_running(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(requeue_on_interrupt=True)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport(requeued=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.PENDING
    assert stored.owner is None
    assert stored.attempts == 1
    assert stored.attempt_history[-1].status == TaskStatus.INTERRUPTED


async def test_recover_expired_requeued_task_runs_again(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(requeue_on_interrupt=True)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))
    await store.recover_expired(clock(20))

    claimed = await store.claim_next(INSTANCE_B, clock(21), limit=10, names=TASK_NAMES)

    assert [task.id for task in claimed] == [task_id]
    assert claimed[0].attempts == 2


async def test_recover_expired_keeps_live_instances(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record(owner=INSTANCE_B))
    running_id = await create_running(store, make_record(), INSTANCE_B, clock(1))
    await store.heartbeat(INSTANCE_B, clock(1), expires_at=clock(30))
    pending_before = await store.get(pending_id)
    running_before = await store.get(running_id)

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport()
    assert await store.get(pending_id) == pending_before
    assert await store.get(running_id) == running_before


async def test_recover_expired_keeps_lease_ending_now(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(20))
    before = await store.get(task_id)

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport()
    assert await store.get(task_id) == before


async def test_recover_expired_takes_tasks_without_lease(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record(owner=INSTANCE_A))
    running_id = await create_running(store, make_record(), INSTANCE_A, clock(1))

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport(released=[pending_id], interrupted=[running_id])


async def test_recover_expired_ignores_ownerless_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record()
    await store.create([record])

    assert await store.recover_expired(clock(20)) == RecoveryReport()
    assert await store.get(record.id) == record


@pytest.mark.parametrize("status", [TaskStatus.SUCCESS, TaskStatus.FAILED], ids=status_id)
async def test_recover_expired_ignores_finished_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)
    before = await store.get(task_id)

    assert await store.recover_expired(clock(20)) == RecoveryReport()
    assert await store.get(task_id) == before


async def test_recover_expired_second_call_recovers_nothing(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record(owner=INSTANCE_A))
    await create_running(store, make_record(), INSTANCE_A, clock(1))
    await create_running(store, make_record(requeue_on_interrupt=True), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(10))
    await store.recover_expired(clock(20))

    assert await store.recover_expired(clock(21)) == RecoveryReport()


async def test_recover_expired_releases_every_pending(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_ids = [await create_task(store, make_record(owner=INSTANCE_A)) for _ in range(5)]
    live_id = await create_task(store, make_record(owner=INSTANCE_B))
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(10))
    await store.heartbeat(INSTANCE_B, clock(0), expires_at=clock(30))

    report = await store.recover_expired(clock(20))

    assert report == RecoveryReport(released=task_ids)
    claimed = await store.claim_next(INSTANCE_B, clock(21), limit=10, names=TASK_NAMES)
    assert [task.id for task in claimed] == task_ids
    live = await store.get(live_id)
    assert live is not None
    assert live.owner == INSTANCE_B


async def test_recover_expired_repeated_takes_all(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    # More tasks than the built-in stores take back in one call.
    records = [make_record(owner=INSTANCE_A) for _ in range(1500)]
    await store.create(records)
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(10))

    released: list[str] = []
    while batch := (await store.recover_expired(clock(20))).released:
        released.extend(batch)

    assert released == [record.id for record in records]


# earliest_lease_end


async def test_earliest_lease_end_none_stored(store: TaskStore) -> None:
    assert await store.earliest_lease_end() is None


async def test_earliest_lease_end_first_of_leases(store: TaskStore, clock: Clock) -> None:
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(30))
    await store.heartbeat(INSTANCE_B, clock(0), expires_at=clock(10))

    assert await store.earliest_lease_end() == clock(10)


async def test_earliest_lease_end_after_renewal(store: TaskStore, clock: Clock) -> None:
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(10))
    await store.heartbeat(INSTANCE_B, clock(0), expires_at=clock(30))
    await store.heartbeat(INSTANCE_A, clock(5), expires_at=clock(40))

    assert await store.earliest_lease_end() == clock(30)


async def test_earliest_lease_end_after_recovery(store: TaskStore, clock: Clock) -> None:
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(10))
    await store.heartbeat(INSTANCE_B, clock(0), expires_at=clock(30))
    await store.recover_expired(clock(20))

    assert await store.earliest_lease_end() == clock(30)


# release


async def test_release_releases_pending(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record(owner=INSTANCE_A, scheduled_at=clock(100)))
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(1000))

    report = await store.release(INSTANCE_A, clock(5))

    assert report == RecoveryReport(released=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.owner is None
    assert stored.scheduled_at == clock(100)


async def test_release_interrupts_running(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(1000))

    report = await store.release(INSTANCE_A, clock(5))

    assert report == RecoveryReport(interrupted=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.INTERRUPTED
    assert stored.finished_at == clock(5)
    assert stored.attempts == 1
    assert stored.attempt_history[-1].status == TaskStatus.INTERRUPTED
    assert stored.attempt_history[-1].finished_at == clock(5)


async def test_release_requeues_running(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(requeue_on_interrupt=True)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.heartbeat(INSTANCE_A, clock(1), expires_at=clock(1000))

    report = await store.release(INSTANCE_A, clock(5))

    assert report == RecoveryReport(requeued=[task_id])
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.PENDING
    assert stored.owner is None
    assert stored.attempts == 1
    assert stored.attempt_history[-1].status == TaskStatus.INTERRUPTED


async def test_release_keeps_other_instances(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record(owner=INSTANCE_B))
    running_id = await create_running(store, make_record(), INSTANCE_B, clock(1))
    pending_before = await store.get(pending_id)
    running_before = await store.get(running_id)

    report = await store.release(INSTANCE_A, clock(5))

    assert report == RecoveryReport()
    assert await store.get(pending_id) == pending_before
    assert await store.get(running_id) == running_before


async def test_release_deletes_lease(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await store.heartbeat(INSTANCE_A, clock(0), expires_at=clock(1000))
    await store.release(INSTANCE_A, clock(5))
    task_id = await create_task(store, make_record(owner=INSTANCE_A))

    report = await store.recover_expired(clock(6))

    assert report == RecoveryReport(released=[task_id])


# cancel


async def test_cancel_pending_becomes_cancelled(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    cancelled = await store.cancel(task_id, clock(5))

    assert cancelled.status == TaskStatus.CANCELLED
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.CANCELLED
    assert stored.finished_at == clock(5)


async def test_cancel_pending_never_claimable(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_task(store, make_record())

    await store.cancel(task_id, clock(5))

    assert await store.claim(task_id, INSTANCE_A, clock(6)) is None
    assert await store.claim_next(INSTANCE_A, clock(6), limit=10, names=TASK_NAMES) == []


async def test_cancel_waiting_retry_never_claimable(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(max_attempts=3), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(3), retry_at=clock(30))
    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)

    cancelled = await store.cancel(task_id, clock(5))

    assert cancelled.status == TaskStatus.CANCELLED
    assert await store.claim(task_id, INSTANCE_A, clock(30)) is None


async def test_cancel_running_requests_cancel(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))

    cancelled = await store.cancel(task_id, clock(5))

    assert cancelled.status == TaskStatus.RUNNING
    assert cancelled.cancel_requested
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.RUNNING
    assert stored.cancel_requested


@pytest.mark.parametrize("status", FINISHED_STATUSES, ids=status_id)
async def test_cancel_finished_raises(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)

    with pytest.raises(TaskStateError, match=rf"{task_id}.*{status.value}"):
        await store.cancel(task_id, clock(5))


async def test_cancel_unknown_raises(store: TaskStore, clock: Clock) -> None:
    unknown_id = new_task_id()

    with pytest.raises(TaskNotFoundError, match=unknown_id):
        await store.cancel(unknown_id, clock(5))


# retry


@pytest.mark.parametrize("status", RETRYABLE_STATUSES, ids=status_id)
async def test_retry_requeues_task(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)

    retried = await store.retry(task_id, clock(10), extra_attempts=2)

    assert retried.status == TaskStatus.PENDING
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.status == TaskStatus.PENDING
    assert stored.owner is None
    assert stored.scheduled_at is None


@pytest.mark.parametrize("status", RETRYABLE_STATUSES, ids=status_id)
async def test_retry_clears_errors(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)

    await store.retry(task_id, clock(10), extra_attempts=2)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.error_type is None
    assert stored.error_message is None


async def test_retry_sets_max_attempts(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record(max_attempts=2)
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    retry_outcome = failure(clock(2), retry_at=clock(3))
    await store.finish(task_id, INSTANCE_A, 1, retry_outcome)
    await store.claim(task_id, INSTANCE_A, clock(3))
    await store.finish(task_id, INSTANCE_A, 2, failure(clock(4)))

    await store.retry(task_id, clock(10), extra_attempts=3)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.attempts == 2
    assert stored.max_attempts == 5


async def test_retry_keeps_history_and_logs(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    entries = [log_entry(clock, 1.5, "connecting"), log_entry(clock, 1.75, "refused")]
    await store.append_logs(task_id, entries)
    await store.finish(task_id, INSTANCE_A, 1, failure(clock(2)))
    before = await store.get(task_id)
    assert before is not None

    await store.retry(task_id, clock(10), extra_attempts=1)

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.logs == entries
    assert stored.attempt_history == before.attempt_history


async def test_retry_runs_next_attempt(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_in_status(store, make_record(), TaskStatus.FAILED, clock)
    await store.retry(task_id, clock(10), extra_attempts=1)

    claimed = await store.claim_next(INSTANCE_B, clock(11), limit=10, names=TASK_NAMES)

    assert [task.id for task in claimed] == [task_id]
    stored = await store.get(task_id)
    assert stored is not None
    assert stored.attempts == 2
    assert [attempt.number for attempt in stored.attempt_history] == [1, 2]
    assert stored.attempt_history[1].instance_id == INSTANCE_B


@pytest.mark.parametrize("status", NOT_RETRYABLE_STATUSES, ids=status_id)
async def test_retry_rejects_status(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_in_status(store, make_record(), status, clock)
    before = await store.get(task_id)

    with pytest.raises(TaskStateError, match=rf"{task_id}.*{status.value}"):
        await store.retry(task_id, clock(10), extra_attempts=1)

    assert await store.get(task_id) == before


async def test_retry_unknown_raises(store: TaskStore, clock: Clock) -> None:
    unknown_id = new_task_id()

    with pytest.raises(TaskNotFoundError, match=unknown_id):
        await store.retry(unknown_id, clock(10), extra_attempts=1)


async def test_retry_rejects_key_held_elsewhere(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    failed_id = await create_in_status(
        store, make_record(idempotency_key="order-42"), TaskStatus.FAILED, clock
    )
    holder_id = await create_task(store, make_record(idempotency_key="order-42"))

    with pytest.raises(TaskStateError, match=rf"order-42.*{holder_id}"):
        await store.retry(failed_id, clock(10), extra_attempts=1)

    stored = await store.get(failed_id)
    assert stored is not None
    assert stored.status == TaskStatus.FAILED


# metrics


def status_counts(**counts: int) -> dict[TaskStatus, int]:
    """Return a count for every status: ``counts`` by status name, and 0 for the others."""
    all_counts = dict.fromkeys(TaskStatus, 0)
    for status_name, count in counts.items():
        all_counts[TaskStatus(status_name)] = count
    return all_counts


async def create_mixed_tasks(store: TaskStore, make_record: RecordFactory, clock: Clock) -> None:
    """Create seven tasks of two names that together cover every status.

    send_email: 2 SUCCESS, 1 FAILED and 1 PENDING. resize_image: 1 INTERRUPTED, 1 RUNNING
    and 1 CANCELLED.
    """
    email_statuses = [
        TaskStatus.SUCCESS,
        TaskStatus.SUCCESS,
        TaskStatus.FAILED,
        TaskStatus.PENDING,
    ]
    for status in email_statuses:
        await create_in_status(store, make_record(name="send_email"), status, clock)
    image_statuses = [TaskStatus.INTERRUPTED, TaskStatus.RUNNING, TaskStatus.CANCELLED]
    for status in image_statuses:
        await create_in_status(store, make_record(name="resize_image"), status, clock)


async def test_metrics_empty_store(store: TaskStore) -> None:
    metrics = await store.metrics()

    assert metrics.counts == status_counts()
    assert metrics.success_rate is None
    assert metrics.duration == DurationStats()
    assert metrics.by_name == {}


async def test_metrics_counts_overall(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_mixed_tasks(store, make_record, clock)

    metrics = await store.metrics()

    assert metrics.counts == status_counts(
        SUCCESS=2, FAILED=1, PENDING=1, INTERRUPTED=1, RUNNING=1, CANCELLED=1
    )


async def test_metrics_counts_per_name(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_mixed_tasks(store, make_record, clock)

    metrics = await store.metrics()

    assert set(metrics.by_name) == {"send_email", "resize_image"}
    email_counts = status_counts(SUCCESS=2, FAILED=1, PENDING=1)
    assert metrics.by_name["send_email"].counts == email_counts
    image_counts = status_counts(INTERRUPTED=1, RUNNING=1, CANCELLED=1)
    assert metrics.by_name["resize_image"].counts == image_counts


async def test_metrics_success_rate(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_mixed_tasks(store, make_record, clock)

    metrics = await store.metrics()

    assert metrics.success_rate == pytest.approx(2 / 4)
    assert metrics.by_name["send_email"].success_rate == pytest.approx(2 / 3)
    assert metrics.by_name["resize_image"].success_rate == 0.0


async def test_metrics_success_rate_none_if_nothing_ended(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    for status in [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.CANCELLED]:
        await create_in_status(store, make_record(), status, clock)

    metrics = await store.metrics()

    assert metrics.success_rate is None
    assert metrics.by_name["send_email"].success_rate is None


async def test_metrics_durations_nearest_rank(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    # Interpolating percentiles would give p50 = 6.0 and p95 = 86.5 for these values.
    for duration, status in [
        (10.0, TaskStatus.SUCCESS),
        (1.0, TaskStatus.FAILED),
        (100.0, TaskStatus.SUCCESS),
        (2.0, TaskStatus.SUCCESS),
    ]:
        await create_in_status(store, make_record(), status, clock, duration=duration)

    metrics = await store.metrics()

    duration = metrics.by_name["send_email"].duration
    assert duration.count == 4
    assert duration.mean == pytest.approx(113.0 / 4)
    assert duration.p50 == 2.0
    assert duration.p95 == 100.0


async def test_metrics_durations_overall(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    for seconds in range(1, 21):
        record = make_record(name="send_email")
        await create_in_status(store, record, TaskStatus.SUCCESS, clock, duration=seconds)
    image_record = make_record(name="resize_image")
    await create_in_status(store, image_record, TaskStatus.FAILED, clock, duration=100.0)

    metrics = await store.metrics()

    overall = metrics.duration
    assert overall.count == 21
    assert overall.mean == pytest.approx(310.0 / 21)
    assert overall.p50 == 11.0
    assert overall.p95 == 20.0
    email = metrics.by_name["send_email"].duration
    assert email == DurationStats(count=20, mean=10.5, p50=10.0, p95=19.0)
    image = metrics.by_name["resize_image"].duration
    assert image == DurationStats(count=1, mean=100.0, p50=100.0, p95=100.0)


async def test_metrics_durations_only_finished(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_in_status(store, make_record(), TaskStatus.SUCCESS, clock, duration=4.0)
    waiting_id = await create_running(store, make_record(max_attempts=2), INSTANCE_A, clock(1))
    retry_outcome = failure(clock(51), 50.0, retry_at=clock(60))
    await store.finish(waiting_id, INSTANCE_A, 1, retry_outcome)
    await create_in_status(store, make_record(), TaskStatus.RUNNING, clock)

    metrics = await store.metrics()

    assert metrics.duration == DurationStats(count=1, mean=4.0, p50=4.0, p95=4.0)


async def test_metrics_duration_of_last_attempt(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_in_status(store, make_record(), TaskStatus.FAILED, clock, duration=30.0)
    await store.retry(task_id, clock(40), extra_attempts=1)
    await store.claim(task_id, INSTANCE_A, clock(41))
    await store.finish(task_id, INSTANCE_A, 2, make_outcome(TaskStatus.SUCCESS, clock(43), 2.0))

    metrics = await store.metrics()

    assert metrics.duration == DurationStats(count=1, mean=2.0, p50=2.0, p95=2.0)
