"""Configuration files: environment variables, pydantic validation and clear errors."""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app_taskflow.errors import ConfigurationError

_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class _Section(BaseModel):
    # Strict: YAML gives real numbers and booleans, so a boolean where a number belongs
    # (max_concurrency: true) is a mistake to report, not a value to convert.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class MemoryStoreSettings(_Section):
    """A store in process memory: for tests; nothing survives a restart."""

    kind: Literal["memory"]


class SqliteStoreSettings(_Section):
    """The embedded SQLite store: one file shared by the processes of one host."""

    kind: Literal["sqlite"]
    path: str = Field(min_length=1, description="Path of the database file.")
    busy_timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for a lock.")


class PostgresStoreSettings(_Section):
    """PostgreSQL through SQLAlchemy and psycopg: shared by instances on several hosts."""

    kind: Literal["postgres"]
    url: str = Field(
        pattern=r"^postgres(ql)?(\+psycopg)?://",
        description="postgresql://user:password@host:port/database",
    )


class RedisStoreSettings(_Section):
    """Redis through redis-py's asyncio client: shared by instances on several hosts."""

    kind: Literal["redis"]
    url: str = Field(pattern=r"^rediss?://", description="redis://host:port/db")
    prefix: str = Field(
        default="taskflow", pattern=r"^[A-Za-z0-9_\-:.]+$", description="Prefix of every key."
    )


STORE_KINDS = ("memory", "sqlite", "postgres", "redis")

StoreSettings = Annotated[
    Union[  # noqa: UP007 - discriminated union
        MemoryStoreSettings, SqliteStoreSettings, PostgresStoreSettings, RedisStoreSettings
    ],
    Field(discriminator="kind"),
]


class NoAuthSettings(_Section):
    """No authentication: anyone who reaches the app may read and change its tasks."""

    kind: Literal["none"]


class BasicAuthSettings(_Section):
    """HTTP Basic authentication with one username and password."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    kind: Literal["basic"]
    username: str = Field(min_length=1)
    password: str = Field(min_length=1, repr=False)


class BearerAuthSettings(_Section):
    """A bearer token that API clients send as ``Authorization: Bearer <token>``."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    kind: Literal["bearer"]
    token: str = Field(min_length=1, repr=False)


AUTH_KINDS = ("none", "basic", "bearer")

AuthSettings = Annotated[
    Union[NoAuthSettings, BasicAuthSettings, BearerAuthSettings],  # noqa: UP007
    Field(discriminator="kind"),
]

SECRET_KEYS = frozenset({"password", "token"})
"""Keys whose values are never parsed as YAML after expansion nor shown in error messages."""

TEXT_KEYS = SECRET_KEYS | {"username"}
"""Keys whose values stay text after expansion: YAML would read a username 0123 as 83."""


class RunnerSettings(_Section):
    """How many tasks run at once and how long they get at shutdown."""

    max_concurrency: int = Field(default=100, ge=1)
    sync_workers: int = Field(default=8, ge=1)
    shutdown_grace: float = Field(default=10.0, ge=0)


class RetentionSettings(_Section):
    """How long finished tasks are kept, by age and by count; null turns a rule off."""

    max_age: float | None = Field(
        default=14 * 24 * 3600.0,
        gt=0,
        description="Seconds a finished task is kept after it finished (default 14 days).",
    )
    max_count: int | None = Field(
        default=None, ge=0, description="Finished tasks kept at most, the newest first."
    )
    interval: float = Field(default=60.0, gt=0, description="Seconds between two prunes.")


class OutageSettings(_Section):
    """The behaviour of ``add_task`` while the store cannot be reached."""

    policy: Literal["raise", "buffer"] = Field(
        default="raise",
        description=(
            "raise: the request fails with 503. buffer: tasks wait in memory and are "
            "stored when the store is back (lost if the process dies first)."
        ),
    )
    buffer_size: int = Field(
        default=10_000, ge=1, description="Maximum number of tasks in the buffer."
    )


