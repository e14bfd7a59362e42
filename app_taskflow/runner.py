"""One attempt of a task: call the function, enforce its timeout, catch what it raises."""

from __future__ import annotations

import asyncio
import inspect
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from time import perf_counter
from typing import Any

from app_taskflow.context import LogLimits, TaskContext, set_current_task
from app_taskflow.logs import close_task_log, reset_task_tags, set_task_tags
from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus
from app_taskflow.otel import AttemptTracer, end_attempt_span
from app_taskflow.tasks import TaskDefinition
from app_taskflow.workers import WorkerPool


@dataclass
class AttemptResult:
    """The result of one attempt, before the retry policy is applied.

    Attributes:
        duration: seconds from the call to its return or failure.
        error: what the function raised, or ``None`` when it returned.
        traceback: the formatted traceback of ``error``.
        cancelled: the attempt ended because a cancel was requested.
    """

    duration: float
    error: BaseException | None = None
    traceback: str | None = None
    cancelled: bool = False


class Runner:
    """Runs attempts: async functions on the event loop, sync ones in the worker pool.

    Each attempt runs in the span that ``tracer`` starts, when OpenTelemetry is set up.
    """

    def __init__(
        self,
        pool: WorkerPool,
        log_limits: LogLimits | None = None,
        tracer: AttemptTracer | None = None,
    ) -> None:
        self._pool = pool
        self._log_limits = log_limits or LogLimits()
        self._tracer = tracer or AttemptTracer()

    async def run(
        self, definition: TaskDefinition[Any, Any], record: TaskRecord, context: TaskContext
    ) -> AttemptResult:
        """Run one attempt of ``record`` and return how it went.

        Every exception the function raises, ``BaseException`` subclasses included, is
        caught and returned. Only a cancellation of this coroutine from outside that is not
        a cancel request of the task (the app shutting down) propagates.

        The attempt's ``task_log()`` entries are capped by the runner's ``LogLimits``,
        counting the entries of earlier attempts listed in the claimed record's ``logs``.
        """
        context.limit_logs(self._log_limits, stored=len(record.logs))
        # Set in this coroutine's context, which the worker pool copies for a sync function.
        tags_token = set_task_tags(record.tags)
        try:
            with self._tracer.span(record) as span:
                try:
                    result = await self._run(definition, record, context)
                finally:
                    close_task_log(context)
                end_attempt_span(span, result.error, result.cancelled)
                return result
        finally:
            reset_task_tags(tags_token)

    async def _run(
        self, definition: TaskDefinition[Any, Any], record: TaskRecord, context: TaskContext
    ) -> AttemptResult:
        started = perf_counter()
        try:
            args, kwargs = definition.codec.decode(record.args, record.kwargs)
            if definition.is_async:
                return await self._run_async(definition, context, args, kwargs, started)
            return await self._run_sync(definition, context, args, kwargs, started)
        except asyncio.CancelledError as error:
            task = asyncio.current_task()
            if context.cancel_requested:
                if task is not None:
                    task.uncancel()  # The cancel was for the task function, and it is done.
                return AttemptResult(duration=perf_counter() - started, cancelled=True)
            if task is not None and task.cancelling():
                raise
            # The task function raised CancelledError itself: an ordinary failure.
            return _failure(error, started)
        except BaseException as error:
            return _failure(error, started)

    async def _run_async(
        self,
        definition: TaskDefinition[Any, Any],
        context: TaskContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        started: float,
    ) -> AttemptResult:
        set_current_task(context)
        deadline = asyncio.timeout(definition.policy.timeout)
        try:
            async with deadline:
                await definition.func(*args, **kwargs)
        except TimeoutError as error:
            if deadline.expired() and not error.args:
                error.args = (
                    f"The attempt did not finish within {definition.policy.timeout} s and was "
                    "cancelled.",
                )
            raise
        finally:
            set_current_task(None)
        return AttemptResult(duration=perf_counter() - started)

    async def _run_sync(
        self,
        definition: TaskDefinition[Any, Any],
        context: TaskContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        started: float,
    ) -> AttemptResult:
        await self._pool.acquire()
        try:
            future = self._pool.submit(_call_in_context, context, definition.func, args, kwargs)
        except BaseException:
            self._pool.release()
            raise

        # The timeout counts from the moment a thread is free, not from the claim.
        started = perf_counter()
        try:
            succeeded, value = await asyncio.wait_for(future, definition.policy.timeout)
        except TimeoutError as error:
            error.args = (
                f"The attempt did not finish within {definition.policy.timeout} s; its "
                "thread keeps running until the function returns.",
            )
            return _failure(error, started)
        if not succeeded:
            return _failure(value, started)
        return AttemptResult(duration=perf_counter() - started)


