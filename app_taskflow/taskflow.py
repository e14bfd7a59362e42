"""Taskflow: the object an app declares tasks on, installs, and starts in its lifespan."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from app_taskflow.context import LogLimits
from app_taskflow.dispatcher import Dispatcher, DispatcherSettings, new_instance_id
from app_taskflow.errors import (
    StoreUnavailableError,
    TaskArgumentError,
    TaskDefinitionError,
    TaskflowError,
)
from app_taskflow.logfile import TaskLogFile, TaskLogFileOptions
from app_taskflow.logs import start_stdlib_forwarding, stop_stdlib_forwarding
from app_taskflow.models import (
    MAX_TAG_VALUE_CHARS,
    MAX_TAGS,
    TAG_KEY_PATTERN,
    TaskOrigin,
    TaskRecord,
    TaskStatus,
    new_task_id,
    utcnow,
)
from app_taskflow.otel import AttemptTracer, current_trace_parent
from app_taskflow.runner import Runner
from app_taskflow.stores.base import TaskStore
from app_taskflow.tasks import RetryPolicy, TaskDefinition, TaskRegistry, default_task_name
from app_taskflow.workers import WorkerPool

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.trace import TracerProvider

    from app_taskflow.dashboard.hub import DashboardHub, DashboardSettings
    from app_taskflow.prometheus import PrometheusExporter

P = ParamSpec("P")
R = TypeVar("R")


class Taskflow:
    """Declares tasks, stores and runs them, and plugs the REST API into an app.

    Built by ``TaskflowContainer.taskflow()``. The store is created when the app starts
    (in ``lifespan``), so a test can override the container's ``store`` provider after
    importing the app.
    """

    def __init__(
        self,
        store_factory: Callable[[], TaskStore],
        default_policy: RetryPolicy | None = None,
        settings: DispatcherSettings | None = None,
        api_prefix: str = "/tasks",
        clock: Callable[[], datetime] = utcnow,
        auth_factory: Callable[[], Callable[..., Any]] | None = None,
        log_limits: LogLimits | None = None,
        log_file: TaskLogFileOptions | None = None,
        stdlib_logging: bool = False,
        prometheus: bool = False,
        request_id_header: str | None = "X-Request-ID",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.registry = TaskRegistry()
        self.default_policy = default_policy or RetryPolicy()
        self.settings = settings or DispatcherSettings()
        self.api_prefix = api_prefix
        self.instance_id = new_instance_id()
        self._store_factory = store_factory
        self._clock = clock
        self._dispatcher: Dispatcher | None = None
        self._pool: WorkerPool | None = None
        self._auth_factory = auth_factory
        self.dashboard_hub: DashboardHub | None = None
        """The dashboard's event hub, created by ``install()``."""
        self.log_limits = log_limits or LogLimits()
        self.log_file = TaskLogFile(log_file) if log_file is not None else None
        """The task log file sink, added at start and removed at stop; None when not set."""
        self.stdlib_logging = stdlib_logging
        self.prometheus: PrometheusExporter | None = None
        """The Prometheus exporter when ``metrics.prometheus`` is on."""
        if prometheus:
            from app_taskflow.prometheus import PrometheusExporter

            self.prometheus = PrometheusExporter()
        self.request_id_header = request_id_header
        """The request header whose value a task's ``origin.request_id`` takes; None for none."""
        self.tracer = AttemptTracer(tracer_provider)
        """Starts the OpenTelemetry span of each attempt; the global provider by default."""

    @overload
    def task(self, func: Callable[P, R], /) -> TaskDefinition[P, R]: ...

    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        delay: float | None = None,
        backoff: float | None = None,
        max_delay: float | None = None,
        jitter: float | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        requeue_on_interrupt: bool = False,
    ) -> Callable[[Callable[P, R]], TaskDefinition[P, R]]: ...

    def task(
        self,
        func: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retries: int | None = None,
        delay: float | None = None,
        backoff: float | None = None,
        max_delay: float | None = None,
        jitter: float | None = None,
        retry_on: tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        requeue_on_interrupt: bool = False,
    ) -> Any:
        """Declare a sync or async function as a task, with ``@taskflow.task(...)``.

        Options left out take the defaults from the container's ``retry`` configuration.

        Args:
            name: registered name; defaults to the module and qualified name.
            retries: attempts allowed after the first one.
            delay: seconds before the first retry.
            backoff: factor applied to the delay for each later retry.
            max_delay: upper bound in seconds of any retry delay.
            jitter: fraction of the delay added or removed at random.
            retry_on: exception types that are retried; others fail the task at once.
            timeout: seconds an attempt may run before it fails.
            requeue_on_interrupt: run the task again, rather than mark it INTERRUPTED,
                when its instance stops while it runs. Only for tasks safe to repeat.

        Raises:
            TaskDefinitionError: an option is invalid or the name is already taken.
        """
        overrides = {
            key: value
            for key, value in {
                "retries": retries,
                "delay": delay,
                "backoff": backoff,
                "max_delay": max_delay,
                "jitter": jitter,
                "retry_on": retry_on,
                "timeout": timeout,
            }.items()
            if value is not None
        }

        if func is not None and not callable(func):
            raise TaskDefinitionError(
                f"@taskflow.task({func!r}) got a {type(func).__name__} where a function was "
                f"expected; to name the task, write @taskflow.task(name={func!r})."
            )
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise TaskDefinitionError(
                f"Invalid task name {name!r}: expected a non-empty string, or leave name out "
                "to use the function's module and qualified name."
            )

        def decorate(function: Callable[..., Any]) -> Any:
            if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
                raise TaskDefinitionError(
                    f"{getattr(function, '__qualname__', function)!r} is a generator function, "
                    "which cannot be a task because calling it runs none of its body; make "
                    "it a plain def or async def function."
                )
            definition: TaskDefinition[Any, Any] = TaskDefinition(
                function,
                name=name or default_task_name(function),
                policy=self.default_policy.replace(**overrides),
                requeue_on_interrupt=requeue_on_interrupt,
            )
            self.registry.register(definition)
            return definition

        return decorate if func is None else decorate(func)

    def now(self) -> datetime:
        """Return the current time from the taskflow's clock."""
        return self._clock()

    @property
    def started(self) -> bool:
        """Whether the app's lifespan has started the taskflow."""
        return self._dispatcher is not None

    @property
    def auth(self) -> Callable[..., Any]:
        """The FastAPI dependency that ``install()`` puts on the REST API and dashboard."""
        from app_taskflow.auth import no_auth

        return no_auth if self._auth_factory is None else self._auth_factory()

    @property
    def store(self) -> TaskStore:
        """The store in use; available once started."""
        return self.dispatcher.store

    @property
    def dispatcher(self) -> Dispatcher:
        """The dispatcher in use; available once started."""
        if self._dispatcher is None:
            raise TaskflowError(
                "The taskflow is not started: create the app with "
                "FastAPI(lifespan=taskflow.lifespan), or enter taskflow.lifespan(app) "
                "from your own lifespan."
            )
        return self._dispatcher

    @asynccontextmanager
    async def lifespan(self, app: FastAPI | None = None) -> AsyncIterator[None]:
        """Open the store and run tasks while the app runs; hand tasks back at shutdown."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        """Open the store and start the dispatcher. ``lifespan`` calls this."""
        if self._dispatcher is not None:
            raise TaskflowError("The taskflow is already started; enter its lifespan once per app.")
        # Chosen at start, not at import: servers that import the app once and then fork
        # their workers would otherwise give every worker the same id and lease.
        self.instance_id = new_instance_id()
        self._start_sinks()
        try:
            store = self._store_factory()
            await store.open()
            pool = WorkerPool(self.settings.sync_workers)
            runner = Runner(pool, self.log_limits, self.tracer)
            dispatcher = Dispatcher(
                store, self.registry, runner, self.settings, self.instance_id, self._clock
            )
            if self.prometheus is not None:
                self.prometheus.attach(self.instance_id, lambda: dispatcher.running_count)
                dispatcher.timeline.listeners.append(self.prometheus.observe)
            await dispatcher.start()
        except BaseException:
            self._stop_sinks()
            raise
        self._pool = pool
        self._dispatcher = dispatcher

    async def stop(self) -> None:
        """Stop the dispatcher and close the store. ``lifespan`` calls this."""
        dispatcher = self._dispatcher
        if dispatcher is None:
            return
        try:
            if self.dashboard_hub is not None:
                await self.dashboard_hub.close()
            await dispatcher.stop()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            # Before closing the store, whose failure would otherwise leave the sinks added.
            self._stop_sinks()
            await dispatcher.store.close()
            self._dispatcher = None

    def _start_sinks(self) -> None:
        # Only the sinks the configuration sets. Loguru's default stderr sink belongs to
        # the app, which keeps or removes it.
        if self.log_file is not None:
            self.log_file.start(self.instance_id)
        if self.stdlib_logging:
            try:
                start_stdlib_forwarding()
            except BaseException:
                if self.log_file is not None:
                    self.log_file.stop()
                raise

    def _stop_sinks(self) -> None:
        if self.stdlib_logging:
            stop_stdlib_forwarding()
        if self.log_file is not None:
            self.log_file.stop()

    def install(self, app: FastAPI, *, dashboard: bool | DashboardSettings = True) -> None:
        """Add the REST API and the dashboard under ``api_prefix``, and the middleware.

        The middleware writes the tasks a request added to the store before the response
        starts, and hands them to the dispatcher once the response is sent. Every route
        requires the ``auth`` dependency, and every route that changes a task also rejects
        cross-site requests.

        Args:
            dashboard: ``False`` leaves out the dashboard (``<api_prefix>/dashboard``);
                a ``DashboardSettings`` changes the timings of its event stream.
        """
        from app_taskflow.api.router import build_router, store_unavailable_response
        from app_taskflow.dashboard.hub import DashboardHub, DashboardSettings
        from app_taskflow.dashboard.router import build_dashboard_router
        from app_taskflow.middleware import TaskflowMiddleware

        app.add_middleware(TaskflowMiddleware, taskflow=self)
        if dashboard is not False:
            if self.dashboard_hub is None:
                settings = dashboard if isinstance(dashboard, DashboardSettings) else None
                self.dashboard_hub = DashboardHub(lambda: self.store, settings)
            # Before the REST API, whose GET /{task_id} would take "dashboard" for an id.
            dashboard_router = build_dashboard_router(self, self.dashboard_hub)
            app.include_router(dashboard_router, prefix=self.api_prefix)
        if self.prometheus is not None:
            app.include_router(self.prometheus.build_router(self), prefix=self.api_prefix)
        app.include_router(build_router(self), prefix=self.api_prefix)
        # A route that reads the store during an outage returns 503, not a bare 500.
        app.add_exception_handler(StoreUnavailableError, store_unavailable_response)

    def build_record(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        origin: TaskOrigin | None = None,
    ) -> TaskRecord:
        """Check a call of task ``func`` and return its new PENDING record, not yet stored.

        The record keeps the OpenTelemetry span context that is current, if any, as its
        ``trace_parent``.

        Raises:
            NotATaskError: ``func`` is not a task of this taskflow.
            TaskArgumentError: an argument cannot be stored and restored with its type, or
                a tag key or value is invalid.
            TypeError: ``idempotency_key`` or ``tags`` has the wrong type.
        """
        definition = self.registry.resolve(func)
        encoded_args, encoded_kwargs = definition.codec.encode(args, kwargs)
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str) and idempotency_key
        ):
            raise TypeError(
                f"Invalid idempotency_key {idempotency_key!r}: expected a non-empty string."
            )
        return TaskRecord(
            id=new_task_id(),
            name=definition.name,
            status=TaskStatus.PENDING,
            args=encoded_args,
            kwargs=encoded_kwargs,
            max_attempts=definition.policy.max_attempts,
            created_at=self._clock(),
            owner=self.instance_id,
            idempotency_key=idempotency_key,
            requeue_on_interrupt=definition.requeue_on_interrupt,
            tags=check_tags(tags),
            origin=origin,
            trace_parent=current_trace_parent(),
        )

    async def add_task(
        self,
        func: Callable[..., Any],
        /,
        *args: Any,
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> str:
        """Store a task and start it now, outside any request (for example from a task).

        Takes ``idempotency_key`` and ``tags`` as ``TaskflowTasks.add_task`` does; the
        task has no ``origin``.

        Returns:
            The task id; with an ``idempotency_key`` already held, the existing task's id.
        """
        record = self.build_record(func, args, kwargs, idempotency_key, tags)
        [task_id] = await self.store.create([record])
        if task_id == record.id:
            self.dispatcher.timeline.added([record])
            self.dispatcher.submit(task_id, record.name)
        return task_id

    async def retry(self, task_id: str) -> TaskRecord:
        """Queue a FAILED or INTERRUPTED task again, with its full retry budget.

        Raises:
            TaskNotFoundError: no task has this id.
            TaskStateError: the task is not FAILED or INTERRUPTED.
        """
        current = await self.store.get(task_id)
        definition = None if current is None else self.registry.get(current.name)
        extra_attempts = definition.policy.max_attempts if definition else 1
        record = await self.store.retry(task_id, self._clock(), extra_attempts)
        self.dispatcher.timeline.queued_by_request(record)
        self.dispatcher.submit(task_id, record.name)
        return record

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a PENDING task, or ask a RUNNING one to stop.

        Raises:
            TaskNotFoundError: no task has this id.
            TaskStateError: the task has already finished.
        """
        record = await self.store.cancel(task_id, self._clock())
        if record.status is TaskStatus.CANCELLED:
            self.dispatcher.timeline.cancelled(record)
        else:
            self.dispatcher.timeline.stop_requested(record)
            self.dispatcher.request_cancel(task_id)
        return record


