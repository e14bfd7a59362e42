"""Shared factory fixtures: task definitions, running contexts, records and a worker pool."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app_taskflow.context import TaskContext
from app_taskflow.models import TaskRecord, TaskStatus, new_task_id, utcnow
from app_taskflow.tasks import RetryPolicy, TaskDefinition, default_task_name
from app_taskflow.workers import WorkerPool

TEST_INSTANCE = "instance-test"


@pytest.fixture
def make_definition() -> Callable[..., TaskDefinition[Any, Any]]:
    """Return a factory of unregistered task definitions for a function.

    Retry options are given by keyword and default to no retry and no delay. The name
    defaults to the function's module and qualified name.
    """

    def make(
        func: Callable[..., Any],
        *,
        name: str | None = None,
        requeue_on_interrupt: bool = False,
        **policy: Any,
    ) -> TaskDefinition[Any, Any]:
        policy.setdefault("delay", 0.0)
        return TaskDefinition(
            func,
            name=name or default_task_name(func),
            policy=RetryPolicy(**policy),
            requeue_on_interrupt=requeue_on_interrupt,
        )

    return make


@pytest.fixture
def make_task_record() -> Callable[..., TaskRecord]:
    """Return a factory of RUNNING records of a definition's first attempt.

    ``args`` and ``kwargs`` are encoded with the definition's codec, as ``add_task`` does.
    Other record fields are overridden by keyword.
    """

    def make(
        definition: TaskDefinition[Any, Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> TaskRecord:
        encoded_args, encoded_kwargs = definition.codec.encode(args, kwargs or {})
        fields: dict[str, Any] = {
            "id": new_task_id(),
            "name": definition.name,
            "status": TaskStatus.RUNNING,
            "args": encoded_args,
            "kwargs": encoded_kwargs,
            "attempts": 1,
            "max_attempts": definition.policy.max_attempts,
            "created_at": utcnow(),
            "owner": TEST_INSTANCE,
        }
        fields.update(overrides)
        return TaskRecord(**fields)

    return make


@pytest.fixture
def make_context() -> Callable[..., TaskContext]:
    """Return a factory of contexts for attempt 1 of 1, with fields overridden by keyword."""

    def make(**overrides: Any) -> TaskContext:
        fields: dict[str, Any] = {
            "task_id": new_task_id(),
            "task_name": "tests.task",
            "attempt": 1,
            "max_attempts": 1,
            "instance_id": TEST_INSTANCE,
        }
        fields.update(overrides)
        return TaskContext(**fields)

    return make


@pytest.fixture
def worker_pool() -> Iterator[WorkerPool]:
    """Yield a pool of 4 worker threads, asked to exit after the test."""
    pool = WorkerPool(4, name="test-worker")
    yield pool
    pool.shutdown()
