"""Routes of the dashboard: the page, its two static files, its event stream, throughput."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse

from app_taskflow.dashboard.stream import EventStreamResponse, event_stream
from app_taskflow.dashboard.throughput import Throughput, throughput
from app_taskflow.stores.base import TaskStore

if TYPE_CHECKING:
    from app_taskflow.dashboard.hub import DashboardHub
    from app_taskflow.taskflow import Taskflow

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
"""The page may load only its own script, style sheet and API: no inline script at all."""

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

THROUGHPUT_MAX_AGE = 5.0
"""Seconds a throughput count is reused for other requests of the same window."""

_MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    """A static file of the dashboard, read once from the package."""

    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """Read the dashboard's static files from the installed package."""
    folder = resources.files("app_taskflow.dashboard") / "static"
    assets: dict[str, Asset] = {}
    for name, media_type in _MEDIA_TYPES.items():
        body = (folder / name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[name] = Asset(body, media_type, etag)
    return assets


def _serve(asset: Asset, request: Request) -> Response:
    # no-cache lets the browser keep a copy but ask each time, so an upgrade shows at once.
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


class ThroughputCache:
    """Recent ``throughput`` results of one app, shared by its open dashboards.

    Counting reads up to ``DEFAULT_MAX_SCAN`` tasks, which takes a noticeable time with tens
    of thousands of tasks in the window, so dashboards open at once share one count per
    ``max_age``.
    """

    def __init__(self, max_age: float = THROUGHPUT_MAX_AGE) -> None:
        self.max_age = max_age
        self._results: dict[int, tuple[datetime, Throughput]] = {}

    async def read(self, store: TaskStore, now: datetime, minutes: int) -> Throughput:
        """Return the count of the last ``minutes``, computed at most ``max_age`` ago.

        Requests that arrive while no fresh count exists each compute one; the last to
        finish is kept.
        """
        cached = self._results.get(minutes)
        if cached is not None and (now - cached[0]).total_seconds() < self.max_age:
            return cached[1]
        result = await throughput(store, now, minutes)
        self._results[minutes] = (now, result)
        return result


def build_dashboard_router(taskflow: Taskflow, hub: DashboardHub) -> APIRouter:
    """Return the dashboard's router, bound to ``taskflow``; every route requires its auth.

    The page uses relative URLs only, so it works under any prefix: ``api_prefix``, a
    ``root_path`` or a mount point of the app, or a proxy path.
    """
    router = APIRouter(dependencies=[Depends(taskflow.auth)])
    assets = load_assets()
    throughput_cache = ThroughputCache()

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard_page(request: Request) -> Response:
        return _serve(assets["index.html"], request)

    @router.get("/dashboard/", include_in_schema=False)
    async def dashboard_page_slash() -> Response:
        # Relative, so that it stays right behind a proxy that strips a path prefix.
        return RedirectResponse("../dashboard", status_code=308)

    @router.get("/dashboard/events", include_in_schema=False)
    async def dashboard_events(
        last_event_id: Annotated[str | None, Header(max_length=100)] = None,
    ) -> EventStreamResponse:
        if not taskflow.started:
            raise HTTPException(status_code=503, detail="The taskflow is not started yet.")
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return EventStreamResponse(event_stream(hub, last_event_id), headers)

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str, request: Request) -> Response:
        asset = assets.get(name) if name != "index.html" else None
        if asset is None:
            raise HTTPException(status_code=404, detail=f"The dashboard has no file {name!r}.")
        return _serve(asset, request)

    @router.get(
        "/metrics/throughput",
        response_model=Throughput,
        tags=["tasks"],
        summary="Tasks finished per minute, succeeded and failed",
    )
    async def read_throughput(
        minutes: Annotated[int, Query(ge=1, le=1440, description="Length of the window.")] = 60,
    ) -> Throughput:
        return await throughput_cache.read(taskflow.store, taskflow.now(), minutes)

    return router
