"""Fixtures of the end-to-end suite: uvicorn servers on loopback, stopped after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import ServerFactory


@pytest.fixture
def servers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerFactory]:
    """Yield a factory of servers on this test's database; stop them after the test.

    A failing test gets the output of its servers as a report section.
    """
    factory = ServerFactory(tmp_path)
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
    return report
