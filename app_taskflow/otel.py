"""OpenTelemetry: a span per task attempt, linked to the span that was current at add_task.

Everything here is optional. Without ``opentelemetry-api`` (the ``[otel]`` extra), or while
no tracer provider is set up (``trace.set_tracer_provider`` of the SDK), no span is made
and no trace context is stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from app_taskflow.logs import log

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # The [otel] extra is not installed.
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from app_taskflow.models import TaskRecord

TRACER_NAME = "app_taskflow"
"""Name of the instrumentation scope of the attempt spans."""

SPAN_NAME_PREFIX = "taskflow.run "
"""Start of an attempt span's name; the task name follows."""

TAG_ATTRIBUTE_PREFIX = "taskflow.tag."
"""Start of the span attribute of each tag; the tag key follows."""

_TRACEPARENT = "traceparent"

_propagator = TraceContextTextMapPropagator() if trace is not None else None


def current_trace_parent() -> str | None:
    """Return the current span context as a W3C ``traceparent`` value.

    Returns ``None`` without ``opentelemetry-api``, and when no valid span is current
    (outside any trace, or with no tracer provider set up).
    """
    if trace is None or _propagator is None:
        return None
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(_TRACEPARENT)


class AttemptTracer:
    """Starts the span of each task attempt, when OpenTelemetry is installed and set up.

    The span is named ``taskflow.run <task name>``, has kind ``CONSUMER`` and the attributes
    ``taskflow.task.id``, ``taskflow.task.name``, ``taskflow.task.attempt``,
    ``taskflow.task.max_attempts`` and ``taskflow.tag.<key>`` per tag. It starts a new
    trace with a link to the task's ``trace_parent``, not a child span: the request that
    added the task has usually ended before the attempt starts.

    Args:
        tracer_provider: the provider of the tracer. By default the global provider is
            read at every attempt, so a provider set up after the app started is used.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._cached: tuple[TracerProvider, Tracer] | None = None

    @contextmanager
    def span(self, record: TaskRecord) -> Iterator[Span | None]:
        """Run the block in the attempt span of ``record``; yield None when there is none."""
        tracer = self._tracer()
        if tracer is None:
            yield None
            return

        attributes: dict[str, Any] = {
            "taskflow.task.id": record.id,
            "taskflow.task.name": record.name,
            "taskflow.task.attempt": record.attempts,
            "taskflow.task.max_attempts": record.max_attempts,
        }
        for key, value in record.tags.items():
            attributes[TAG_ATTRIBUTE_PREFIX + key] = value
        # An empty context makes the span a root: the dispatcher's asyncio tasks inherit the
        # context of the request that submitted them, whose span would otherwise be the parent.
        with tracer.start_as_current_span(
            SPAN_NAME_PREFIX + record.name,
            context=Context(),
            kind=trace.SpanKind.CONSUMER,
            links=_links(record.trace_parent),
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def _tracer(self) -> Tracer | None:
        if trace is None:
            return None
        provider = self._provider or trace.get_tracer_provider()
        # Without a provider set up, spans would be dropped anyway: skip their cost.
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        if self._cached is None or self._cached[0] is not provider:
            self._cached = (provider, provider.get_tracer(TRACER_NAME, _library_version()))
        return self._cached[1]


def end_attempt_span(span: Span | None, error: BaseException | None, cancelled: bool) -> None:
    """Record on ``span`` how the attempt ended: an error status, or a cancel attribute."""
    if span is None or trace is None or not span.is_recording():
        return
    if cancelled:
        span.set_attribute("taskflow.task.cancelled", True)
        return
    if error is None:
        return
    span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__qualname__))
    try:
        span.record_exception(error)
    except Exception as record_error:
        # The SDK calls str() of the error, which an error class may break.
        log.debug("Could not record {} on the attempt span: {}", type(error), record_error)


def _links(trace_parent: str | None) -> list[trace.Link]:
    if trace_parent is None or trace is None or _propagator is None:
        return []
    context = _propagator.extract({_TRACEPARENT: trace_parent})
    span_context = trace.get_current_span(context).get_span_context()
    if not span_context.is_valid:
        return []
    return [trace.Link(span_context)]


def _library_version() -> str | None:
    try:
        return version("app-taskflow")
    except PackageNotFoundError:
        return None
