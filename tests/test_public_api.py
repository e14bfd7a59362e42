"""Tests of the public surface: app_taskflow.__all__ and the named status sets."""

from __future__ import annotations

import inspect

import pytest

import app_taskflow
from app_taskflow import models
from app_taskflow.models import TaskStatus


def test_all_sorted() -> None:
    assert app_taskflow.__all__ == sorted(app_taskflow.__all__)


def test_all_unique() -> None:
    assert len(set(app_taskflow.__all__)) == len(app_taskflow.__all__)


@pytest.mark.parametrize("name", app_taskflow.__all__)
def test_all_name_imports(name: str) -> None:
    namespace: dict[str, object] = {}

    exec(f"from app_taskflow import {name}", namespace)

    assert namespace[name] is getattr(app_taskflow, name)


def test_all_lists_every_public_name() -> None:
    public = {
        name
        for name, value in vars(app_taskflow).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }

    assert public == set(app_taskflow.__all__)


def test_task_status_is_str() -> None:
    assert TaskStatus.PENDING == "PENDING"
    assert TaskStatus("FAILED") is TaskStatus.FAILED


def test_active_statuses() -> None:
    active = models.ACTIVE_STATUSES

    assert active == {TaskStatus.PENDING, TaskStatus.RUNNING}


def test_terminal_statuses() -> None:
    terminal = models.TERMINAL_STATUSES

    assert terminal == {
        TaskStatus.SUCCESS,
        TaskStatus.FAILED,
        TaskStatus.INTERRUPTED,
        TaskStatus.CANCELLED,
    }


def test_status_sets_partition_statuses() -> None:
    active, terminal = models.ACTIVE_STATUSES, models.TERMINAL_STATUSES

    assert active.isdisjoint(terminal)
    assert active | terminal == set(TaskStatus)
