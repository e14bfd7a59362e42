"""The signup example's FastAPI app: routes that add tracked tasks, and a webhook receiver."""

from __future__ import annotations

import os
from collections import deque
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from app_taskflow import IdempotencyConflictError, TaskflowRoute, TaskflowTasks
from examples.signup.tasks import build_report, call_webhook, send_email, taskflow

WEBHOOK_URL = os.environ.get("SIGNUP_WEBHOOK_URL", "http://127.0.0.1:8000/webhooks/signup")
"""The URL that ``call_webhook`` posts signup events to, by default this app's own receiver."""

app = FastAPI(title="app-taskflow signup example", lifespan=taskflow.lifespan)
taskflow.install(app)

received_events: deque[dict[str, Any]] = deque(maxlen=100)
"""The last events that the webhook receiver accepted, oldest first."""


@app.exception_handler(IdempotencyConflictError)
async def reject_idempotency_conflict(
    request: Request, error: IdempotencyConflictError
) -> JSONResponse:
    """Return 409 when a report is requested again with other arguments."""
    return JSONResponse(status_code=409, content={"detail": str(error)})


@app.post("/signup")
def signup(email: str, tasks: Annotated[TaskflowTasks, Depends()]) -> dict[str, str]:
    """Add the welcome email and the signup webhook, which both run after the response."""
    task_id = tasks.add_task(send_email, address=email)
    webhook_task_id = tasks.add_task(call_webhook, WEBHOOK_URL, {"event": "signup", "email": email})
    return {"task_id": task_id, "webhook_task_id": webhook_task_id}


@app.post("/reports/{report_id}")
async def request_report(
    report_id: str,
    tasks: Annotated[TaskflowTasks, Depends()],
    failure_rate: Annotated[float, Query(ge=0, le=1)] = 0.5,
) -> dict[str, str]:
    """Add the report task once per report id, so asking again returns the same task id.

    The key is released when the task ends FAILED, INTERRUPTED or CANCELLED, so a report
    that failed can be requested anew.
    """
    task_id = await tasks.add_task_async(
        build_report, report_id, failure_rate=failure_rate, idempotency_key=f"report:{report_id}"
    )
    return {"task_id": task_id}


# Routes of this router keep plain BackgroundTasks. TaskflowRoute tracks the task functions
# among them, but cannot return their ids.
newsletter = APIRouter(route_class=TaskflowRoute)


@newsletter.post("/newsletter")
def subscribe(email: str, background_tasks: BackgroundTasks) -> dict[str, str]:
    """Send the welcome email through ``BackgroundTasks``, tracked like any other task."""
    background_tasks.add_task(send_email, email)
    return {"status": "subscribed"}


app.include_router(newsletter)


@app.post("/webhooks/signup", status_code=204)
async def receive_signup_event(event: dict[str, Any]) -> None:
    """Accept a signup event, as the service on the other end of the webhook would."""
    received_events.append(event)


@app.get("/webhooks/signup")
async def list_signup_events() -> list[dict[str, Any]]:
    """Return the signup events received so far, oldest first."""
    return list(received_events)
