"""The prune() part of the TaskStore contract: which finished tasks go, and what goes with them."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from contract_support import (
    FINISHED_STATUSES,
    INSTANCE_A,
    STOPPED_INSTANCE,
    Clock,
    RecordFactory,
    create_running,
    create_task,
    failure,
    log_entry,
    make_outcome,
    status_id,
)

from app_taskflow.models import TaskQuery, TaskRecord, TaskStatus
from app_taskflow.stores.base import TaskStore


async def create_finished(
    store: TaskStore,
    record: TaskRecord,
    finished_at: datetime,
    status: TaskStatus = TaskStatus.SUCCESS,
) -> str:
    """Create ``record`` and end it in ``status`` at ``finished_at``, a second after it starts."""
    started_at = finished_at - timedelta(seconds=1)
    if status == TaskStatus.CANCELLED:
        task_id = await create_task(store, record)
        await store.cancel(task_id, finished_at)
        return task_id
    if status == TaskStatus.INTERRUPTED:
        task_id = await create_running(store, record, STOPPED_INSTANCE, started_at)
        await store.release(STOPPED_INSTANCE, finished_at)
        return task_id

    task_id = await create_running(store, record, INSTANCE_A, started_at)
    if status == TaskStatus.FAILED:
        outcome = failure(finished_at)
    else:
        outcome = make_outcome(status, finished_at)
    assert await store.finish(task_id, INSTANCE_A, 1, outcome)
    return task_id


async def remaining_ids(store: TaskStore) -> set[str]:
    page = await store.list(TaskQuery(limit=1000))
    return {item.id for item in page.items}


async def test_prune_max_age_deletes_older(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    old_ids = [await create_finished(store, make_record(), clock(seconds)) for seconds in (0, 50)]
    recent_id = await create_finished(store, make_record(), clock(100))

    deleted = await store.prune(clock(200), max_age=120, max_count=None)

    assert deleted == 2
    assert await remaining_ids(store) == {recent_id}
    for task_id in old_ids:
        assert await store.get(task_id) is None


async def test_prune_max_age_keeps_boundary(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    task_id = await create_finished(store, make_record(), clock(80))

    deleted = await store.prune(clock(200), max_age=120, max_count=None)

    assert deleted == 0
    assert await store.get(task_id) is not None


@pytest.mark.parametrize("status", FINISHED_STATUSES, ids=status_id)
async def test_prune_deletes_each_finished_status(
    store: TaskStore, make_record: RecordFactory, clock: Clock, status: TaskStatus
) -> None:
    task_id = await create_finished(store, make_record(), clock(10), status)

    deleted = await store.prune(clock(1000), max_age=60, max_count=None)

    assert deleted == 1
    assert await store.get(task_id) is None


async def test_prune_max_count_keeps_last_finished(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    # Finish order differs from creation order: the rule counts by finished_at.
    finish_seconds = [50, 10, 40, 20, 30]
    task_ids = [
        await create_finished(store, make_record(), clock(seconds)) for seconds in finish_seconds
    ]

    deleted = await store.prune(clock(100), max_age=None, max_count=2)

    assert deleted == 3
    assert await remaining_ids(store) == {task_ids[0], task_ids[2]}


async def test_prune_max_count_counts_finished_only(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_task(store, make_record())
    await create_running(store, make_record(), INSTANCE_A, clock(1))
    for seconds in (10, 20):
        await create_finished(store, make_record(), clock(seconds))

    assert await store.prune(clock(100), max_age=None, max_count=2) == 0
    assert len(await remaining_ids(store)) == 4


@pytest.mark.parametrize(
    ("max_age", "max_count", "kept_count"),
    [
        pytest.param(65, 3, 1, id="age_deletes_more"),
        pytest.param(85, 1, 1, id="count_deletes_more"),
        pytest.param(85, 3, 3, id="both_delete_oldest"),
    ],
)
async def test_prune_both_rules_delete_union(
    store: TaskStore,
    make_record: RecordFactory,
    clock: Clock,
    max_age: float,
    max_count: int,
    kept_count: int,
) -> None:
    # Finished at 10, 20, 30 and 40 s and pruned at 100 s, so max_age 65 deletes three tasks
    # and max_age 85 deletes one.
    task_ids = [
        await create_finished(store, make_record(), clock(seconds)) for seconds in (10, 20, 30, 40)
    ]

    deleted = await store.prune(clock(100), max_age=max_age, max_count=max_count)

    assert deleted == 4 - kept_count
    assert await remaining_ids(store) == set(task_ids[4 - kept_count :])


async def test_prune_without_rules_deletes_nothing(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_finished(store, make_record(), clock(10))

    assert await store.prune(clock(10_000), max_age=None, max_count=None) == 0
    assert len(await remaining_ids(store)) == 1


async def test_prune_keeps_active_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    pending_id = await create_task(store, make_record())
    running_id = await create_running(store, make_record(), INSTANCE_A, clock(1))
    waiting_id = await create_running(store, make_record(max_attempts=2), INSTANCE_A, clock(1))
    assert await store.finish(waiting_id, INSTANCE_A, 1, failure(clock(2), retry_at=clock(3)))
    finished_id = await create_finished(store, make_record(), clock(10))

    deleted = await store.prune(clock(10_000), max_age=0, max_count=0)

    assert deleted == 1
    assert await store.get(finished_id) is None
    assert await remaining_ids(store) == {pending_id, running_id, waiting_id}


async def test_prune_deletes_logs_and_attempts(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    record = make_record()
    task_id = await create_running(store, record, INSTANCE_A, clock(1))
    await store.append_logs(task_id, [log_entry(clock, 1.5, "connecting")])
    assert await store.finish(task_id, INSTANCE_A, 1, make_outcome(TaskStatus.SUCCESS, clock(2)))
    await store.prune(clock(1000), max_age=60, max_count=None)

    # The library never reuses an id. Reusing one here is the only way to see whether logs
    # or attempts of the deleted task were left behind.
    await store.create([record])

    stored = await store.get(task_id)
    assert stored is not None
    assert stored.logs == []
    assert stored.attempt_history == []


async def test_prune_frees_idempotency_key(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_finished(store, make_record(idempotency_key="order-42"), clock(10))
    await store.prune(clock(1000), max_age=60, max_count=None)
    again = make_record(idempotency_key="order-42", args=["other@example.com"])

    task_ids = await store.create([again])

    assert task_ids == [again.id]
    assert await store.get(again.id) is not None


async def test_prune_repeated_until_zero(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    for seconds in range(12):
        await create_finished(store, make_record(), clock(seconds))
    kept_id = await create_finished(store, make_record(), clock(500))

    counts = [await store.prune(clock(1000), max_age=600, max_count=None)]
    # A store may delete in batches, but each call deletes something until none is left.
    while counts[-1] > 0 and len(counts) <= 12:
        counts.append(await store.prune(clock(1000), max_age=600, max_count=None))

    assert sum(counts) == 12
    assert counts[-1] == 0
    assert await remaining_ids(store) == {kept_id}
