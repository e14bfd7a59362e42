"""REST routes: list, read, retry and cancel tasks, and read metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel

from app_taskflow.errors import TaskNotFoundError, TaskStateError
from app_taskflow.models import TaskMetrics, TaskPage, TaskQuery, TaskRecord, TaskStatus

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


def build_router(taskflow: Taskflow) -> APIRouter:
    """Return the router of the REST API, bound to ``taskflow``."""
    router = APIRouter(tags=["tasks"])

    @router.get("", response_model=TaskPage, summary="List tasks, newest first by default")
    async def list_tasks(
        status: Annotated[
            list[TaskStatus] | None, Query(description="Keep tasks in these statuses.")
        ] = None,
        name: Annotated[str | None, Query(description="Keep tasks with this name.")] = None,
        search: Annotated[
            str | None,
            Query(
                max_length=200,
                description="Text in the id, name, arguments, error or a log message.",
            ),
        ] = None,
        order: Annotated[Literal["newest", "oldest"], Query()] = "newest",
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        cursor: Annotated[
            str | None, Query(description="next_cursor of the previous page.")
        ] = None,
    ) -> TaskPage:
        query = TaskQuery(
            statuses=status,
            name=name,
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
        responses={**_NOT_FOUND, **_CONFLICT},
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
        responses={**_NOT_FOUND, **_CONFLICT},
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
