"""Tests of app_taskflow.tasks: retry policy, task definitions and the registry."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from app_taskflow.errors import NotATaskError, TaskDefinitionError
from app_taskflow.tasks import RetryPolicy, TaskDefinition, TaskRegistry, default_task_name

DefinitionFactory = Callable[..., TaskDefinition[Any, Any]]


def define_in_module(module: str, source: str, name: str) -> Callable[..., Any]:
    """Execute ``source`` as if it were module ``module`` and return its function ``name``."""
    namespace: dict[str, Any] = {"__name__": module}
    exec(source, namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


async def add_async(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("retries", -1),
        ("retries", 1.5),
        ("delay", -0.5),
        ("backoff", 0.5),
        ("max_delay", -1.0),
        ("jitter", -0.1),
        ("jitter", 1.5),
        ("timeout", 0),
        ("timeout", -2.0),
        ("delay", float("nan")),
    ],
    ids=lambda item: str(item),
)
def test_retry_policy_invalid_value(field: str, value: object) -> None:
    with pytest.raises(TaskDefinitionError, match=re.escape(f"Invalid {field}={value!r}")):
        RetryPolicy(**{field: value})


def test_retry_policy_retry_on_not_exception() -> None:
    with pytest.raises(TaskDefinitionError, match=re.escape("Invalid retry_on=<class 'int'>")):
        RetryPolicy(retry_on=(ValueError, int))  # type: ignore[arg-type]


def test_retry_policy_retry_on_not_tuple() -> None:
    expected = "Invalid retry_on=<class 'ValueError'>: expected a tuple of exception classes."
    with pytest.raises(TaskDefinitionError, match=re.escape(expected)):
        RetryPolicy(retry_on=ValueError)  # type: ignore[arg-type]


def test_retry_policy_message_says_expected() -> None:
    with pytest.raises(TaskDefinitionError, match=r"expected a factor >= 1\.$"):
        RetryPolicy(backoff=0.9)


def test_retry_policy_max_attempts() -> None:
    assert RetryPolicy(retries=3).max_attempts == 4


def test_retry_policy_max_attempts_default() -> None:
    assert RetryPolicy().max_attempts == 1


def test_retry_policy_replace_validates() -> None:
    with pytest.raises(TaskDefinitionError, match=re.escape("Invalid jitter=2")):
        RetryPolicy().replace(jitter=2)


@pytest.mark.parametrize(
    ("error", "attempt", "expected"),
    [
        (ValueError("bad"), 1, True),
        (UnicodeError("subclass of ValueError"), 2, True),
        (KeyError("other type"), 1, False),
        (ValueError("last attempt"), 3, False),
        (ValueError("past the last attempt"), 4, False),
    ],
    ids=["match", "subclass", "other-type", "last-attempt", "past-last-attempt"],
)
def test_retry_policy_should_retry(error: BaseException, attempt: int, expected: bool) -> None:
    policy = RetryPolicy(retries=2, retry_on=(ValueError,))

    assert policy.should_retry(error, attempt) is expected


def test_retry_policy_skips_base_exception() -> None:
    policy = RetryPolicy(retries=2)

    assert policy.should_retry(KeyboardInterrupt(), 1) is False


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.5), (2, 4.5), (3, 13.5)])
def test_retry_policy_delay_after_backoff(attempt: int, expected: float) -> None:
    policy = RetryPolicy(retries=5, delay=1.5, backoff=3.0, max_delay=None)

    assert policy.delay_after(attempt) == pytest.approx(expected)


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 3.0), (10, 3.0)])
def test_retry_policy_delay_after_max_delay(attempt: int, expected: float) -> None:
    policy = RetryPolicy(retries=10, delay=1.0, backoff=2.0, max_delay=3.0)

    assert policy.delay_after(attempt) == expected


def test_retry_policy_delay_after_zero_delay() -> None:
    policy = RetryPolicy(retries=5, delay=0, backoff=10.0)

    assert policy.delay_after(5) == 0


@pytest.mark.parametrize("backoff", [2, 2.0], ids=["int-backoff", "float-backoff"])
def test_retry_policy_delay_overflow(backoff: float) -> None:
    policy = RetryPolicy(retries=5000, delay=1.0, backoff=backoff, max_delay=300.0)

    assert policy.delay_after(2000) == 300.0


def test_retry_policy_zero_delay_overflow() -> None:
    policy = RetryPolicy(retries=5000, delay=0.0, backoff=2.0, max_delay=300.0)

    assert policy.delay_after(2000) == 0.0


def test_retry_policy_jitter_bounds() -> None:
    policy = RetryPolicy(retries=1, delay=10.0, jitter=0.2, max_delay=None)

    delays = [policy.delay_after(1) for _ in range(2000)]

    assert min(delays) >= 8.0
    assert max(delays) <= 12.0
    assert len(set(delays)) > 100


def test_retry_policy_jitter_within_max_delay() -> None:
    policy = RetryPolicy(retries=1, delay=10.0, jitter=0.5, max_delay=11.0)

    delays = [policy.delay_after(1) for _ in range(2000)]

    assert max(delays) <= 11.0
    assert min(delays) >= 5.0


def test_task_definition_call_sync(make_definition: DefinitionFactory) -> None:
    definition = make_definition(add)

    assert definition(2, b=3) == 5


async def test_task_definition_call_async(make_definition: DefinitionFactory) -> None:
    definition = make_definition(add_async)

    assert await definition(2, b=3) == 5


def test_task_definition_is_async(make_definition: DefinitionFactory) -> None:
    assert make_definition(add_async).is_async is True
    assert make_definition(add).is_async is False


def test_task_definition_keeps_metadata(make_definition: DefinitionFactory) -> None:
    definition = make_definition(add)

    assert definition.__name__ == "add"
    assert definition.__doc__ == "Add two numbers."
    assert repr(definition) == f"<TaskDefinition {__name__}.add>"


def test_task_definition_unresolvable_hint() -> None:
    func = define_in_module("tests.hints", "def send(when: 'Missing') -> None: ...", "send")

    with pytest.raises(TaskDefinitionError, match="Cannot read the type hints of task 'send'"):
        TaskDefinition(func, name="send", policy=RetryPolicy(), requeue_on_interrupt=False)


def test_default_task_name_module_and_qualname() -> None:
    assert default_task_name(add) == f"{__name__}.add"


def test_default_task_name_nested_function() -> None:
    def inner() -> None: ...

    expected = f"{__name__}.test_default_task_name_nested_function.<locals>.inner"
    assert default_task_name(inner) == expected


def test_default_task_name_other_module(make_definition: DefinitionFactory) -> None:
    source = "def send(address: str) -> None: ..."
    emails = define_in_module("app.emails", source, "send")
    texts = define_in_module("app.texts", source, "send")
    registry = TaskRegistry()

    registry.register(make_definition(emails))
    registry.register(make_definition(texts))

    assert registry.names() == ["app.emails.send", "app.texts.send"]


def test_task_registry_duplicate_name(make_definition: DefinitionFactory) -> None:
    source = "def send(address: str) -> None: ..."
    first = define_in_module("app.emails", source, "send")
    second = define_in_module("app.texts", source, "send")
    registry = TaskRegistry()
    registry.register(make_definition(first, name="send"))

    expected = "Task name 'send' is already used by app.emails.send"
    with pytest.raises(TaskDefinitionError, match=re.escape(expected)):
        registry.register(make_definition(second, name="send"))


def test_task_registry_duplicate_name_says_fix(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    registry.register(make_definition(add, name="add"))

    with pytest.raises(TaskDefinitionError, match=re.escape("@taskflow.task(name=...)")):
        registry.register(make_definition(add_async, name="add"))


def test_task_registry_same_function_twice(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    registry.register(make_definition(add))

    with pytest.raises(TaskDefinitionError, match="declare each function once"):
        registry.register(make_definition(add))


def test_task_registry_get(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    definition = make_definition(add, name="add")
    registry.register(definition)

    assert registry.get("add") is definition
    assert registry.get("missing") is None


def test_task_registry_resolve(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    definition = make_definition(add)
    registry.register(definition)

    assert registry.resolve(definition) is definition


def test_task_registry_resolve_plain_function() -> None:
    registry = TaskRegistry()

    with pytest.raises(NotATaskError, match=r"^add is not a task") as caught:
        registry.resolve(add)

    assert "@taskflow.task()" in str(caught.value)


def test_task_registry_resolve_unregistered(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    definition = make_definition(add, name="add")

    with pytest.raises(NotATaskError, match="Task 'add' was declared with another Taskflow"):
        registry.resolve(definition)


def test_task_registry_resolve_other_definition(make_definition: DefinitionFactory) -> None:
    registry = TaskRegistry()
    registry.register(make_definition(add, name="add"))

    with pytest.raises(NotATaskError, match="another Taskflow"):
        registry.resolve(make_definition(add, name="add"))
