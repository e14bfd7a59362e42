"""Tests of app_taskflow.container: environments, providers and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from dependency_injector import providers

from app_taskflow.container import TaskflowContainer
from app_taskflow.dispatcher import DispatcherSettings
from app_taskflow.errors import ConfigurationError
from app_taskflow.stores.memory import MemoryStore
from app_taskflow.taskflow import Taskflow
from app_taskflow.tasks import RetryPolicy

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset the variables that choose an environment, and work in an empty folder.

    The development file stores tasks under var/ relative to the working directory, so a
    test that builds its store leaves nothing in the repository.
    """
    monkeypatch.delenv("APP_TASKFLOW_ENV", raising=False)
    monkeypatch.delenv("APP_TASKFLOW_CONTAINERS", raising=False)
    monkeypatch.chdir(tmp_path)


def test_from_environment_name_and_folder() -> None:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    assert container.config.store.kind() == "memory"


def test_from_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_ENV", "test")

    container = TaskflowContainer.from_environment(folder=CONTAINERS)

    assert container.config.store.kind() == "memory"


def test_from_environment_folder_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_ENV", "test")
    monkeypatch.setenv("APP_TASKFLOW_CONTAINERS", str(CONTAINERS))

    container = TaskflowContainer.from_environment()

    assert container.config.store.kind() == "memory"


def test_from_environment_default_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CONTAINERS.parent)

    container = TaskflowContainer.from_environment()

    assert container.config.store.kind() == "sqlite"
    assert container.config.store.path() == "var/taskflow.db"


def test_from_environment_argument_over_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_ENV", "development")

    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    assert container.config.store.kind() == "memory"


def test_from_environment_missing_file() -> None:
    expected = "Available environments there: development, production, test."
    with pytest.raises(ConfigurationError, match=re.escape(expected)) as caught:
        TaskflowContainer.from_environment("staging", folder=CONTAINERS)

    message = str(caught.value)
    assert message.startswith("No configuration for environment 'staging'")
    assert f"{CONTAINERS / 'staging.yaml'} does not exist" in message
    assert "Set APP_TASKFLOW_ENV to one of them" in message


def test_from_environment_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=re.escape("Available environments there: none")):
        TaskflowContainer.from_environment("test", folder=tmp_path)


def test_from_environment_invalid_file(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("store:\n  kind: mongodb\n", encoding="utf-8")

    with pytest.raises(ConfigurationError, match=re.escape("unknown store kind 'mongodb'")):
        TaskflowContainer.from_environment("broken", folder=tmp_path)


def test_container_taskflow_singleton() -> None:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    assert container.taskflow() is container.taskflow()


def test_container_taskflow_type() -> None:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    assert isinstance(container.taskflow(), Taskflow)


def test_container_settings_from_file() -> None:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    taskflow = container.taskflow()

    assert taskflow.settings == DispatcherSettings(
        max_concurrency=100,
        sync_workers=4,
        heartbeat_interval=0.2,
        lease_expiry=1,
        poll_interval=0.1,
        shutdown_grace=2,
        retry_delay_scale=0,
    )
    assert taskflow.default_policy == RetryPolicy(retries=0, delay=0, jitter=0)
    assert taskflow.api_prefix == "/tasks"


def test_container_memory_store_singleton() -> None:
    container = TaskflowContainer.from_environment("test", folder=CONTAINERS)

    assert isinstance(container.store(), MemoryStore)
    assert container.store() is container.store()


async def test_container_store_override_after_taskflow() -> None:
    container = TaskflowContainer.from_environment("development", folder=CONTAINERS)
    taskflow = container.taskflow()

    container.store.override(providers.Singleton(MemoryStore))
    try:
        await taskflow.start()
        try:
            store = taskflow.store
        finally:
            await taskflow.stop()
    finally:
        container.store.reset_override()

    assert isinstance(store, MemoryStore)
