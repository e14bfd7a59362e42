"""The Prometheus exporter: task metrics of one taskflow in the text exposition format.

Needs the optional ``prometheus-client`` package (``pip install 'app-taskflow[prometheus]'``).
Every taskflow has a ``CollectorRegistry`` of its own, never the global default registry,
so two apps in one process export separate metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app_taskflow.errors import MissingExtraError
from app_taskflow.models import TaskStatus
from app_taskflow.timeline import TaskTransition

if TYPE_CHECKING:
    from fastapi import APIRouter

    from app_taskflow.taskflow import Taskflow

INSTALL_COMMAND = "pip install 'app-taskflow[prometheus]'"

PREFIX = "app_taskflow"
"""Prefix of every metric name."""

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
"""Upper bounds in seconds of the attempt duration histogram's buckets (+Inf is added)."""

UNKNOWN_NAME = "unknown"
"""``name`` label of a task recovered by id whose name the instance does not know."""

_FINAL_EVENTS = {
    "succeeded": TaskStatus.SUCCESS,
    "failed": TaskStatus.FAILED,
    "cancelled": TaskStatus.CANCELLED,
    "interrupted": TaskStatus.INTERRUPTED,
}


def _import_client() -> Any:
    try:
        import prometheus_client
    except ImportError as error:
        raise MissingExtraError(
            "metrics.prometheus is enabled, but the prometheus-client package is not "
            f"installed. Install it with: {INSTALL_COMMAND}, or set metrics.prometheus "
            "to false."
        ) from error
    return prometheus_client


class PrometheusExporter:
    """Counts the task transitions of one taskflow and renders them for Prometheus.

    Counters and the histogram are fed by the taskflow's ``TaskTimeline`` and count what
    this instance did; gauges are read when Prometheus scrapes. Every metric has an
    ``instance`` label with the taskflow's instance id.

    Metrics:
        ``app_taskflow_tasks_total{instance,name,status}``: tasks that reached a final
        status (SUCCESS, FAILED, CANCELLED, INTERRUPTED) through this instance.
        ``app_taskflow_attempts_total{instance,name}``: attempts started.
        ``app_taskflow_retries_total{instance,name}``: failed attempts that a retry follows.
        ``app_taskflow_attempt_duration_seconds{instance,name}``: a histogram of the
        duration of every attempt that ran to its end.
        ``app_taskflow_tasks_running{instance}``: tasks this instance is running now.
        ``app_taskflow_tasks_pending{instance,name}``: PENDING tasks in the whole store,
        read from the store's metrics; every instance sharing a store reports the same.

    NOTE: the counters live in the memory of one process. Behind a server with several
    worker processes on one port, each scrape returns the counters of the worker that
    responded, because prometheus-client's multiprocess mode is not set up.

    Raises:
        MissingExtraError: ``prometheus-client`` is not installed.
    """

    def __init__(self) -> None:
        client = _import_client()
        self.content_type: str = client.CONTENT_TYPE_LATEST
        self.registry = client.CollectorRegistry(auto_describe=True)
        self._generate_latest: Callable[[Any], bytes] = client.generate_latest
        self._running_count: Callable[[], int] = lambda: 0
        self._instance_id = ""

        self.tasks = client.Counter(
            f"{PREFIX}_tasks",
            "Tasks that reached a final status through this instance.",
            ["instance", "name", "status"],
            registry=self.registry,
        )
        self.attempts = client.Counter(
            f"{PREFIX}_attempts",
            "Attempts started by this instance.",
            ["instance", "name"],
            registry=self.registry,
        )
        self.retries = client.Counter(
            f"{PREFIX}_retries",
            "Failed attempts of this instance that another attempt follows.",
            ["instance", "name"],
            registry=self.registry,
        )
        self.duration = client.Histogram(
            f"{PREFIX}_attempt_duration_seconds",
            "Seconds taken by the attempts this instance ran to their end.",
            ["instance", "name"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.running = client.Gauge(
            f"{PREFIX}_tasks_running",
            "Tasks this instance is running now, claims in progress included.",
            ["instance"],
            registry=self.registry,
        )
        self.pending = client.Gauge(
            f"{PREFIX}_tasks_pending",
            "PENDING tasks in the whole store, waiting retries included.",
            ["instance", "name"],
            registry=self.registry,
        )

    def attach(self, instance_id: str, running_count: Callable[[], int]) -> None:
        """Read the running gauge from ``running_count`` and label it with ``instance_id``.

        The taskflow calls it at every start, since each start has a new instance id.
        """
        self._instance_id = instance_id
        self._running_count = running_count

    def observe(self, transition: TaskTransition) -> None:
        """Count one transition; a ``TaskTimeline`` listener."""
        instance = transition.instance_id
        name = transition.task_name or UNKNOWN_NAME
        if transition.event == "started":
            self.attempts.labels(instance, name).inc()
        elif transition.event == "retrying":
            self.retries.labels(instance, name).inc()
        status = _FINAL_EVENTS.get(transition.event)
        if status is not None:
            self.tasks.labels(instance, name, status.value).inc()
        if transition.duration is not None:
            self.duration.labels(instance, name).observe(transition.duration)

    def render(self, pending_by_name: dict[str, int]) -> bytes:
        """Set the gauges and return every metric in the text exposition format."""
        self.running.clear()
        self.running.labels(self._instance_id).set(self._running_count())
        # A name no longer in the store (its tasks pruned) must disappear, not keep its
        # last value.
        self.pending.clear()
        for name, count in pending_by_name.items():
            self.pending.labels(self._instance_id, name).set(count)
        return self._generate_latest(self.registry)

    def build_router(self, taskflow: Taskflow) -> APIRouter:
        """Return the router of ``GET /metrics/prometheus``, mounted under the API prefix.

        The route requires the taskflow's ``auth`` dependency, like the REST API, so a
        Prometheus scrape job sends the same Basic credentials or bearer token.
        """
        from fastapi import APIRouter, Depends, Response

        router = APIRouter(tags=["tasks"], dependencies=[Depends(taskflow.auth)])

        @router.get(
            "/metrics/prometheus",
            response_class=Response,
            summary="Task metrics in the Prometheus text exposition format",
            responses={200: {"content": {self.content_type: {}}}},
        )
        async def read_prometheus_metrics() -> Response:
            metrics = await taskflow.store.metrics()
            pending = {
                name: by_name.counts.get(TaskStatus.PENDING, 0)
                for name, by_name in metrics.by_name.items()
            }
            return Response(self.render(pending), media_type=self.content_type)

        return router
