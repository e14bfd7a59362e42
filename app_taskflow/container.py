"""TaskflowContainer: the dependency-injector container that wires store, policy and taskflow."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dependency_injector import containers, providers

from app_taskflow.auth import BasicAuth, BearerAuth, no_auth
from app_taskflow.config import TaskflowSettings, load_settings
from app_taskflow.context import LogLimits
from app_taskflow.dispatcher import DispatcherSettings
from app_taskflow.errors import ConfigurationError
from app_taskflow.logfile import TaskLogFileOptions
from app_taskflow.stores.base import TaskStore
from app_taskflow.stores.memory import MemoryStore
from app_taskflow.stores.sql import SqlStore
from app_taskflow.taskflow import Taskflow
from app_taskflow.tasks import RetryPolicy

ENVIRONMENT_VARIABLE = "APP_TASKFLOW_ENV"
FOLDER_VARIABLE = "APP_TASKFLOW_CONTAINERS"
DEFAULT_ENVIRONMENT = "development"


def sqlite_url(path: str) -> str:
    """Return the SQLAlchemy URL of a SQLite file, creating its folder if needed."""
    file = Path(path).expanduser()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"Cannot create the folder of the SQLite file {str(file)!r} (store.path): "
            f"{error.strerror}. Choose a path in a folder this process may write to."
        ) from error
    return f"sqlite:///{file}"


def postgres_url(url: str) -> str:
    """Return a PostgreSQL URL that names the psycopg driver SQLAlchemy should use."""
    scheme, separator, rest = url.partition("://")
    return f"postgresql+psycopg{separator}{rest}" if scheme in ("postgres", "postgresql") else url


def log_file_options(section: dict[str, Any] | None) -> TaskLogFileOptions | None:
    """Return the task log file options of a ``logging.file`` section, or None without one."""
    return None if section is None else TaskLogFileOptions(**section)


def build_redis_store(url: str, prefix: str) -> TaskStore:
    """Return a ``RedisStore``; the import is deferred so that the extra stays optional.

    Raises:
        MissingExtraError: the ``redis`` package is not installed.
    """
    from app_taskflow.stores.redis import RedisStore

    return RedisStore(url, prefix=prefix)


class TaskflowContainer(containers.DeclarativeContainer):
    """The providers of one app's task system, configured from a file per environment.

    Tests swap parts with overrides, for example
    ``container.store.override(providers.Singleton(MemoryStore))``; the store is built
    when the app starts, so an override made after importing the app still applies.
    """

    config = providers.Configuration(strict=True)

    store = providers.Selector(
        config.store.kind,
        memory=providers.Singleton(MemoryStore),
        sqlite=providers.Singleton(
            SqlStore,
            url=providers.Callable(sqlite_url, config.store.path),
            busy_timeout=config.store.busy_timeout,
        ),
        postgres=providers.Singleton(
            SqlStore, url=providers.Callable(postgres_url, config.store.url)
        ),
        redis=providers.Singleton(
            build_redis_store, url=config.store.url, prefix=config.store.prefix
        ),
    )

    retry_policy = providers.Singleton(
        RetryPolicy,
        retries=config.retry.retries,
        delay=config.retry.delay,
        backoff=config.retry.backoff,
        max_delay=config.retry.max_delay,
        jitter=config.retry.jitter,
    )

    dispatcher_settings = providers.Singleton(
        DispatcherSettings,
        max_concurrency=config.runner.max_concurrency,
        sync_workers=config.runner.sync_workers,
        shutdown_grace=config.runner.shutdown_grace,
        heartbeat_interval=config.leases.heartbeat_interval,
        lease_expiry=config.leases.expiry,
        poll_interval=config.leases.poll_interval,
        retry_delay_scale=config.retry.delay_scale,
        outage_policy=config.outage.policy,
        outage_buffer_size=config.outage.buffer_size,
        retention_max_age=config.retention.max_age,
        retention_max_count=config.retention.max_count,
        retention_interval=config.retention.interval,
    )

    auth = providers.Selector(
        config.auth.kind,
        none=providers.Object(no_auth),
        basic=providers.Singleton(
            BasicAuth, username=config.auth.username, password=config.auth.password
        ),
        bearer=providers.Singleton(BearerAuth, token=config.auth.token),
    )
    """The FastAPI dependency that authenticates requests to the REST API and dashboard."""

    log_limits = providers.Singleton(
        LogLimits,
        max_entries_per_task=config.logging.max_entries_per_task,
        max_entry_chars=config.logging.max_entry_chars,
    )

    log_file = providers.Callable(log_file_options, config.logging.file)
    """Options of the task log file, or None when ``logging.file`` is not set."""

    taskflow = providers.Singleton(
        Taskflow,
        store_factory=store.provider,
        auth_factory=auth.provider,
        default_policy=retry_policy,
        settings=dispatcher_settings,
        api_prefix=config.api.prefix,
        log_limits=log_limits,
        log_file=log_file,
        stdlib_logging=config.logging.stdlib,
        prometheus=config.metrics.prometheus,
        request_id_header=config.api.request_id_header,
    )

    @classmethod
    def from_settings(cls, settings: TaskflowSettings) -> TaskflowContainer:
        """Return a container configured from validated settings."""
        container = cls()
        container.config.from_dict(settings.model_dump())
        return container

    @classmethod
    def from_environment(
        cls, environment: str | None = None, folder: str | Path | None = None
    ) -> TaskflowContainer:
        """Return a container configured from ``<folder>/<environment>.yaml``.

        Args:
            environment: the environment's name; defaults to ``$APP_TASKFLOW_ENV``, then
                ``development``.
            folder: the folder of configuration files; defaults to
                ``$APP_TASKFLOW_CONTAINERS``, then ``containers`` in the working directory.

        Raises:
            ConfigurationError: the file is missing, or a key or value in it is invalid.
        """
        name = environment or os.environ.get(ENVIRONMENT_VARIABLE) or DEFAULT_ENVIRONMENT
        directory = Path(folder or os.environ.get(FOLDER_VARIABLE) or "containers")
        path = directory / f"{name}.yaml"
        if not path.is_file():
            available = sorted(file.stem for file in directory.glob("*.yaml"))
            raise ConfigurationError(
                f"No configuration for environment {name!r}: {path.resolve()} does not "
                f"exist. Available environments there: {', '.join(available) or 'none'}. "
                f"Set {ENVIRONMENT_VARIABLE} to one of them, or point "
                f"{FOLDER_VARIABLE} (or folder= of from_environment()) at the folder that "
                "holds your configuration files."
            )
        return cls.from_settings(load_settings(path))
