"""Tests of app_taskflow.config: the configuration files and their error messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app_taskflow.config import TaskflowSettings, load_settings, parse_settings
from app_taskflow.errors import ConfigurationError

CONTAINERS = Path(__file__).resolve().parents[1] / "containers"
ENVIRONMENT_FILES = sorted(CONTAINERS.glob("*.yaml"))

REQUIRED_VARIABLES = {
    "production": {
        "APP_TASKFLOW_SQLITE_PATH": "/srv/app/taskflow.db",
        "APP_TASKFLOW_AUTH_USERNAME": "ops",
        "APP_TASKFLOW_AUTH_PASSWORD": "correct horse battery staple",
    }
}
"""Environment variables that a file in containers/ uses without a default."""


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """Return a function that writes YAML text to a file under tmp_path and returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "environment.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def memory_config(**sections: dict[str, Any]) -> dict[str, Any]:
    return {"store": {"kind": "memory"}, **sections}


def test_environment_files_found() -> None:
    assert [path.stem for path in ENVIRONMENT_FILES] == ["development", "production", "test"]


@pytest.mark.parametrize("path", ENVIRONMENT_FILES, ids=lambda path: path.stem)
def test_load_settings_environment_file(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED_VARIABLES.get(path.stem, {}).items():
        monkeypatch.setenv(name, value)

    settings = load_settings(path)

    assert isinstance(settings, TaskflowSettings)


def test_load_settings_production_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED_VARIABLES["production"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("APP_TASKFLOW_MAX_CONCURRENCY", raising=False)
    monkeypatch.delenv("APP_TASKFLOW_LEASE_EXPIRY", raising=False)

    settings = load_settings(CONTAINERS / "production.yaml")

    assert settings.store.kind == "sqlite"
    assert settings.store.path == "/srv/app/taskflow.db"
    assert settings.runner.max_concurrency == 100
    assert settings.leases.expiry == 30


def test_load_settings_production_requires_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APP_TASKFLOW_SQLITE_PATH", raising=False)

    expected = "the environment variable APP_TASKFLOW_SQLITE_PATH is not set"
    with pytest.raises(ConfigurationError, match=expected):
        load_settings(CONTAINERS / "production.yaml")


def test_load_settings_test_file_values() -> None:
    settings = load_settings(CONTAINERS / "test.yaml")

    assert settings.store.kind == "memory"
    assert settings.retry.delay_scale == 0


def test_parse_settings_unknown_key() -> None:
    data = memory_config(runner={"max_concurency": 5})

    expected = (
        "unknown key 'runner.max_concurency'; allowed keys here: "
        "max_concurrency, sync_workers, shutdown_grace"
    )
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_parse_settings_unknown_section() -> None:
    data = memory_config(workers={"size": 5})

    expected = (
        "unknown key 'workers'; allowed keys here: store, runner, leases, retry, outage, "
        "retention, api, auth, logging, metrics"
    )
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_parse_settings_unknown_store_key() -> None:
    data = {"store": {"kind": "sqlite", "path": "tasks.db", "timeout": 5}}

    expected = "unknown key 'store.timeout'; allowed keys here: kind, path, busy_timeout"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_parse_settings_names_source() -> None:
    data = memory_config(runner={"max_concurency": 5})

    with pytest.raises(ConfigurationError, match=r"^Invalid configuration in app\.yaml:"):
        parse_settings(data, source="app.yaml")


def test_parse_settings_unknown_store_kind() -> None:
    expected = "store.kind: unknown store kind 'mongodb'; allowed kinds: 'memory', 'sqlite'"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings({"store": {"kind": "mongodb"}})


def test_parse_settings_missing_store_kind() -> None:
    expected = "store.kind is missing; allowed kinds: 'memory', 'sqlite'"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings({"store": {"path": "tasks.db"}})


def test_parse_settings_missing_store() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("store is missing")):
        parse_settings({})


def test_parse_settings_missing_sqlite_path() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("store.path is missing")):
        parse_settings({"store": {"kind": "sqlite"}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("runner", "max_concurrency", -1),
        ("runner", "sync_workers", 0),
        ("retry", "jitter", 2),
        ("retry", "backoff", 0.5),
        ("leases", "poll_interval", 0),
        ("api", "prefix", "tasks"),
    ],
    ids=lambda item: str(item),
)
def test_parse_settings_invalid_value(section: str, key: str, value: object) -> None:
    data = memory_config(**{section: {key: value}})

    expected = f"{section}.{key}: invalid value {value!r}"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_parse_settings_lists_every_problem() -> None:
    data = memory_config(runner={"max_concurrency": -1}, retry={"jitter": 2})

    with pytest.raises(ConfigurationError) as caught:
        parse_settings(data)

    message = str(caught.value)
    assert "runner.max_concurrency" in message
    assert "retry.jitter" in message