def _call_in_context(
    context: TaskContext, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    set_current_task(context)
    result = func(*args, **kwargs)
    _check_sync_result(result)
    return result


def _failure(error: BaseException, started: float) -> AttemptResult:
    return AttemptResult(
        duration=perf_counter() - started, error=error, traceback=format_user_traceback(error)
    )


_PACKAGE_DIR = str(Path(__file__).resolve().parent)

_ASYNC_RESULT_HINT = (
    "The sync task function returned {kind} instead of running its work: declare the "
    "task on the async def function itself, not on a sync wrapper or a generator."
)


def _check_sync_result(result: Any) -> None:
    """Raise TypeError when a sync task function returned work it did not run."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # Avoid "coroutine was never awaited" on top of the error.
        raise TypeError(_ASYNC_RESULT_HINT.format(kind="an awaitable"))
    if inspect.isgenerator(result) or inspect.isasyncgen(result):
        raise TypeError(_ASYNC_RESULT_HINT.format(kind="a generator"))


def format_user_traceback(error: BaseException) -> str:
    """Format ``error`` with its traceback, leaving out the library's own outer frames."""
    frames = error.__traceback__
    while frames is not None and frames.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frames = frames.tb_next
    # An error raised inside the library itself keeps its full traceback.
    shown = frames if frames is not None else error.__traceback__
    return "".join(traceback.format_exception(type(error), error, shown))


def decide_outcome(
    definition: TaskDefinition[Any, Any],
    record: TaskRecord,
    result: AttemptResult,
    context: TaskContext,
    now: datetime,
    delay_scale: float = 1.0,
) -> AttemptOutcome:
    """Turn an attempt's result into the outcome to store, applying the retry policy.

    A failure after a cancel request ends the task as ``CANCELLED`` without retry.
    ``delay_scale`` multiplies every retry delay (0 in tests makes retries immediate).
    """
    if result.cancelled:
        return AttemptOutcome(
            status=TaskStatus.CANCELLED,
            finished_at=now,
            duration=result.duration,
            error_type="Cancelled",
            error_message="The task was cancelled while it ran.",
        )
    if result.error is None:
        # NOTE: a sync function cannot be stopped in its thread. One that returns normally
        # after a cancel request has done its work, so it ends as SUCCESS, not CANCELLED.
        return AttemptOutcome(status=TaskStatus.SUCCESS, finished_at=now, duration=result.duration)

    error = result.error
    error_fields: dict[str, Any] = {
        "finished_at": now,
        "duration": result.duration,
        "error_type": _qualified_type(error),
        "error_message": safe_text(_describe(error), MAX_ERROR_MESSAGE_CHARS),
        "traceback": safe_text(result.traceback or "", MAX_TRACEBACK_CHARS) or None,
    }
    if context.cancel_requested:
        return AttemptOutcome(status=TaskStatus.CANCELLED, **error_fields)

    policy = definition.policy
    # A manual retry raises max_attempts past the policy's count, so the budget comes from
    # the record, and the backoff starts over with the first attempt of that retry.
    attempt_in_run = max(1, record.attempts - (record.max_attempts - policy.max_attempts))
    if record.attempts < record.max_attempts and isinstance(error, policy.retry_on):
        delay = policy.delay_after(attempt_in_run) * delay_scale
        return AttemptOutcome(
            status=TaskStatus.PENDING, scheduled_at=now + timedelta(seconds=delay), **error_fields
        )
    return AttemptOutcome(status=TaskStatus.FAILED, **error_fields)


MAX_ERROR_MESSAGE_CHARS = 4_000
MAX_TRACEBACK_CHARS = 64_000


def safe_text(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters and encodable as UTF-8.

    Lone surrogates (as in file names that ``os.listdir`` decoded with surrogate escapes)
    become backslash escapes, because no store or JSON response can hold them.
    """
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters cut]"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(error: BaseException) -> str:
    try:
        message = str(error)
    except Exception as str_error:  # An error class whose __str__ itself raises.
        message = f"<str() of the error raised {type(str_error).__name__}>"
    return message


def _qualified_type(error: BaseException) -> str:
    error_type = type(error)
    if error_type.__module__ in ("builtins", "__main__"):
        return error_type.__qualname__
    return f"{error_type.__module__}.{error_type.__qualname__}"
