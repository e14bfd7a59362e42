"""One attempt of a task: call the function, enforce its timeout, catch what it raises."""

from __future__ import annotations

import asyncio
import traceback
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from time import perf_counter
from typing import Any

from app_taskflow.context import TaskContext, set_current_task
from app_taskflow.models import AttemptOutcome, TaskRecord, TaskStatus
from app_taskflow.tasks import TaskDefinition
from app_taskflow.workers import WorkerPool


@dataclass
class AttemptResult:
    """What happened in one attempt, before the retry policy is applied.

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
    """Runs attempts: async functions on the event loop, sync ones in the worker pool."""

    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    async def run(
        self, definition: TaskDefinition[Any, Any], record: TaskRecord, context: TaskContext
    ) -> AttemptResult:
        """Run one attempt of ``record`` and return how it went.

        Every exception the function raises, ``BaseException`` subclasses included, is
        caught and returned. Only a cancellation of this coroutine from outside that is not
        a cancel request of the task (the app shutting down) propagates.
        """
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
        try:
            async with asyncio.timeout(definition.policy.timeout):
                await definition.func(*args, **kwargs)
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
    return func(*args, **kwargs)


def _failure(error: BaseException, started: float) -> AttemptResult:
    return AttemptResult(
        duration=perf_counter() - started, error=error, traceback=format_user_traceback(error)
    )


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


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
        "error_message": str(error),
        "traceback": result.traceback,
    }
    if context.cancel_requested:
        return AttemptOutcome(status=TaskStatus.CANCELLED, **error_fields)
    if definition.policy.should_retry(error, record.attempts):
        delay = definition.policy.delay_after(record.attempts) * delay_scale
        return AttemptOutcome(
            status=TaskStatus.PENDING, scheduled_at=now + timedelta(seconds=delay), **error_fields
        )
    return AttemptOutcome(status=TaskStatus.FAILED, **error_fields)


def _qualified_type(error: BaseException) -> str:
    error_type = type(error)
    if error_type.__module__ in ("builtins", "__main__"):
        return error_type.__qualname__
    return f"{error_type.__module__}.{error_type.__qualname__}"