def check_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``tags`` as a new dict after checking them; ``None`` gives an empty dict.

    Raises:
        TypeError: ``tags`` is not a mapping, or a key or value is not a string.
        TaskArgumentError: a key does not match ``TAG_KEY_PATTERN``, a value is longer than
            ``MAX_TAG_VALUE_CHARS``, or there are more than ``MAX_TAGS`` tags.
    """
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise TypeError(
            f"Invalid tags {tags!r}: expected a dict of strings to strings, such as "
            '{"user_id": "42"}.'
        )
    if len(tags) > MAX_TAGS:
        raise TaskArgumentError(
            f"Too many tags: {len(tags)} were given and a task takes at most {MAX_TAGS}."
        )
    checked: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(key, str):
            raise TypeError(f"Invalid tag key {key!r}: expected a string.")
        if not TAG_KEY_PATTERN.fullmatch(key):
            raise TaskArgumentError(
                f"Invalid tag key {key!r}: a key starts with a letter or underscore, has "
                "at most 64 characters, and contains only letters, digits and _ . -"
            )
        if not isinstance(value, str):
            raise TypeError(
                f"Invalid value {value!r} of tag {key!r}: expected a string; convert it "
                f"first, as in str({value!r})."
            )
        if len(value) > MAX_TAG_VALUE_CHARS:
            raise TaskArgumentError(
                f"Invalid value of tag {key!r}: it has {len(value)} characters, and a tag "
                f"value has at most {MAX_TAG_VALUE_CHARS}."
            )
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                raise TaskArgumentError(
                    f"Invalid value {value!r} of tag {key!r}: it contains a lone surrogate, "
                    "which no store can hold; decode the text with errors='replace'."
                ) from error
        checked[key] = value
    return checked
