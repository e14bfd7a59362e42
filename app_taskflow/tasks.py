"""Task definitions: the decorated function, its retry policy and the registry of names."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

from app_taskflow.errors import NotATaskError, TaskDefinitionError
from app_taskflow.serialization import ArgumentCodec

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often a failed attempt is tried again.

    Attributes:
        retries: attempts allowed after the first one (``retries + 1`` in all).
        delay: seconds before the first retry.
        backoff: factor applied to the delay for each later retry.
        max_delay: upper bound in seconds of any delay, jitter included; ``None`` for none.
        jitter: fraction of the delay added or removed at random (0.1 is up to 10 %).
        retry_on: exception types that are retried; any other exception fails at once.
        timeout: seconds an attempt may run before it fails with ``TimeoutError``.
    """

    retries: int = 0
    delay: float = 1.0
    backoff: float = 2.0
    max_delay: float | None = 300.0
    jitter: float = 0.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    timeout: float | None = None

    def __post_init__(self) -> None:
        _require(
            isinstance(self.retries, int) and self.retries >= 0,
            "retries",
            self.retries,
            "a whole number >= 0",
        )
        _require(self.delay >= 0, "delay", self.delay, "a number of seconds >= 0")
        _require(self.backoff >= 1, "backoff", self.backoff, "a factor >= 1")
        _require(
            self.max_delay is None or self.max_delay >= 0,
            "max_delay",
            self.max_delay,
            "a number of seconds >= 0 or None",
        )
        _require(0 <= self.jitter <= 1, "jitter", self.jitter, "a fraction from 0 to 1")
        _require(
            self.timeout is None or self.timeout > 0,
            "timeout",
            self.timeout,
            "a number of seconds > 0 or None",
        )
        _require(
            isinstance(self.retry_on, tuple),
            "retry_on",
            self.retry_on,
            "a tuple of exception classes",
        )
        for exc_type in self.retry_on:
            _require(
                isinstance(exc_type, type) and issubclass(exc_type, BaseException),
                "retry_on",
                exc_type,
                "a tuple of exception classes",
            )

    @property
    def max_attempts(self) -> int:
        """Number of attempts in all: the first one plus the retries."""
        return self.retries + 1

    def replace(self, **changes: Any) -> RetryPolicy:
        """Return a copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Return whether attempt number ``attempt``, which raised ``error``, is retried."""
        return attempt < self.max_attempts and isinstance(error, self.retry_on)

    def delay_after(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            delay = self.delay * self.backoff ** (attempt - 1)
        except OverflowError:
            # Past about 1.8e308 a float power raises instead of returning inf, and so does an
            # int power converted to float. The delay is then infinite, so max_delay caps it.
            delay = math.inf if self.delay else 0.0
        if self.jitter:
            delay *= 1 + random.uniform(-self.jitter, self.jitter)
        if self.max_delay is not None:
            delay = min(delay, self.max_delay)
        return delay if math.isfinite(delay) else (self.max_delay or 0.0)


def _require(condition: bool, field: str, value: object, expected: str) -> None:
    if not condition:
        raise TaskDefinitionError(f"Invalid {field}={value!r}: expected {expected}.")


class TaskDefinition(Generic[P, R]):
    """A function declared as a task with ``@taskflow.task()``.

    Calling it runs the function directly, untracked, so task code stays easy to test.
    ``TaskflowTasks.add_task`` runs it as a tracked task instead.
    """

    def __init__(
        self,
        func: Callable[P, R],
        *,
        name: str,
        policy: RetryPolicy,
        requeue_on_interrupt: bool,
    ) -> None:
        self.func = func
        self.name = name
        self.policy = policy
        self.requeue_on_interrupt = requeue_on_interrupt
        self.is_async = inspect.iscoroutinefunction(func)
        self.codec = ArgumentCodec(func, task_name=name)
        functools.update_wrapper(self, func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<TaskDefinition {self.name}>"


def default_task_name(func: Callable[..., Any]) -> str:
    """Return the name a task gets by default: its module and qualified name."""
    return f"{func.__module__}.{func.__qualname__}"


class TaskRegistry:
    """The tasks declared in one app, by name."""

    def __init__(self) -> None:
        self._by_name: dict[str, TaskDefinition[Any, Any]] = {}

    def register(self, definition: TaskDefinition[Any, Any]) -> None:
        """Add a task.

        Raises:
            TaskDefinitionError: another function is already registered under its name.
        """
        existing = self._by_name.get(definition.name)
        if existing is not None and existing.func is definition.func:
            raise TaskDefinitionError(
                f"{default_task_name(definition.func)} is already declared as task "
                f"{definition.name!r}; declare each function once, with all its options."
            )
        if existing is not None:
            raise TaskDefinitionError(
                f"Task name {definition.name!r} is already used by "
                f"{default_task_name(existing.func)}, so {default_task_name(definition.func)} "
                "cannot take it; give one of them another name with @taskflow.task(name=...)."
            )
        self._by_name[definition.name] = definition

    def get(self, name: str) -> TaskDefinition[Any, Any] | None:
        """Return the task registered under ``name``, or ``None``."""
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """Return the registered task names, sorted."""
        return sorted(self._by_name)

    def resolve(self, func: Callable[..., Any]) -> TaskDefinition[Any, Any]:
        """Return the registered task for ``func``.

        Raises:
            NotATaskError: ``func`` is not a function decorated by this app's taskflow.
        """
        if isinstance(func, TaskDefinition):
            registered = self._by_name.get(func.name)
            if registered is func:
                return func
            raise NotATaskError(
                f"Task {func.name!r} was declared with another Taskflow than this app's; "
                "declare it with the taskflow that the app installed."
            )
        name = getattr(func, "__qualname__", repr(func))
        raise NotATaskError(
            f"{name} is not a task: decorate it with @taskflow.task() so that it is "
            "tracked, retried and stored."
        )
