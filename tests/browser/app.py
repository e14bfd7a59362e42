"""The app that the browser tests and the screenshot script serve with uvicorn.

Started as ``python -m uvicorn tests.browser.app:app`` with ``APP_TASKFLOW_ENV`` and
``APP_TASKFLOW_CONTAINERS`` naming the configuration file that the test wrote. Routes under
``/demo`` add tasks, so a test drives the app over HTTP as a user's routes would.
"""

from __future__ import annotations

import asyncio
import random
import time

from fastapi import FastAPI

from app_taskflow import TaskflowContainer, task_log
from app_taskflow.dashboard import DashboardSettings

XSS_NAME = "<img src=x onerror=window.__xss=1>"
XSS_TEXT = "</script><script>window.__xss=2</script>"

container = TaskflowContainer.from_environment()
taskflow = container.taskflow()
app = FastAPI(lifespan=taskflow.lifespan)
taskflow.install(app, dashboard=DashboardSettings(ping_interval=5.0, linger=5.0))

release = asyncio.Event()


class ReportError(Exception):
    """Raised by the failing demo tasks."""


@taskflow.task(name="send_welcome_email")
def send_welcome_email(address: str) -> None:
    task_log(f"Rendering the welcome template for {address}")
    task_log(f"Sent to {address}", level="success")


@taskflow.task(name="build_report")
def build_report(month: str, fail: bool = False) -> None:
    task_log(f"Reading the orders of {month}")
    if fail:
        task_log("The warehouse API timed out", level="warning")
        raise ReportError(f"report for {month} failed: warehouse API timed out")
    task_log(f"Report for {month} written")


@taskflow.task(name="sync_inventory")
async def sync_inventory(shop: int) -> None:
    task_log(f"Syncing shop {shop}")
    await asyncio.sleep(random.uniform(0.05, 0.3))


@taskflow.task(name="hold")
async def hold() -> None:
    task_log("Waiting for POST /demo/release")
    await asyncio.wait_for(release.wait(), 30)


@taskflow.task(name=XSS_NAME)
def hostile(text: str) -> None:
    task_log(text, level="error")
    raise ReportError(text)


@taskflow.task(name="resize_image")
def resize_image(path: str) -> None:
    time.sleep(random.uniform(0.01, 0.05))
    task_log(f"Resized {path}")


@app.post("/demo/email")
async def add_email(address: str) -> dict[str, str]:
    return {"task_id": await taskflow.add_task(send_welcome_email, address)}


@app.post("/demo/report")
async def add_report(month: str, fail: bool = False) -> dict[str, str]:
    return {"task_id": await taskflow.add_task(build_report, month, fail=fail)}


@app.post("/demo/inventory")
async def add_inventory(shop: int) -> dict[str, str]:
    return {"task_id": await taskflow.add_task(sync_inventory, shop)}


@app.post("/demo/resize")
async def add_resize(file: str) -> dict[str, str]:
    return {"task_id": await taskflow.add_task(resize_image, file)}


@app.post("/demo/hold")
async def add_hold() -> dict[str, str]:
    release.clear()
    return {"task_id": await taskflow.add_task(hold)}


@app.post("/demo/release")
async def release_hold() -> dict[str, bool]:
    release.set()
    return {"released": True}


@app.post("/demo/hostile")
async def add_hostile() -> dict[str, str]:
    return {"task_id": await taskflow.add_task(hostile, XSS_TEXT)}
