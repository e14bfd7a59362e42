"""REST routes: list, read, retry and cancel tasks, retry in bulk, and read metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app_taskflow.auth import check_same_origin
from app_taskflow.errors import TaskNotFoundError, TaskStateError
from app_taskflow.models import (
    MAX_TAGS,
    RETRYABLE_STATUSES,
    TAG_KEY_PATTERN,
    TaskMetrics,
    TaskPage,
    TaskQuery,
    TaskRecord,
    TaskStatus,
)

if TYPE_CHECKING:
    from app_taskflow.taskflow import Taskflow


class ErrorBody(BaseModel):
    """The JSON body of an error response."""

    detail: str


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No task has this id."}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The task's status does not allow it."}
}
_CROSS_SITE: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorBody,
        "description": "Rejected as possibly cross-site: send the X-Taskflow-Request header.",
    }
}


class BulkRetryResult(BaseModel):
    """The outcome of one call of ``POST /tasks/retry``."""

    retried: int = Field(description="Tasks queued again by this call.")
    skipped: int = Field(
        description=(
            "Matching tasks not queued again: their status changed meanwhile, or their "
            "idempotency key is now held by another task."
        )
    )
    next_cursor: str | None = Field(
        default=None,
        description="Pass as cursor to retry the next batch; null once every match was seen.",
    )


MAX_OFFSET = 1_000_000
"""Largest offset accepted; deeper pages are read with the cursor, which stays fast."""

_TAG_FILTER_HELP = "key:value; keep tasks with this tag. Repeat to require several tags."


def parse_tag_filters(filters: list[str] | None) -> dict[str, str] | None:
    """Return the ``tag`` query parameters (``key:value``) as a dict, or None without any.

    Raises:
        HTTPException: 422 for a parameter without a colon, with an invalid key, or that
            gives one key two different values.
    """
    if not filters:
        return None
    if len(filters) > MAX_TAGS:
        raise HTTPException(
            status_code=422,
            detail=f"Too many tag filters: {len(filters)}; a task has at most {MAX_TAGS} tags.",
        )
    tags: dict[str, str] = {}
    for item in filters:
        key, separator, value = item.partition(":")
        if not separator or not TAG_KEY_PATTERN.fullmatch(key):
            raise HTTPException(
                status_code=422,
                detail=(
                    f"Invalid tag filter {item!r}: write it as key:value, with a key of "
                    "letters, digits and _ . - that starts with a letter or underscore."
                ),
            )
        if tags.get(key, value) != value:
            raise HTTPException(
                status_code=422,
                detail=(
                    f"Tag filters {key}:{tags[key]} and {item} cannot both match: "
                    "a task has one value per tag key."
                ),
            )
        tags[key] = value
    return tags


async def store_unavailable_response(request: Request, error: Exception) -> JSONResponse:
    """Return a 503 response with a JSON body when the store cannot be reached."""
    return JSONResponse(
        status_code=503, content={"detail": str(error)}, headers={"Retry-After": "5"}
    )


def build_router(taskflow: Taskflow) -> APIRouter:
    """Return the router of the REST API, bound to ``taskflow``; every route needs its auth."""
    router = APIRouter(tags=["tasks"], dependencies=[Depends(taskflow.auth)])
    actions = [Depends(check_same_origin)]

    @router.get("", response_model=TaskPage, summary="List tasks, newest first by default")
    async def list_tasks(
        status: Annotated[
            list[TaskStatus] | None, Query(description="Keep tasks in these statuses.")
        ] = None,
        name: Annotated[str | None, Query(description="Keep tasks with this name.")] = None,
        tag: Annotated[list[str] | None, Query(description=_TAG_FILTER_HELP)] = None,
        search: Annotated[
            str | None,
            Query(
                max_length=200,
                description="Text in the id, name, arguments, error or a log message.",
            ),
        ] = None,
        order: Annotated[Literal["newest", "oldest"], Query()] = "newest",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        cursor: Annotated[
            str | None, Query(description="next_cursor of the previous page.")
        ] = None,
    ) -> TaskPage:
        query = TaskQuery(
            statuses=status,
            name=name,
            tags=parse_tag_filters(tag),
            search=search or None,
            order=order,
            limit=limit,
            offset=offset,
            cursor=cursor,
        )
        try:
            return await taskflow.store.list(query)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error

    @router.post(
        "/retry",
        response_model=BulkRetryResult,
        responses=_CROSS_SITE,
        dependencies=actions,
        summary="Run FAILED and INTERRUPTED tasks that match the filters again, in batches",
    )
    async def retry_tasks(
        status: Annotated[
            list[TaskStatus] | None,
            Query(description="FAILED, INTERRUPTED or both (the default); others match none."),
        ] = None,
        name: Annotated[str | None, Query(description="Keep tasks with this name.")] = None,
        tag: Annotated[list[str] | None, Query(description=_TAG_FILTER_HELP)] = None,
        search: Annotated[
            str | None, Query(max_length=200, description="As in GET /tasks.")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="Tasks handled per call.")] = 100,
        cursor: Annotated[
            str | None, Query(description="next_cursor of the previous call.")
        ] = None,
    ) -> BulkRetryResult:
        tags = parse_tag_filters(tag)
        statuses = [
            retryable
            for retryable in TaskStatus
            if retryable in RETRYABLE_STATUSES and (status is None or retryable in status)
        ]
        if not statuses:
            return BulkRetryResult(retried=0, skipped=0)
        # Oldest first with a cursor: tasks queued again leave the filter, so the cursor,
        # a position in creation order, still points at the next unseen match.
        query = TaskQuery(
            statuses=statuses,
            name=name,
            tags=tags,
            search=search or None,
            order="oldest",
            limit=limit,
            cursor=cursor,
        )
        try:
            page = await taskflow.store.list(query)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from error

        retried = skipped = 0
        for task in page.items:
            try:
                await taskflow.retry(task.id)
            except (TaskNotFoundError, TaskStateError):
                skipped += 1
            else:
                retried += 1
        return BulkRetryResult(retried=retried, skipped=skipped, next_cursor=page.next_cursor)

    @router.get("/metrics", response_model=TaskMetrics, summary="Counts, success rate, durations")
    async def read_metrics() -> TaskMetrics:
        return await taskflow.store.metrics()

    @router.get(
        "/{task_id}", response_model=TaskRecord, responses=_NOT_FOUND, summary="Read one task"
    )
    async def read_task(task_id: str) -> TaskRecord:
        record = await taskflow.store.get(task_id)
        if record is None:
            raise HTTPException(status_code=404, detail=f"No task has id {task_id!r}.")
        return record

    @router.post(
        "/{task_id}/retry",
        response_model=TaskRecord,
        responses={**_NOT_FOUND, **_CONFLICT, **_CROSS_SITE},
        dependencies=actions,
        summary="Run a FAILED or INTERRUPTED task again",
    )
    async def retry_task(task_id: str) -> TaskRecord:
        try:
            return await taskflow.retry(task_id)
        except TaskNotFoundError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        except TaskStateError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error

    @router.post(
        "/{task_id}/cancel",
        response_model=TaskRecord,
        responses={**_NOT_FOUND, **_CONFLICT, **_CROSS_SITE},
        dependencies=actions,
        summary="Cancel a PENDING task or ask a RUNNING one to stop",
    )
    async def cancel_task(task_id: str) -> TaskRecord:
        try:
            return await taskflow.cancel(task_id)
        except TaskNotFoundError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error
        except TaskStateError as error:
            raise HTTPException(status_code=409, detail=str(error)) from error

    return router
