"""Tests of app_taskflow.runner: one attempt, and the outcome the retry policy makes of it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from app_taskflow.context import TaskContext, current_task
from app_taskflow.logs import task_log
from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus
from app_taskflow.runner import AttemptResult, Runner, decide_outcome
from app_taskflow.tasks import TaskDefinition
from app_taskflow.workers import WorkerPool

DefinitionFactory = Callable[..., TaskDefinition[Any, Any]]
RecordFactory = Callable[..., TaskRecord]
ContextFactory = Callable[..., TaskContext]

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


class StopWorkerError(BaseException):
    """A BaseException subclass that is neither KeyboardInterrupt nor SystemExit."""


class RetryableError(Exception):
    pass


@pytest.fixture
def runner(worker_pool: WorkerPool) -> Runner:
    return Runner(worker_pool)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Yield an event that blocked sync tasks wait for. It is set after the test."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def run_attempt(
    runner: Runner,
    make_definition: DefinitionFactory,
    make_task_record: RecordFactory,
    make_context: ContextFactory,
) -> Callable[..., Any]:
    """Return a coroutine function that runs one attempt of ``func`` and returns the result.

    Keyword arguments other than ``args``, ``kwargs`` and ``context`` are retry options.
    """

    async def run(
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        context: TaskContext | None = None,
        **policy: Any,
    ) -> AttemptResult:
        definition = make_definition(func, **policy)
        record = make_task_record(definition, args, kwargs)
        return await runner.run(definition, record, context or make_context())

    return run


def double(value: int) -> int:
    return value * 2


async def double_async(value: int) -> int:
    await asyncio.sleep(0)
    return value * 2


async def test_runner_sync_success(run_attempt: Callable[..., Any]) -> None:
    result = await run_attempt(double, args=(2,))

    assert result.error is None
    assert result.traceback is None
    assert result.cancelled is False
    assert result.duration >= 0


async def test_runner_async_success(run_attempt: Callable[..., Any]) -> None:
    result = await run_attempt(double_async, kwargs={"value": 2})

    assert result.error is None
    assert result.cancelled is False
    assert result.duration >= 0


async def test_runner_arguments_decoded_with_hints(run_attempt: Callable[..., Any]) -> None:
    received: list[object] = []

    def record_argument(when: datetime) -> None:
        received.append(when)

    await run_attempt(record_argument, args=(NOW,))

    assert received == [NOW]


async def test_runner_sync_exception(run_attempt: Callable[..., Any]) -> None:
    def fail_sync() -> None:
        raise ValueError("invalid address")

    result = await run_attempt(fail_sync)

    assert isinstance(result.error, ValueError)
    assert str(result.error) == "invalid address"
    assert "fail_sync" in result.traceback
    assert "ValueError: invalid address" in result.traceback


async def test_runner_async_exception(run_attempt: Callable[..., Any]) -> None:
    async def fail_async() -> None:
        await asyncio.sleep(0)
        raise ValueError("invalid address")

    result = await run_attempt(fail_async)

    assert isinstance(result.error, ValueError)
    assert "fail_async" in result.traceback


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_runner_traceback_starts_in_task_code(
    run_attempt: Callable[..., Any], is_async: bool
) -> None:
    def fail_sync() -> None:
        raise ValueError("invalid address")

    async def fail_async() -> None:
        raise ValueError("invalid address")

    result = await run_attempt(fail_async if is_async else fail_sync)

    assert "app_taskflow" not in result.traceback


@pytest.mark.parametrize(
    "error_type",
    [KeyboardInterrupt, SystemExit, StopWorkerError],
    ids=["KeyboardInterrupt", "SystemExit", "custom"],
)
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_runner_base_exception_fails_attempt(
    run_attempt: Callable[..., Any], error_type: type[BaseException], is_async: bool
) -> None:
    def raise_sync() -> None:
        raise error_type("stop")

    async def raise_async() -> None:
        await asyncio.sleep(0)
        raise error_type("stop")

    result = await run_attempt(raise_async if is_async else raise_sync)

    assert type(result.error) is error_type
    assert result.cancelled is False
    assert f"{error_type.__name__}: stop" in result.traceback


async def test_runner_own_cancelled_error(
    run_attempt: Callable[..., Any],
) -> None:
    async def raise_cancelled() -> None:
        raise asyncio.CancelledError("raised by the task itself")

    result = await run_attempt(raise_cancelled)

    assert isinstance(result.error, asyncio.CancelledError)
    assert result.cancelled is False


async def test_runner_async_timeout(run_attempt: Callable[..., Any]) -> None:
    async def sleep_long() -> None:
        await asyncio.sleep(30)

    result = await run_attempt(sleep_long, timeout=0.05)

    assert isinstance(result.error, TimeoutError)


async def test_runner_sync_timeout(
    run_attempt: Callable[..., Any], release: threading.Event
) -> None:
    def block() -> None:
        release.wait(30)

    result = await run_attempt(block, timeout=0.05)

    assert isinstance(result.error, TimeoutError)
    assert "did not finish within 0.05 s" in str(result.error)


async def test_runner_sync_timeout_keeps_thread(
    runner: Runner,
    worker_pool: WorkerPool,
    make_definition: DefinitionFactory,
    make_task_record: RecordFactory,
    make_context: ContextFactory,
    release: threading.Event,
) -> None:
    def block() -> None:
        release.wait(30)

    definition = make_definition(block, timeout=0.05)
    await runner.run(definition, make_task_record(definition), make_context())

    assert worker_pool.busy == 1


def log_at_depth(depth: int) -> None:
    if depth == 0:
        task_log("deep entry", level="warning", depth=3)
        return
    log_at_depth(depth - 1)


async def log_at_depth_async(depth: int) -> None:
    if depth == 0:
        task_log("deep entry", level="warning", depth=3)
        return
    await log_at_depth_async(depth - 1)


@pytest.mark.parametrize("func", [log_at_depth, log_at_depth_async], ids=["sync", "async"])
async def test_runner_task_log_nested(
    run_attempt: Callable[..., Any], make_context: ContextFactory, func: Callable[..., Any]
) -> None:
    context = make_context(attempt=2, max_attempts=3)

    result = await run_attempt(func, args=(3,), context=context)

    entries = context.take_logs()
    assert result.error is None
    assert [entry.message for entry in entries] == ["deep entry"]
    assert entries[0].level == "WARNING"
    assert entries[0].attempt == 2
    assert entries[0].extra == {"depth": 3}


async def test_runner_sync_off_event_loop(run_attempt: Callable[..., Any]) -> None:
    threads: list[threading.Thread] = []

    def note_thread() -> None:
        threads.append(threading.current_thread())

    await run_attempt(note_thread)

    assert threads[0] is not threading.current_thread()
    assert threads[0].name.startswith("test-worker")


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_runner_current_task_set(
    run_attempt: Callable[..., Any], make_context: ContextFactory, is_async: bool
) -> None:
    seen: list[TaskContext | None] = []

    def note_sync() -> None:
        seen.append(current_task())

    async def note_async() -> None:
        seen.append(current_task())

    context = make_context()
    await run_attempt(note_async if is_async else note_sync, context=context)

    assert seen == [context]
    assert current_task() is None


async def test_runner_cancel_request(
    runner: Runner,
    make_definition: DefinitionFactory,
    make_task_record: RecordFactory,
    make_context: ContextFactory,
) -> None:
    started = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.sleep(30)

    definition = make_definition(wait_forever)
    context = make_context()
    attempt = asyncio.create_task(runner.run(definition, make_task_record(definition), context))
    await started.wait()

    context.request_cancel()
    attempt.cancel()
    result = await attempt

    assert result.cancelled is True
    assert result.error is None


async def test_runner_outside_cancel_propagates(
    runner: Runner,
    make_definition: DefinitionFactory,
    make_task_record: RecordFactory,
    make_context: ContextFactory,
) -> None:
    started = asyncio.Event()

    async def wait_forever() -> None:
        started.set()
        await asyncio.sleep(30)

    definition = make_definition(wait_forever)
    attempt = asyncio.create_task(
        runner.run(definition, make_task_record(definition), make_context())
    )
    await started.wait()

    attempt.cancel()

    with pytest.raises(asyncio.CancelledError):
        await attempt


def make_result(error: BaseException | None = None, cancelled: bool = False) -> AttemptResult:
    return AttemptResult(
        duration=0.25,
        error=error,
        traceback=None if error is None else "Traceback ...",
        cancelled=cancelled,
    )


@pytest.fixture
def decide_for(
    make_definition: DefinitionFactory,
    make_task_record: RecordFactory,
    make_context: ContextFactory,
) -> Callable[..., AttemptOutcome]:
    """Return a function that decides the outcome of ``result`` at ``NOW``.

    It takes the attempt number, the delay scale, whether a cancel was requested, and retry
    options by keyword.
    """

    def decide(
        result: AttemptResult,
        attempt: int = 1,
        delay_scale: float = 1.0,
        cancel_requested: bool = False,
        **policy: Any,
    ) -> AttemptOutcome:
        definition = make_definition(double, **policy)
        record = make_task_record(definition, (1,), attempts=attempt)
        context = make_context(attempt=attempt, max_attempts=definition.policy.max_attempts)
        if cancel_requested:
            context.request_cancel()
        return decide_outcome(definition, record, result, context, NOW, delay_scale=delay_scale)

    return decide


def test_decide_outcome_success(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(make_result())

    assert outcome.status is TaskStatus.SUCCESS
    assert outcome.finished_at == NOW
    assert outcome.duration == 0.25
    assert outcome.scheduled_at is None
    assert outcome.error_type is None


def test_decide_outcome_retry_scheduled(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(
        make_result(ValueError("invalid address")),
        attempt=2,
        retries=3,
        delay=1.5,
        backoff=3.0,
    )

    assert outcome.status is TaskStatus.PENDING
    assert outcome.scheduled_at == NOW + timedelta(seconds=4.5)
    assert outcome.finished_at == NOW
    assert outcome.error_type == "ValueError"
    assert outcome.error_message == "invalid address"
    assert outcome.traceback == "Traceback ..."


def test_decide_outcome_qualified_error_type(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(make_result(RetryableError("busy")), retries=1)

    assert outcome.error_type == f"{__name__}.RetryableError"


def test_decide_outcome_retry_on_mismatch(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(
        make_result(ValueError("invalid address")), retries=3, retry_on=(RetryableError,)
    )

    assert outcome.status is TaskStatus.FAILED
    assert outcome.scheduled_at is None


def test_decide_outcome_retry_on_match(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(make_result(RetryableError("busy")), retries=3, retry_on=(RetryableError,))

    assert outcome.status is TaskStatus.PENDING


def test_decide_outcome_last_attempt(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(make_result(ValueError("invalid address")), attempt=3, retries=2)

    assert outcome.status is TaskStatus.FAILED
    assert outcome.error_message == "invalid address"


def test_decide_outcome_base_exception_not_retried(
    decide_for: Callable[..., AttemptOutcome],
) -> None:
    outcome = decide_for(make_result(KeyboardInterrupt()), retries=2)

    assert outcome.status is TaskStatus.FAILED
    assert outcome.error_type == "KeyboardInterrupt"


def test_decide_outcome_delay_scale_zero(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(
        make_result(ValueError("invalid address")), retries=2, delay=60.0, delay_scale=0
    )

    assert outcome.status is TaskStatus.PENDING
    assert outcome.scheduled_at == NOW


def test_decide_outcome_cancelled(decide_for: Callable[..., AttemptOutcome]) -> None:
    outcome = decide_for(make_result(cancelled=True), retries=2)

    assert outcome.status is TaskStatus.CANCELLED
    assert outcome.error_type == "Cancelled"
    assert outcome.finished_at == NOW


def test_decide_outcome_error_after_cancel(
    decide_for: Callable[..., AttemptOutcome],
) -> None:
    outcome = decide_for(make_result(ValueError("stopped")), retries=2, cancel_requested=True)

    assert outcome.status is TaskStatus.CANCELLED
    assert outcome.scheduled_at is None
    assert outcome.error_type == "ValueError"


def test_decide_outcome_success_after_cancel(
    decide_for: Callable[..., AttemptOutcome],
) -> None:
    outcome = decide_for(make_result(), cancel_requested=True)

    assert outcome.status is TaskStatus.SUCCESS
