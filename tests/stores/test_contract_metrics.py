"""The metrics() part of the TaskStore contract: metrics follow every write that changes a task.

Stores may keep counts apart from the tasks (the SQL store keeps them in tables that
triggers update), so after each kind of transition the metrics are compared with those
computed from the tasks that ``list()`` returns.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from contract_support import (
    INSTANCE_A,
    INSTANCE_B,
    Clock,
    RecordFactory,
    create_in_status,
    create_running,
    failure,
    make_outcome,
)

from app_taskflow.models import (
    TERMINAL_STATUSES,
    TaskMetrics,
    TaskQuery,
    TaskStatus,
)
from app_taskflow.stores.base import TaskStore, build_metrics


async def metrics_of_listed_tasks(store: TaskStore) -> TaskMetrics:
    """Return the metrics that ``build_metrics`` computes from every task the store lists."""
    page = await store.list(TaskQuery(limit=1000))
    assert page.next_cursor is None
    counts: dict[str, dict[TaskStatus, int]] = defaultdict(lambda: defaultdict(int))
    durations: dict[str, list[float]] = defaultdict(list)
    for task in page.items:
        counts[task.name][task.status] += 1
        if task.status in TERMINAL_STATUSES and task.duration is not None:
            durations[task.name].append(task.duration)
    return build_metrics(counts, durations)


async def check_metrics(store: TaskStore, step: str) -> None:
    """Assert that the store's metrics match its listed tasks; ``step`` names the transition."""
    metrics = await store.metrics()
    expected = await metrics_of_listed_tasks(store)

    assert metrics.counts == expected.counts, step
    assert metrics.by_name.keys() == expected.by_name.keys(), step
    for name, name_metrics in expected.by_name.items():
        assert metrics.by_name[name].counts == name_metrics.counts, f"{step}: {name}"
        duration = metrics.by_name[name].duration
        expected_duration = name_metrics.duration
        assert duration.count == expected_duration.count, f"{step}: {name}"
        assert duration.mean == pytest.approx(expected_duration.mean), f"{step}: {name}"
        assert duration.p50 == expected_duration.p50, f"{step}: {name}"
        assert duration.p95 == expected_duration.p95, f"{step}: {name}"
    assert metrics.duration.count == expected.duration.count, step
    assert metrics.duration.mean == pytest.approx(expected.duration.mean), step


async def test_metrics_follow_every_transition(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    names = ("send_email", "resize_image", "send_sms")
    ids = await store.create(
        [make_record(name=name, max_attempts=3) for _ in range(3) for name in names]
    )
    await check_metrics(store, "create")

    claimed = await store.claim(ids[0], INSTANCE_A, clock(1))
    assert claimed is not None
    await check_metrics(store, "claim")

    next_claimed = await store.claim_next(INSTANCE_A, clock(2), 4, names)
    assert len(next_claimed) == 4
    await check_metrics(store, "claim_next of several names")

    success = make_outcome(TaskStatus.SUCCESS, clock(3), duration=2.0)
    assert await store.finish(ids[0], INSTANCE_A, 1, success)
    retry_later = failure(clock(3), duration=5.0, retry_at=clock(4))
    assert await store.finish(ids[1], INSTANCE_A, 1, retry_later)
    assert await store.finish(ids[2], INSTANCE_A, 1, failure(clock(3), duration=7.0))
    await check_metrics(store, "finish: SUCCESS, PENDING for a retry, FAILED")

    await store.cancel(ids[5], clock(5))
    await store.cancel(ids[3], clock(5))
    await check_metrics(store, "cancel of a PENDING and a RUNNING task")

    cancelled = make_outcome(TaskStatus.CANCELLED, clock(6), duration=0.5)
    assert await store.finish(ids[3], INSTANCE_A, 1, cancelled)
    await check_metrics(store, "finish: CANCELLED")

    await store.retry(ids[2], clock(7), extra_attempts=1)
    await check_metrics(store, "retry of a FAILED task")

    await store.release(INSTANCE_A, clock(8))
    await check_metrics(store, "release")

    requeued = make_record(name="send_sms", requeue_on_interrupt=True)
    await create_running(store, requeued, INSTANCE_B, clock(9))
    await create_running(store, make_record(name="send_sms"), INSTANCE_B, clock(9))
    await store.recover_expired(clock(10))
    await check_metrics(store, "recover_expired")

    while await store.prune(clock(100), max_age=None, max_count=1):
        pass
    await check_metrics(store, "prune")


async def test_metrics_drop_name_without_tasks(
    store: TaskStore, make_record: RecordFactory, clock: Clock
) -> None:
    await create_in_status(store, make_record(name="resize_image"), TaskStatus.SUCCESS, clock)
    await create_in_status(store, make_record(name="send_email"), TaskStatus.PENDING, clock)
    while await store.prune(clock(100), max_age=None, max_count=0):
        pass

    metrics = await store.metrics()

    assert set(metrics.by_name) == {"send_email"}
    assert metrics.duration.count == 0
    assert metrics.duration.mean is None
