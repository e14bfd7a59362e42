"""Fixtures of the end-to-end suite: uvicorn servers on loopback, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .outage_servers import Outage
from .support import ServerFactory, shared_store


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of this test's store: ``sqlite`` unless ``every_store`` parametrizes it."""
    kind: str = getattr(request, "param", "sqlite")
    return kind


@pytest.fixture
def store_settings(store_kind: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Yield the ``store`` section of a fresh store of ``store_kind``, deleted afterwards."""
    with shared_store(store_kind, tmp_path) as settings:
        yield settings


@pytest.fixture
def servers(
    request: pytest.FixtureRequest, tmp_path: Path, store_settings: dict[str, Any]
) -> Iterator[ServerFactory]:
    """Yield a factory of servers on this test's store, and stop them after the test.

    A failing test gets the output of its servers as a report section.
    """
    factory = ServerFactory(tmp_path, store_settings)
    request.node.e2e_servers = factory
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    factory: ServerFactory | None = getattr(item, "e2e_servers", None)
    if factory is not None and report.failed and factory.servers:
        report.sections.append(("server output", factory.logs()))
    outage: Outage | None = getattr(item, "e2e_outage", None)
    if outage is not None and report.failed:
        report.sections.append(("store server output", outage.log()))
    return report