class LeaseSettings(_Section):
    """Heartbeat and expiry of instance leases, and the polling interval, in seconds."""

    heartbeat_interval: float = Field(default=5.0, gt=0)
    expiry: float = Field(default=30.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _check_expiry(self) -> LeaseSettings:
        if self.expiry <= self.heartbeat_interval:
            raise ValueError(
                f"leases.expiry ({self.expiry}) must be longer than "
                f"leases.heartbeat_interval ({self.heartbeat_interval}), or every lease "
                "would expire before its renewal"
            )
        return self


class RetrySettings(_Section):
    """Defaults for tasks that do not set their own retry options."""

    retries: int = Field(default=0, ge=0)
    delay: float = Field(default=1.0, ge=0)
    backoff: float = Field(default=2.0, ge=1)
    max_delay: float | None = Field(default=300.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    delay_scale: float = Field(
        default=1.0, ge=0, description="Factor on every retry delay; 0 makes retries immediate."
    )


class ApiSettings(_Section):
    """The mount path of the REST API, and the request header that carries a request id."""

    prefix: str = Field(default="/tasks", pattern=r"^/[A-Za-z0-9_\-/]*[A-Za-z0-9_\-]$")
    request_id_header: str | None = Field(
        default="X-Request-ID",
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
        description=(
            "Request header whose value a task records as origin.request_id; null for none."
        ),
    )


LogLevelName = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]

CompressionFormat = Literal["gz", "bz2", "xz", "lzma", "tar", "tar.gz", "tar.bz2", "tar.xz", "zip"]
"""Formats loguru (0.7) can compress rotated log files to."""


class LogFileSettings(_Section):
    """The plain-text task log file, written through loguru's file sink."""

    path: str = Field(
        min_length=1, description="Path of the file; {pid} in it becomes the process id."
    )
    rotation: str | int | None = Field(
        default=None,
        description=(
            "When loguru starts a new file: a size ('50 MB'), an interval ('1 day'), a time "
            "('00:00'), or null to leave rotation to an external tool such as logrotate."
        ),
    )
    retention: str | int | None = Field(
        default=None,
        description="Rotated files loguru keeps: an age ('14 days'), a count (10), or null.",
    )
    compression: CompressionFormat | None = Field(
        default=None, description="Format loguru compresses rotated files to, or null."
    )
    level: LogLevelName = Field(default="INFO", description="Lowest level written to the file.")

    @model_validator(mode="before")
    @classmethod
    def _upper_level(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("level"), str):
            return {**data, "level": data["level"].upper()}
        return data


class LoggingSettings(_Section):
    """Caps on task logs, the task log file and forwarding to the ``logging`` module."""

    max_entries_per_task: int = Field(
        default=1000, ge=1, description="task_log() entries kept per task; later ones dropped."
    )
    max_entry_chars: int = Field(
        default=4000, ge=1, description="Characters kept of a task_log() message or value."
    )
    stdlib: bool = Field(
        default=False,
        description="Forward the library's log lines to the logging logger 'app_taskflow'.",
    )
    file: LogFileSettings | None = Field(
        default=None, description="The task log file, or null for none."
    )


class MetricsSettings(_Section):
    """The metrics endpoints served besides the JSON ``/tasks/metrics``."""

    prometheus: bool = Field(
        default=False,
        description="Serve /tasks/metrics/prometheus; needs the [prometheus] extra.",
    )


class TaskflowSettings(_Section):
    """The whole configuration of one environment."""

    store: StoreSettings
    runner: RunnerSettings = RunnerSettings()
    leases: LeaseSettings = LeaseSettings()
    retry: RetrySettings = RetrySettings()
    outage: OutageSettings = OutageSettings()
    retention: RetentionSettings = RetentionSettings()
    api: ApiSettings = ApiSettings()
    auth: AuthSettings = NoAuthSettings(kind="none")
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()


_STORE_SETTINGS: dict[str, type[BaseModel]] = {
    "memory": MemoryStoreSettings,
    "sqlite": SqliteStoreSettings,
    "postgres": PostgresStoreSettings,
    "redis": RedisStoreSettings,
}

_UNION_MEMBERS: dict[str, type[BaseModel]] = {
    **_STORE_SETTINGS,
    "none": NoAuthSettings,
    "basic": BasicAuthSettings,
    "bearer": BearerAuthSettings,
}
_UNION_KINDS = {"store": STORE_KINDS, "auth": AUTH_KINDS}


def load_settings(path: Path) -> TaskflowSettings:
    """Read, expand and validate one configuration file.

    ``${NAME}`` in a value is replaced by the environment variable ``NAME``, and
    ``${NAME:-default}`` falls back to ``default`` when it is unset.

    Raises:
        ConfigurationError: the file is missing or unreadable, a variable is unset, or a
            key or value is invalid; the message names the key and the allowed values.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigurationError(f"Cannot read configuration file {path}: {error}.") from error
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{path} must hold a mapping of sections (store, runner, ...), not "
            f"{type(data).__name__}."
        )
    return parse_settings(_expand_environment(data, path), source=str(path))


def parse_settings(data: dict[str, Any], source: str = "configuration") -> TaskflowSettings:
    """Validate a configuration mapping.

    Raises:
        ConfigurationError: a key or value is invalid; the message names each problem.
    """
    try:
        return TaskflowSettings.model_validate(data)
    except ValidationError as error:
        problems = "\n".join(f"  - {_describe(item)}" for item in error.errors())
        raise ConfigurationError(f"Invalid configuration in {source}:\n{problems}") from None


def _expand_environment(value: Any, path: Path, keep_text: bool = False) -> Any:
    if isinstance(value, dict):
        return {
            key: _expand_environment(item, path, keep_text=key in TEXT_KEYS)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_expand_environment(item, path) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        found = os.environ.get(name)
        # As in the shell, ${NAME:-default} also takes the default when NAME is empty.
        if found is not None and (found or default is None):
            return found
        if default is not None:
            return default
        raise ConfigurationError(
            f"{path} uses ${{{name}}}, but the environment variable {name} is not set. "
            f"Set it, or give a default as ${{{name}:-value}}."
        )

    expanded = _ENV_REFERENCE.sub(replace, value)
    if keep_text:
        # A password such as 0777 must stay text: YAML would read it as the number 511.
        return expanded
    if expanded != value:
        # A whole value taken from the environment is parsed as YAML, so numbers stay numbers.
        try:
            return yaml.safe_load(expanded) if expanded.strip() else expanded
        except yaml.YAMLError:
            return expanded
    return value


def _describe(item: Any) -> str:
    location = tuple(item["loc"])
    key = ".".join(str(part) for part in location if not _is_tag(location, part))
    if item["type"] == "extra_forbidden":
        allowed = _allowed_keys(location[:-1])
        return f"unknown key {key!r}; allowed keys here: {', '.join(allowed)}"
    if item["type"] == "union_tag_invalid":
        tags = item["ctx"]["expected_tags"]
        return (
            f"{key}.kind: unknown {location[0]} kind {item['ctx']['tag']!r}; allowed kinds: {tags}"
        )
    if item["type"] == "union_tag_not_found":
        kinds = _UNION_KINDS.get(str(location[0]), ())
        return f"{key}.kind is missing; allowed kinds: {', '.join(map(repr, kinds))}"
    if item["type"] == "missing":
        return f"{key} is missing"
    if item["type"] == "value_error":
        # Raised by a model validator: its own sentence already names the keys.
        return f"{key}: {item['ctx']['error']}"
    if location and location[-1] in SECRET_KEYS:
        return f"{key}: invalid value (hidden): {item['msg']}"
    value = item.get("input")
    return f"{key}: invalid value {value!r}: {item['msg']}"


def _is_tag(location: tuple[Any, ...], part: Any) -> bool:
    # Pydantic puts the discriminator's value in the location of errors inside a union.
    return len(location) > 1 and part in _UNION_KINDS.get(str(location[0]), ())


def _allowed_keys(location: tuple[Any, ...]) -> list[str]:
    model: Any = TaskflowSettings
    for part in location:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            model = model.model_fields[part].annotation
        elif part in _UNION_MEMBERS:
            model = _UNION_MEMBERS[part]
        else:
            return []
        model = _unwrap(model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])  # An optional section, such as logging.file.
        return annotation  # Resolved by the discriminator tag that follows in the location.
    return annotation
