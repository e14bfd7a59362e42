"""The dashboard in headless Chromium against a uvicorn server: live, filters, actions, safety."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.browser.app import XSS_NAME, XSS_TEXT

from .conftest import Server, start_server

pytestmark = pytest.mark.browser

LIVE_TIMEOUT = 3000
"""Milliseconds a change may take to show without a reload: about a second, with margin."""


def open_dashboard(page: Page, server: Server, fragment: str = "") -> None:
    """Open the dashboard and wait until its event stream is connected."""
    page.goto(server.dashboard_url + fragment)
    expect(page.locator("#connection")).to_have_text("Live")


def row(page: Page, task_id: str):  # type: ignore[no-untyped-def]
    return page.locator(f'#task-rows tr[data-task-id="{task_id}"]')


def confirm(page: Page) -> None:
    dialog = page.locator("#confirm")
    expect(dialog).to_be_visible()
    page.locator("#confirm-ok").click()
    expect(dialog).to_be_hidden()


def test_new_task_appears_live(page: Page, server: Server) -> None:
    open_dashboard(page, server)
    address = f"{uuid.uuid4().hex[:8]}@example.com"

    task_id = server.post("/demo/email", address=address)["task_id"]

    task_row = row(page, task_id)
    expect(task_row).to_be_visible(timeout=LIVE_TIMEOUT)
    expect(task_row).to_have_attribute("data-status", "SUCCESS", timeout=LIVE_TIMEOUT)
    expect(task_row.locator("td.name")).to_have_text("send_welcome_email")


def test_running_task_changes_state_live(page: Page, server: Server) -> None:
    open_dashboard(page, server)
    task_id = server.post("/demo/hold")["task_id"]
    try:
        expect(row(page, task_id)).to_have_attribute("data-status", "RUNNING", timeout=LIVE_TIMEOUT)
    finally:
        server.post("/demo/release")

    expect(row(page, task_id)).to_have_attribute("data-status", "SUCCESS", timeout=LIVE_TIMEOUT)


def test_filter_and_search_narrow_table(page: Page, server: Server) -> None:
    marker = uuid.uuid4().hex[:10]
    failed = server.post("/demo/report", month=f"march-{marker}", fail=True)["task_id"]
    succeeded = server.post("/demo/report", month=f"april-{marker}")["task_id"]
    email = server.post("/demo/email", address=f"{marker}@example.com")["task_id"]
    for task_id in (failed, succeeded, email):
        server.wait_for_status(task_id, "SUCCESS", "FAILED")
    open_dashboard(page, server)

    page.locator("#filter-search").fill(marker)
    expect(page.locator("#task-rows tr")).to_have_count(3)
    page.locator("#filter-status").select_option("FAILED")
    expect(page.locator("#task-rows tr")).to_have_count(1)
    expect(row(page, failed)).to_be_visible()
    page.locator("#filter-status").select_option("")
    page.locator("#filter-name").select_option("send_welcome_email")
    expect(page.locator("#task-rows tr")).to_have_count(1)
    expect(row(page, email)).to_be_visible()
    page.locator("#filter-name").select_option("")
    page.locator("#filter-search").fill(f"april-{marker}")
    expect(page.locator("#task-rows tr")).to_have_count(1)
    expect(row(page, succeeded)).to_be_visible()


def test_detail_shows_logs_and_traceback(page: Page, server: Server) -> None:
    month = f"may-{uuid.uuid4().hex[:6]}"
    task_id = server.post("/demo/report", month=month, fail=True)["task_id"]
    server.wait_for_status(task_id, "FAILED")
    open_dashboard(page, server)

    row(page, task_id).click()

    detail = page.locator("#detail")
    expect(detail.locator("#detail-title")).to_have_text("build_report")
    expect(detail.locator(".arguments")).to_contain_text(month)
    logs = detail.locator("#detail-logs li")
    expect(logs).to_have_count(2)
    expect(logs.nth(1).locator(".level")).to_have_text("WARNING")
    expect(logs.nth(1).locator(".message")).to_have_text("The warehouse API timed out")
    traceback = detail.locator("pre.traceback")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text(f"ReportError: report for {month} failed")
    expect(detail.locator(".attempts tbody tr")).to_have_count(1)

    detail.locator("button.copy").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert f"ReportError: report for {month} failed" in copied


def test_retry_failed_task(page: Page, server: Server) -> None:
    task_id = server.post("/demo/report", month="june", fail=True)["task_id"]
    server.wait_for_status(task_id, "FAILED")
    open_dashboard(page, server, f"#task={task_id}")

    page.locator("#action-retry").click()
    confirm(page)

    expect(page.locator("#toast")).to_contain_text("queued again")
    attempts_cell = row(page, task_id).locator("td.col-attempts")
    expect(attempts_cell).to_have_text("2/2", timeout=LIVE_TIMEOUT)
    expect(page.locator("#detail .attempts tbody tr")).to_have_count(2, timeout=LIVE_TIMEOUT)


def test_cancel_pending_task(page: Page, server: Server) -> None:
    held = server.post("/demo/hold")["task_id"]
    try:
        server.wait_for_status(held, "RUNNING")
        pending = server.post("/demo/email", address="later@example.com")["task_id"]
        open_dashboard(page, server)
        expect(row(page, pending)).to_have_attribute("data-status", "PENDING")

        row(page, pending).click()
        page.locator("#action-cancel").click()
        confirm(page)

        expect(row(page, pending)).to_have_attribute(
            "data-status", "CANCELLED", timeout=LIVE_TIMEOUT
        )
    finally:
        server.post("/demo/release")


def test_cancel_dialog_can_be_dismissed(page: Page, server: Server) -> None:
    task_id = server.post("/demo/report", month="july", fail=True)["task_id"]
    server.wait_for_status(task_id, "FAILED")
    open_dashboard(page, server, f"#task={task_id}")

    page.locator("#action-retry").click()
    page.locator("#confirm button[value=cancel]").click()

    expect(page.locator("#confirm")).to_be_hidden()
    assert server.get(f"/tasks/{task_id}")["attempts"] == 1


def test_retry_all_matching_filter(page: Page, server: Server) -> None:
    marker = uuid.uuid4().hex[:10]
    task_ids = [
        server.post("/demo/report", month=f"{marker}-{number}", fail=True)["task_id"]
        for number in range(3)
    ]
    other = server.post("/demo/report", month="elsewhere", fail=True)["task_id"]
    for task_id in [*task_ids, other]:
        server.wait_for_status(task_id, "FAILED")
    open_dashboard(page, server, f"#status=FAILED&search={marker}")
    expect(page.locator("#task-rows tr")).to_have_count(3)

    page.locator("#retry-all").click()
    expect(page.locator("#confirm-message")).to_contain_text(marker)
    confirm(page)

    expect(page.locator("#toast")).to_have_text("3 tasks queued again.")
    for task_id in task_ids:
        server.wait_for_status(task_id, "FAILED")
        assert server.get(f"/tasks/{task_id}")["attempts"] == 2
    assert server.get(f"/tasks/{other}")["attempts"] == 1


def test_hostile_values_shown_as_text(page: Page, server: Server) -> None:
    task_id = server.post("/demo/hostile")["task_id"]
    server.wait_for_status(task_id, "FAILED")
    open_dashboard(page, server)

    task_row = row(page, task_id)
    expect(task_row.locator("td.name")).to_have_text(XSS_NAME)
    task_row.click()
    detail = page.locator("#detail")
    expect(detail.locator("#detail-title")).to_have_text(XSS_NAME)
    expect(detail.locator(".arguments")).to_contain_text(XSS_TEXT)
    expect(detail.locator("#detail-logs .message")).to_have_text([XSS_TEXT])
    expect(detail.locator(".error-text")).to_contain_text(XSS_TEXT)
    expect(detail.locator("pre.traceback")).to_contain_text(XSS_TEXT)

    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("#detail img, #task-rows img").count() == 0
    assert page.locator("body script").count() == 0


def test_throughput_and_overview(page: Page, server: Server) -> None:
    task_id = server.post("/demo/inventory", shop=1)["task_id"]
    server.wait_for_status(task_id, "SUCCESS")
    open_dashboard(page, server)

    expect(page.locator("#throughput svg g.bar")).to_have_count(60)
    expect(page.locator("#counts button[data-status=SUCCESS] .count-value")).not_to_have_text("0")
    expect(page.locator("#names tr", has_text="sync_inventory")).to_be_visible()


def test_narrow_window_fits(browser: Browser, server: Server) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        task_id = server.post("/demo/report", month="august", fail=True)["task_id"]
        server.wait_for_status(task_id, "FAILED")
        open_dashboard(page, server, f"#task={task_id}")
        expect(page.locator("#detail pre.traceback")).to_be_visible()

        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
    finally:
        context.close()

    assert overflow <= 0


def test_reconnecting_shown_when_stream_drops(browser: Browser, tmp_path: Path) -> None:
    own_server = start_server(tmp_path)
    context = browser.new_context()
    try:
        page = context.new_page()
        open_dashboard(page, own_server)

        own_server.kill()

        expect(page.locator("#connection")).to_have_text("Reconnecting…", timeout=5000)
        expect(page.locator("#connection")).to_have_attribute("data-state", "reconnecting")
    finally:
        context.close()
        own_server.stop()


def test_task_of_other_instance_appears_live(browser: Browser, tmp_path: Path) -> None:
    store = {"kind": "sqlite", "path": str(tmp_path / "shared.db")}
    watched = start_server(tmp_path / "first", store)
    other = start_server(tmp_path / "second", store)
    context = browser.new_context()
    try:
        page = context.new_page()
        open_dashboard(page, watched)

        task_id = other.post("/demo/email", address="elsewhere@example.com")["task_id"]

        task_row = row(page, task_id)
        expect(task_row).to_have_attribute("data-status", "SUCCESS", timeout=LIVE_TIMEOUT)
    finally:
        # Closed first: uvicorn waits for open event streams before it stops.
        context.close()
        other.stop()
        watched.stop()
