"""Crash recovery and clean shutdown of real server processes sharing one store."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from .support import (
    ServerFactory,
    add,
    add_records,
    every_store,
    get_task,
    list_tasks,
    read_lines,
    wait_for_status,
    wait_until,
    wait_until_settled,
)

pytestmark = pytest.mark.e2e

HEARTBEAT_INTERVAL = 0.5
LEASE_EXPIRY = 2.0
POLL_INTERVAL = 0.2
SHUTDOWN_GRACE = 2.0
FAST_LEASES = {
    "heartbeat_interval": HEARTBEAT_INTERVAL,
    "expiry": LEASE_EXPIRY,
    "poll_interval": POLL_INTERVAL,
}


@every_store
@pytest.mark.parametrize("requeue", [False, True], ids=["interrupted", "requeued"])
def test_crash_runs_pending_once(servers: ServerFactory, tmp_path: Path, requeue: bool) -> None:
    # One slot before the crash, so the 200 tasks wait behind the gated one, and 50 after it.
    servers.configure(
        "before", runner={"max_concurrency": 1, "sync_workers": 2}, leases=FAST_LEASES
    )
    servers.configure(
        "after", runner={"max_concurrency": 50, "sync_workers": 8}, leases=FAST_LEASES
    )
    server = servers.start("before")
    gate = tmp_path / "gate"
    gate.touch()
    run_file = tmp_path / "runs.txt"

    with server.client() as client:
        hold_id = add(client, "/hold", gate=str(gate), requeue=requeue)
        wait_for_status(client, hold_id, "RUNNING")
        record_ids = add_records(client, run_file, 200)
        pending = list_tasks(client, "PENDING")

    assert len(pending) == 200
    server.kill()
    gate.unlink()

    restarted = servers.start("after")
    with restarted.client() as client:
        tasks = wait_until_settled(client)
        hold = get_task(client, hold_id)

    runs = Counter(read_lines(run_file))
    statuses = Counter(task["status"] for task in tasks)
    assert len(tasks) == 201
    assert set(runs) == set(record_ids)
    assert set(runs.values()) == {1}
    assert "PENDING" not in statuses
    assert "RUNNING" not in statuses
    assert statuses["SUCCESS"] == 200 + requeue
    if requeue:
        assert hold["status"] == "SUCCESS"
        assert hold["attempts"] == 2
        assert [attempt["status"] for attempt in hold["attempt_history"]] == [
            "INTERRUPTED",
            "SUCCESS",
        ]
    else:
        assert hold["status"] == "INTERRUPTED"
        assert hold["attempts"] == 1
        assert hold["error_type"] == "Interrupted"


@every_store
def test_recovery_takes_over_dead_instance(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure("doomed", runner={"max_concurrency": 2}, leases=FAST_LEASES)
    servers.configure("survivor", runner={"max_concurrency": 20}, leases=FAST_LEASES)
    doomed = servers.start("doomed")
    survivor = servers.start("survivor")
    gate = tmp_path / "gate"
    gate.touch()
    run_file = tmp_path / "runs.txt"

    with doomed.client() as client:
        hold_ids = [add(client, "/hold", gate=str(gate)) for _ in range(2)]
        for hold_id in hold_ids:
            wait_for_status(client, hold_id, "RUNNING")
        record_ids = add_records(client, run_file, 50)
        dead_instance = get_task(client, hold_ids[0])["owner"]

    with survivor.client() as client:
        owned_by_dead = [
            task for task in list_tasks(client, "PENDING") if task["owner"] == dead_instance
        ]
        assert len(owned_by_dead) == 50

        doomed.kill()
        killed_at = time.monotonic()
        wait_until(
            lambda: all(
                get_task(client, task_id)["status"] == "INTERRUPTED" for task_id in hold_ids
            ),
            timeout=15.0,
            what="the dead instance's running tasks to be INTERRUPTED",
        )
        recovery_seconds = time.monotonic() - killed_at
        tasks = wait_until_settled(client)

    print(f"Recovered the dead instance's tasks {recovery_seconds:.2f} s after SIGKILL")
    runs = Counter(read_lines(run_file))
    statuses = {task["id"]: task["status"] for task in tasks}
    # The lease ends at most LEASE_EXPIRY after the kill. The survivor looks at the leases
    # every POLL_INTERVAL, and makes a full pass every HEARTBEAT_INTERVAL whatever it finds.
    # The extra second covers the store calls and this test's polling.
    assert recovery_seconds < LEASE_EXPIRY + HEARTBEAT_INTERVAL + 1.0
    assert set(runs) == set(record_ids)
    assert set(runs.values()) == {1}
    assert {statuses[task_id] for task_id in record_ids} == {"SUCCESS"}
    assert dead_instance not in {task["owner"] for task in tasks if task["id"] in record_ids}


@every_store
def test_shutdown_hands_back_tasks(servers: ServerFactory, tmp_path: Path) -> None:
    # A lease expiry far beyond the test's waits, so only the release at shutdown can
    # explain the tasks being taken back after the restart.
    leases = {"heartbeat_interval": 0.5, "expiry": 60.0, "poll_interval": POLL_INTERVAL}
    servers.configure(
        runner={"max_concurrency": 2, "sync_workers": 4, "shutdown_grace": SHUTDOWN_GRACE},
        leases=leases,
    )
    server = servers.start()
    gate = tmp_path / "gate"
    gate.touch()
    run_file = tmp_path / "runs.txt"

    with server.client() as client:
        hold_ids = [add(client, "/hold", gate=str(gate)) for _ in range(2)]
        for hold_id in hold_ids:
            wait_for_status(client, hold_id, "RUNNING")
        record_ids = add_records(client, run_file, 3)
        assert {task["id"] for task in list_tasks(client, "PENDING")} == set(record_ids)

    exit_seconds = server.terminate(timeout=SHUTDOWN_GRACE + 20)
    print(f"Exited {exit_seconds:.2f} s after SIGTERM with shutdown_grace {SHUTDOWN_GRACE} s")
    log = server.log()
    unfinished = [line for line in log.splitlines() if "left unfinished at shutdown" in line]
    assert exit_seconds < SHUTDOWN_GRACE + 8
    assert exit_seconds >= SHUTDOWN_GRACE
    for hold_id in hold_ids:
        assert any(f"hold [{hold_id}]" in line and "INTERRUPTED" in line for line in unfinished)
    for record_id in record_ids:
        assert any(f"record [{record_id}]" in line and "PENDING" in line for line in unfinished)
    assert read_lines(run_file) == []

    gate.unlink()
    restarted = servers.start()
    with restarted.client() as client:
        tasks = wait_until_settled(client, timeout=15.0)

    statuses = {task["id"]: task["status"] for task in tasks}
    assert {statuses[task_id] for task_id in hold_ids} == {"INTERRUPTED"}
    assert {statuses[task_id] for task_id in record_ids} == {"SUCCESS"}
    assert sorted(read_lines(run_file)) == sorted(record_ids)
