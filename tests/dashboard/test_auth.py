"""Authentication of the REST API and the dashboard: configured kinds and overrides."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from dependency_injector import providers
from fastapi import FastAPI, HTTPException, Request
from integration_fixtures import CONTAINERS

from app_taskflow import ConfigurationError, TaskflowContainer
from app_taskflow.auth import BasicAuth, BearerAuth
from app_taskflow.config import load_settings, parse_settings
from app_taskflow.dashboard import DashboardSettings
from app_taskflow.stores import MemoryStore

from .conftest import ACTION_HEADERS
from .support import StreamingTransport

AUTH_VARIABLES = ("APP_TASKFLOW_AUTH_USERNAME", "APP_TASKFLOW_AUTH_PASSWORD")

PROTECTED = [
    ("GET", "/tasks"),
    ("GET", "/tasks/metrics"),
    ("GET", "/tasks/metrics/throughput"),
    ("GET", "/tasks/no-such-task"),
    ("GET", "/tasks/dashboard"),
    ("GET", "/tasks/dashboard/app.js"),
    ("GET", "/tasks/dashboard/events"),
    ("POST", "/tasks/retry"),
    ("POST", "/tasks/no-such-task/retry"),
    ("POST", "/tasks/no-such-task/cancel"),
]
"""Every route of the REST API and the dashboard."""

ALLOWED_STATUS = {
    "/tasks/no-such-task": 404,
    "/tasks/no-such-task/retry": 404,
    "/tasks/no-such-task/cancel": 404,
}
"""Routes that return another status than 200 once the request is authenticated."""


def basic(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


AppClient = Callable[..., Any]


@pytest.fixture
async def app_client() -> AsyncIterator[AppClient]:
    """Return a factory of clients of started apps whose container has ``auth`` settings."""
    async with AsyncExitStack() as cleanup:

        async def make(
            auth: dict[str, Any] | None = None, dependency: Any = None
        ) -> httpx.AsyncClient:
            data = load_settings(CONTAINERS / "test.yaml").model_dump()
            if auth is not None:
                data["auth"] = auth
            container = TaskflowContainer.from_settings(parse_settings(data))
            container.store.override(providers.Singleton(MemoryStore))
            if dependency is not None:
                container.auth.override(providers.Object(dependency))
            taskflow = container.taskflow()
            app = FastAPI(lifespan=taskflow.lifespan)
            taskflow.install(app, dashboard=DashboardSettings(stream_lifetime=0.05, linger=0))
            await cleanup.enter_async_context(taskflow.lifespan(app))
            transport = StreamingTransport(app)
            client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
            return await cleanup.enter_async_context(client)

        yield make


async def send(client: httpx.AsyncClient, method: str, path: str, **headers: str) -> int:
    """Send one request and return its status; an event stream is closed at once."""
    request = client.build_request(method, path, headers={**ACTION_HEADERS, **headers})
    response = await client.send(request, stream=True)
    await response.aclose()
    return response.status_code


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[path for _, path in PROTECTED])
async def test_basic_auth_required(app_client: AppClient, method: str, path: str) -> None:
    client = await app_client({"kind": "basic", "username": "ada", "password": "s3cret"})

    anonymous = await send(client, method, path)
    wrong = await send(client, method, path, **basic("ada", "guess"))
    allowed = await send(client, method, path, **basic("ada", "s3cret"))

    assert anonymous == 401
    assert wrong == 401
    assert allowed == ALLOWED_STATUS.get(path, 200)


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[path for _, path in PROTECTED])
async def test_bearer_auth_required(app_client: AppClient, method: str, path: str) -> None:
    client = await app_client({"kind": "bearer", "token": "t0ken-value"})

    anonymous = await send(client, method, path)
    wrong = await send(client, method, path, Authorization="Bearer other")
    allowed = await send(client, method, path, Authorization="Bearer t0ken-value")

    assert anonymous == 401
    assert wrong == 401
    assert allowed == ALLOWED_STATUS.get(path, 200)


async def test_basic_auth_challenge(app_client: AppClient) -> None:
    client = await app_client({"kind": "basic", "username": "ada", "password": "s3cret"})

    response = await client.get("/tasks/dashboard")

    assert response.headers["www-authenticate"] == 'Basic realm="app-taskflow", charset="UTF-8"'
    assert response.json() == {"detail": "Invalid or missing username and password."}


async def test_bearer_auth_challenge(app_client: AppClient) -> None:
    client = await app_client({"kind": "bearer", "token": "t0ken-value"})

    response = await client.get("/tasks")

    assert response.headers["www-authenticate"] == 'Bearer realm="app-taskflow"'


async def test_auth_none_by_default(app_client: AppClient) -> None:
    client = await app_client()

    response = await client.get("/tasks/dashboard")

    assert response.status_code == 200


async def test_auth_override_dependency(app_client: AppClient) -> None:
    def require_admin(request: Request) -> None:
        if request.headers.get("X-Role") != "admin":
            raise HTTPException(status_code=403, detail="Admins only.")

    client = await app_client({"kind": "bearer", "token": "unused"}, dependency=require_admin)

    refused = await client.get("/tasks")
    allowed = await client.get("/tasks", headers={"X-Role": "admin"})
    page = await client.get("/tasks/dashboard", headers={"X-Role": "admin"})

    assert refused.status_code == 403
    assert refused.json() == {"detail": "Admins only."}
    assert allowed.status_code == 200
    assert page.status_code == 200


async def test_auth_in_openapi_schema(app_client: AppClient) -> None:
    client = await app_client({"kind": "basic", "username": "ada", "password": "s3cret"})

    schema = (await client.get("/openapi.json")).json()

    assert "HTTPBasic" in schema["components"]["securitySchemes"]


def test_auth_repr_hides_secrets() -> None:
    assert "s3cret" not in repr(BasicAuth("ada", "s3cret"))
    assert "t0ken" not in repr(BearerAuth("t0ken"))


def test_production_requires_username(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_SQLITE_PATH", "/srv/app/taskflow.db")
    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    expected = "the environment variable APP_TASKFLOW_AUTH_USERNAME is not set"
    with pytest.raises(ConfigurationError, match=expected):
        TaskflowContainer.from_environment("production", folder=CONTAINERS)


def test_production_requires_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_SQLITE_PATH", "/srv/app/taskflow.db")
    monkeypatch.setenv("APP_TASKFLOW_AUTH_USERNAME", "ops")
    monkeypatch.delenv("APP_TASKFLOW_AUTH_PASSWORD", raising=False)

    expected = "the environment variable APP_TASKFLOW_AUTH_PASSWORD is not set"
    with pytest.raises(ConfigurationError, match=expected):
        TaskflowContainer.from_environment("production", folder=CONTAINERS)


def test_production_basic_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_TASKFLOW_SQLITE_PATH", "/srv/app/taskflow.db")
    monkeypatch.setenv("APP_TASKFLOW_AUTH_USERNAME", "ops")
    # YAML would read 0777 as the number 511; a password stays the text it was given.
    monkeypatch.setenv("APP_TASKFLOW_AUTH_PASSWORD", "0777")

    settings = load_settings(CONTAINERS / "production.yaml")

    assert settings.auth.kind == "basic"
    assert settings.auth.username == "ops"
    assert settings.auth.password == "0777"


@pytest.mark.parametrize("path", ["development.yaml", "test.yaml"])
def test_environments_without_auth(path: str) -> None:
    settings = load_settings(Path(CONTAINERS) / path)

    assert settings.auth.kind == "none"


def test_auth_config_hides_secret_in_errors() -> None:
    data = {"store": {"kind": "memory"}, "auth": {"kind": "basic", "username": "a", "password": []}}

    with pytest.raises(ConfigurationError, match=r"auth\.password: invalid value \(hidden\)"):
        parse_settings(data)


def test_auth_config_unknown_kind() -> None:
    data = {"store": {"kind": "memory"}, "auth": {"kind": "ldap"}}

    expected = "auth.kind: unknown auth kind 'ldap'; allowed kinds: 'none', 'basic', 'bearer'"
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        parse_settings(data)


def test_auth_config_missing_password() -> None:
    data = {"store": {"kind": "memory"}, "auth": {"kind": "basic", "username": "a"}}

    with pytest.raises(ConfigurationError, match=r"auth\.password is missing"):
        parse_settings(data)
