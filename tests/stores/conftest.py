"""Fixtures of the store contract suite: one store per backend kind, records and a clock."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app_taskflow.models import TaskRecord, TaskStatus, new_task_id
from app_taskflow.stores.base import TaskStore

BASE_TIME = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
"""Time zero of the test clock. ``clock(seconds)`` returns this time plus ``seconds``."""


def _memory_store(tmp_path: Path) -> TaskStore:
    from app_taskflow.stores.memory import MemoryStore

    return MemoryStore()


def _sqlite_store(tmp_path: Path) -> TaskStore:
    from app_taskflow.stores.sql import SqlStore

    return SqlStore(f"sqlite:///{tmp_path}/tasks.db")


# Each factory imports its backend only when a test requests that kind, so a missing optional
# driver makes that kind's tests error (or skip) instead of stopping collection. Add
# "postgres" and "redis" here. Their factories should call pytest.skip when the server is
# unreachable, except in CI, where a missing server must fail the run.
STORE_FACTORIES: dict[str, Callable[[Path], TaskStore]] = {
    "memory": _memory_store,
    "sqlite": _sqlite_store,
}


@pytest.fixture(params=list(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TaskStore]:
    """Yield an opened store of each kind in ``STORE_FACTORIES``, closed after the test."""
    task_store = STORE_FACTORIES[request.param](tmp_path)
    await task_store.open()
    try:
        yield task_store
    finally:
        await task_store.close()


@pytest.fixture
def clock() -> Callable[[float], datetime]:
    """Return a function that maps seconds after ``BASE_TIME`` to an aware UTC datetime."""

    def at(seconds: float) -> datetime:
        return BASE_TIME + timedelta(seconds=seconds)

    return at


@pytest.fixture
def make_record(clock: Callable[[float], datetime]) -> Callable[..., TaskRecord]:
    """Return a factory of valid PENDING task records, with fields overridden by keyword.

    Each record gets a fresh id and is created one second after the previous one, in the
    hour before ``BASE_TIME``, so creation order is also age order. It has no owner, one
    attempt allowed and no schedule.
    """
    seconds_before_base = itertools.count(-3600)

    def make(**overrides: Any) -> TaskRecord:
        fields: dict[str, Any] = {
            "id": new_task_id(),
            "name": "send_email",
            "status": TaskStatus.PENDING,
            "args": ["user@example.com"],
            "kwargs": {"subject": "Welcome"},
            "max_attempts": 1,
            "created_at": clock(next(seconds_before_base)),
        }
        fields.update(overrides)
        return TaskRecord(**fields)

    return make