@pytest.mark.parametrize("expiry", [5, 4], ids=["equal", "shorter"])
def test_parse_settings_expiry_not_after_heartbeat(expiry: float) -> None:
    data = memory_config(leases={"heartbeat_interval": 5, "expiry": expiry})

    expected = f"leases.expiry ({float(expiry)}) must be longer than leases.heartbeat_interval"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_load_settings_missing_variable(
    write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKFLOW_TEST_DB", raising=False)
    path = write_config("store:\n  kind: sqlite\n  path: ${TASKFLOW_TEST_DB}\n")

    expected = f"{path} uses ${{TASKFLOW_TEST_DB}}, but the environment variable "
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        load_settings(path)


def test_load_settings_default_is_number(
    write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TASKFLOW_TEST_WORKERS", raising=False)
    monkeypatch.delenv("TASKFLOW_TEST_GRACE", raising=False)
    path = write_config(
        "store:\n  kind: memory\n"
        "runner:\n"
        "  sync_workers: ${TASKFLOW_TEST_WORKERS:-3}\n"
        "  shutdown_grace: ${TASKFLOW_TEST_GRACE:-2.5}\n"
    )

    settings = load_settings(path)

    assert settings.runner.sync_workers == 3
    assert settings.runner.shutdown_grace == 2.5


def test_load_settings_variable_is_number(
    write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKFLOW_TEST_WORKERS", "12")
    path = write_config(
        "store:\n  kind: memory\nrunner:\n  sync_workers: ${TASKFLOW_TEST_WORKERS:-3}\n"
    )

    settings = load_settings(path)

    assert settings.runner.sync_workers == 12


def test_load_settings_variable_inside_text(
    write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKFLOW_TEST_DIR", "/srv/app")
    path = write_config("store:\n  kind: sqlite\n  path: ${TASKFLOW_TEST_DIR}/tasks.db\n")

    settings = load_settings(path)

    assert settings.store.path == "/srv/app/tasks.db"


def test_load_settings_invalid_variable_value(
    write_config: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKFLOW_TEST_WORKERS", "many")
    path = write_config(
        "store:\n  kind: memory\nrunner:\n  sync_workers: ${TASKFLOW_TEST_WORKERS}\n"
    )

    with pytest.raises(
        ConfigurationError, match=re.escape("runner.sync_workers: invalid value 'many'")
    ):
        load_settings(path)


def test_load_settings_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "staging.yaml"

    with pytest.raises(
        ConfigurationError, match=re.escape(f"Cannot read configuration file {path}")
    ):
        load_settings(path)


def test_load_settings_invalid_yaml(write_config: Callable[[str], Path]) -> None:
    path = write_config("store: [memory\n")

    with pytest.raises(ConfigurationError, match=re.escape(f"{path} is not valid YAML")):
        load_settings(path)


def test_load_settings_not_mapping(write_config: Callable[[str], Path]) -> None:
    path = write_config("- memory\n")

    with pytest.raises(ConfigurationError, match=re.escape("must hold a mapping of sections")):
        load_settings(path)


def test_load_settings_empty_file(write_config: Callable[[str], Path]) -> None:
    path = write_config("")

    with pytest.raises(ConfigurationError, match=re.escape("store is missing")):
        load_settings(path)
