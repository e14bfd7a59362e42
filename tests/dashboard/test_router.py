"""The dashboard's page and static files: served by the package, under any prefix."""

from __future__ import annotations

import re
from importlib import resources

import httpx
from fastapi import FastAPI

from app_taskflow.dashboard import DashboardSettings

from .conftest import MakeDashboard
from .support import StreamingTransport

STATIC = resources.files("app_taskflow.dashboard") / "static"


async def test_dashboard_page_served(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    response = await dashboard.client.get("/tasks/dashboard")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="dashboard/app.js"></script>' in response.text
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_dashboard_content_security_policy(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    response = await dashboard.client.get("/tasks/dashboard")
    policy = response.headers["content-security-policy"]

    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy


async def test_dashboard_assets_served(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    script = await dashboard.client.get("/tasks/dashboard/app.js")
    style = await dashboard.client.get("/tasks/dashboard/app.css")
    again = await dashboard.client.get(
        "/tasks/dashboard/app.js", headers={"If-None-Match": script.headers["etag"]}
    )

    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert style.headers["content-type"] == "text/css; charset=utf-8"
    assert script.headers["cache-control"] == "no-cache"
    assert again.status_code == 304


async def test_dashboard_unknown_file(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    response = await dashboard.client.get("/tasks/dashboard/secrets.txt")

    assert response.status_code == 404
    assert response.json() == {"detail": "The dashboard has no file 'secrets.txt'."}


async def test_dashboard_trailing_slash_redirects(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()

    response = await dashboard.client.get("/tasks/dashboard/")

    assert response.status_code == 308
    assert response.headers["location"] == "../dashboard"


async def test_dashboard_under_mount(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    outer = FastAPI()
    outer.mount("/admin", dashboard.app)
    transport = StreamingTransport(outer)

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = await client.get("/admin/tasks/dashboard")
        script = await client.get("/admin/tasks/dashboard/app.js")
        tasks = await client.get("/admin/tasks")
        async with client.stream("GET", "/admin/tasks/dashboard/events") as events:
            status = events.status_code

    assert page.status_code == 200
    assert script.status_code == 200
    assert tasks.status_code == 200
    assert status == 200


async def test_dashboard_behind_root_path(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    transport = StreamingTransport(dashboard.app, root_path="/proxy")

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        page = await client.get("/proxy/tasks/dashboard")
        throughput = await client.get("/proxy/tasks/metrics/throughput")

    assert page.status_code == 200
    assert throughput.status_code == 200


async def test_dashboard_left_out(make_dashboard: MakeDashboard) -> None:
    dashboard = await make_dashboard()
    app = FastAPI()
    dashboard.taskflow.dashboard_hub = None
    dashboard.taskflow.install(app, dashboard=False)
    transport = StreamingTransport(app)

    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/tasks/dashboard")

    assert response.status_code == 404
    assert dashboard.taskflow.dashboard_hub is None


async def test_dashboard_settings_passed(make_dashboard: MakeDashboard) -> None:
    settings = DashboardSettings(ping_interval=2.0, history=10)
    dashboard = await make_dashboard(settings)

    assert dashboard.hub.settings == settings


def test_script_builds_no_markup_from_text() -> None:
    lines = (STATIC / "app.js").read_text(encoding="utf-8").splitlines()
    code = "\n".join(line for line in lines if not line.lstrip().startswith("//"))

    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in code


def test_page_has_no_inline_script_or_handler() -> None:
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ['<script type="module" src="dashboard/app.js">']
    assert re.findall(r"\son[a-z]+=", page) == []


def test_page_uses_relative_urls() -> None:
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    assert re.findall(r'(?:src|href)="(/[^"]*)"', page) == []
