"""Task lifecycle seen through the REST API of a real server, before and after a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .support import (
    ServerFactory,
    add,
    every_store,
    get_task,
    list_tasks,
    read_lines,
    wait_for_status,
)

pytestmark = pytest.mark.e2e


@every_store
def test_history_survives_restart(servers: ServerFactory, tmp_path: Path) -> None:
    # One slot, so a task added while the gated one runs is seen PENDING.
    servers.configure(runner={"max_concurrency": 1, "sync_workers": 2, "shutdown_grace": 2.0})
    server = servers.start()
    gate = tmp_path / "gate"
    gate.touch()

    with server.client() as client:
        hold_id = add(client, "/hold", gate=str(gate))
        wait_for_status(client, hold_id, "RUNNING")
        quick_id = add(client, "/quick", label="first")
        assert get_task(client, quick_id)["status"] == "PENDING"

        gate.unlink()
        quick = wait_for_status(client, quick_id, "SUCCESS")
        hold = wait_for_status(client, hold_id, "SUCCESS")
        fail_id = add(client, "/fail", label="broken")
        failed = wait_for_status(client, fail_id, "FAILED")

        tasks_before = {task["id"]: get_task(client, task["id"]) for task in list_tasks(client)}
        listing_before = list_tasks(client)

    assert quick["attempts"] == 1
    assert [entry["message"] for entry in quick["logs"]] == ["quick task first ran"]
    assert quick["finished_at"] is not None
    assert quick["duration"] is not None
    assert hold["logs"][0]["message"] == "holding until the gate file is removed"

    assert failed["attempts"] == 3
    assert failed["max_attempts"] == 3
    assert failed["error_type"] == "ValueError"
    assert failed["error_message"] == "invalid label 'broken'"
    assert "ValueError: invalid label 'broken'" in failed["traceback"]
    assert 'raise ValueError(f"invalid label {label!r}")' in failed["traceback"]
    assert [entry["message"] for entry in failed["logs"]] == [
        "attempt 1 of broken",
        "attempt 2 of broken",
        "attempt 3 of broken",
    ]
    assert [entry["attempt"] for entry in failed["logs"]] == [1, 2, 3]
    assert [attempt["number"] for attempt in failed["attempt_history"]] == [1, 2, 3]
    assert {attempt["status"] for attempt in failed["attempt_history"]} == {"FAILED"}
    assert set(tasks_before) == {hold_id, quick_id, fail_id}

    server.terminate()
    restarted = servers.start()
    with restarted.client() as client:
        tasks_after = {task["id"]: get_task(client, task["id"]) for task in list_tasks(client)}
        listing_after = list_tasks(client)

    assert listing_after == listing_before
    assert tasks_after == tasks_before


@every_store
def test_arguments_keep_types_across_crash(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure(runner={"max_concurrency": 1, "sync_workers": 2, "shutdown_grace": 2.0})
    server = servers.start()
    gate = tmp_path / "gate"
    gate.touch()
    out_file = tmp_path / "typed.json"
    body = {
        "when": "2030-01-02T03:04:05.678901+02:00",
        "ident": "12345678-1234-5678-1234-567812345678",
        "amount": "12.50",
        "pair": [3, "x"],
        "item": {"sku": "A-1", "quantity": 2},
    }

    with server.client() as client:
        hold_id = add(client, "/hold", gate=str(gate))
        wait_for_status(client, hold_id, "RUNNING")
        response = client.post("/typed", params={"out_file": str(out_file)}, json=body)
        response.raise_for_status()
        typed_id = response.json()["task_id"]
        assert get_task(client, typed_id)["status"] == "PENDING"

    server.kill()
    gate.unlink()
    restarted = servers.start()
    with restarted.client() as client:
        typed = wait_for_status(client, typed_id, "SUCCESS")
        hold = get_task(client, hold_id)

    received = json.loads(out_file.read_text(encoding="utf-8"))
    assert typed["attempts"] == 1
    assert hold["status"] == "INTERRUPTED"
    assert received["when"] == {"type": "datetime", "value": "2030-01-02T03:04:05.678901+02:00"}
    assert received["when_offset"] == 7200.0
    assert received["ident"] == {
        "type": "UUID",
        "value": "UUID('12345678-1234-5678-1234-567812345678')",
    }
    assert received["amount"] == {"type": "Decimal", "value": "Decimal('12.50')"}
    assert received["pair"] == {"type": "tuple", "value": "(3, 'x')"}
    assert received["pair_items"] == ["int", "str"]
    assert received["item"] == {"type": "Item", "value": "Item(sku='A-1', quantity=2)"}


def test_failed_request_runs_no_task(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure()
    server = servers.start()
    run_file = tmp_path / "runs.txt"

    with server.client() as client:
        rejected = client.post(
            "/rejected", params={"label": "rejected", "key": "key-1", "run_file": str(run_file)}
        )
        # A new connection: uvicorn closes the one whose app raised after its response.
        with server.client() as crash_client:
            crashed = crash_client.post(
                "/rejected",
                params={
                    "label": "crashed",
                    "key": "key-2",
                    "run_file": str(run_file),
                    "crash": True,
                },
            )
        tasks = list_tasks(client)

    log = server.log()
    assert rejected.status_code == 409
    assert crashed.status_code == 500
    assert [task["name"] for task in tasks] == ["keyed", "keyed"]
    assert {task["status"] for task in tasks} == {"CANCELLED"}
    assert {task["idempotency_key"] for task in tasks} == {"key-1", "key-2"}
    assert "was not stored or run: the request ended with status 409" in log
    assert "was not stored or run: the request failed with an unhandled error" in log
    assert "cancelled before it ran: the request ended with status 409" in log
    assert "cancelled before it ran: the request failed with an unhandled error" in log
    assert read_lines(run_file) == []


def test_streamed_task_id_is_stored(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure()
    server = servers.start()
    gate = tmp_path / "gate"
    gate.touch()

    with server.client() as client, server.client() as reader:
        params = {"label": "streamed", "gate": str(gate)}
        with client.stream("GET", "/stream", params=params) as response:
            lines = response.iter_lines()
            assert next(lines) == "started"
            task_id = next(lines)
            # The body stays open until the gate is removed, and the id must be stored by now.
            while_streaming = reader.get(f"/tasks/{task_id}")
            gate.unlink()
            rest = list(lines)
        task = wait_for_status(reader, task_id, "SUCCESS")

    assert while_streaming.status_code == 200
    assert while_streaming.json()["status"] == "PENDING"
    assert rest == ["done"]
    assert task["logs"][0]["message"] == "quick task streamed ran"
