"""The app that the end-to-end tests serve with uvicorn, with one route per kind of task.

Started as ``python -m uvicorn tests.e2e.app:app`` with ``APP_TASKFLOW_ENV`` and
``APP_TASKFLOW_CONTAINERS`` naming the configuration file that a test wrote. Tasks report
what they did through files whose paths the test passes in, so that the test process can
count runs across server processes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app_taskflow import TaskflowContainer, TaskflowTasks, current_task, task_log

container = TaskflowContainer.from_environment()
taskflow = container.taskflow()
app = FastAPI(lifespan=taskflow.lifespan)
taskflow.install(app)


Tasks = Annotated[TaskflowTasks, Depends()]


class Item(BaseModel):
    """A pydantic model passed to a task as an argument."""

    sku: str
    quantity: int


class TypedArguments(BaseModel):
    """The request body of ``POST /typed``: one value of each type that JSON lacks."""

    when: datetime
    ident: UUID
    amount: Decimal
    pair: tuple[int, str]
    item: Item


def append_line(path: str, line: str) -> None:
    """Append one line to ``path`` in a single ``O_APPEND`` write, safe across processes."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{line}\n".encode())
    finally:
        os.close(descriptor)


def running_task_id() -> str:
    context = current_task()
    assert context is not None, "called outside a task"
    return context.task_id


def wait_for_gate(gate: str, limit: float) -> None:
    """Block while the file ``gate`` exists, for at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@taskflow.task(name="quick")
def quick(label: str) -> None:
    task_log(f"quick task {label} ran")


@taskflow.task(name="record")
def record(run_file: str) -> None:
    append_line(run_file, running_task_id())


@taskflow.task(name="hold")
def hold(gate: str, limit: float) -> None:
    task_log("holding until the gate file is removed")
    wait_for_gate(gate, limit)


@taskflow.task(name="hold_requeued", requeue_on_interrupt=True)
def hold_requeued(gate: str, limit: float) -> None:
    task_log("holding until the gate file is removed")
    wait_for_gate(gate, limit)


@taskflow.task(name="fail", retries=2, delay=0.05, backoff=2.0, jitter=0.0)
def fail(label: str) -> None:
    context = current_task()
    assert context is not None
    task_log(f"attempt {context.attempt} of {label}", level="warning")
    raise ValueError(f"invalid label {label!r}")


@taskflow.task(name="flaky", retries=1, delay=1.0, jitter=0.0)
def flaky(label: str) -> None:
    # Fails once, so that its retry is claimed one second after the first attempt ended.
    context = current_task()
    assert context is not None
    if context.attempt == 1:
        raise RuntimeError(f"first attempt of {label} failed on purpose")


@taskflow.task(name="keyed")
def keyed(run_file: str) -> None:
    append_line(run_file, running_task_id())


@taskflow.task(name="typed")
def typed(
    out_file: str, when: datetime, ident: UUID, amount: Decimal, pair: tuple[int, str], item: Item
) -> None:
    offset = when.utcoffset()
    received: dict[str, Any] = {
        "when": {"type": type(when).__name__, "value": when.isoformat()},
        "when_offset": None if offset is None else offset.total_seconds(),
        "ident": {"type": type(ident).__name__, "value": repr(ident)},
        "amount": {"type": type(amount).__name__, "value": repr(amount)},
        "pair": {"type": type(pair).__name__, "value": repr(pair)},
        "pair_items": [type(part).__name__ for part in pair],
        "item": {"type": type(item).__name__, "value": repr(item)},
    }
    Path(out_file).write_text(json.dumps(received), encoding="utf-8")


@app.get("/health")
def health() -> dict[str, str]:
    # Reads no task and adds none, so it responds while the store is unreachable.
    return {"status": "ok"}


@app.post("/quick")
def add_quick(tasks: Tasks, label: str) -> dict[str, str]:
    return {"task_id": tasks.add_task(quick, label)}


@app.post("/record")
def add_record(tasks: Tasks, run_file: str, count: int = 1) -> dict[str, Any]:
    return {"task_ids": [tasks.add_task(record, run_file) for _ in range(count)]}


@app.post("/hold")
def add_hold(tasks: Tasks, gate: str, limit: float = 30.0, requeue: bool = False) -> dict[str, str]:
    task = hold_requeued if requeue else hold
    return {"task_id": tasks.add_task(task, gate=gate, limit=limit)}


@app.post("/fail")
def add_fail(tasks: Tasks, label: str) -> dict[str, str]:
    return {"task_id": tasks.add_task(fail, label)}


@app.post("/flaky")
def add_flaky(tasks: Tasks, label: str) -> dict[str, str]:
    return {"task_id": tasks.add_task(flaky, label)}


@app.post("/keyed")
def add_keyed(tasks: Tasks, key: str, run_file: str) -> dict[str, str]:
    # A sync route: add_task reads the store for the key from the route's worker thread.
    return {"task_id": tasks.add_task(keyed, run_file, idempotency_key=key)}


@app.post("/typed")
def add_typed(tasks: Tasks, out_file: str, body: TypedArguments) -> dict[str, str]:
    task_id = tasks.add_task(
        typed,
        out_file,
        when=body.when,
        ident=body.ident,
        amount=body.amount,
        pair=body.pair,
        item=body.item,
    )
    return {"task_id": task_id}


@app.post("/rejected")
def add_then_reject(tasks: Tasks, label: str, key: str, run_file: str, crash: bool = False) -> None:
    # The keyed task is stored at once, the other one only when the response starts.
    tasks.add_task(quick, label)
    tasks.add_task(keyed, run_file, idempotency_key=key)
    if crash:
        raise RuntimeError("the route failed after adding tasks")
    raise HTTPException(status_code=409, detail="rejected after adding tasks")


@app.get("/stream")
def stream_with_task(tasks: Tasks, label: str, gate: str) -> StreamingResponse:
    def lines() -> Iterator[str]:
        yield "started\n"
        yield f"{tasks.add_task(quick, label)}\n"
        wait_for_gate(gate, 30.0)
        yield "done\n"

    return StreamingResponse(lines(), media_type="text/plain")
