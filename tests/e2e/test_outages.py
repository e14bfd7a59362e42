"""Store outages under a real server: a private Redis or PostgreSQL goes away and comes back."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest

from .outage_servers import (
    Outage,
    PostgresCluster,
    PostgresRestart,
    RedisPause,
    RedisRestart,
    RedisServer,
    require_postgres_user,
    require_program,
)
from .support import (
    ServerFactory,
    add,
    add_records,
    get_task,
    list_tasks,
    read_lines,
    wait_for_status,
    wait_until,
    wait_until_settled,
)

pytestmark = pytest.mark.e2e

OUTAGE_KINDS = ("redis-paused", "redis-killed", "postgres-stopped")
"""How the store goes away: a hung Redis (SIGSTOP), a Redis crash (SIGKILL, restart with its
AOF file), a PostgreSQL crash (``pg_ctl stop -m immediate``, then start)."""

LEASE_EXPIRY = 2.0
LEASES = {"heartbeat_interval": 0.5, "expiry": LEASE_EXPIRY, "poll_interval": 0.2}

UNREACHABLE = "Store unreachable while trying to"
REACHABLE_AGAIN = "Store reachable again after"
LEASE_RETRY = re.compile(r"Store (still )?unreachable.*renew the lease")
"""A failed heartbeat during an outage: a WARNING for the outage's first call, else DEBUG."""
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})")
"""The timestamp at the start of a line of loguru's default format."""


@pytest.fixture(params=OUTAGE_KINDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    """Yield an outage of a private store server started for this test, and stop the server."""
    kind: str = request.param
    if kind.startswith("redis"):
        require_program("redis-server")
        server = RedisServer(tmp_path / "redis", persistent=kind == "redis-killed")
        try:
            server.start()
            chosen: Outage = RedisPause(server) if kind == "redis-paused" else RedisRestart(server)
            request.node.e2e_outage = chosen
            yield chosen
        finally:
            server.stop()
    else:
        require_program("initdb", "pg_ctl")
        require_postgres_user()
        cluster = PostgresCluster()
        try:
            cluster.initialize()
            cluster.start()
            cluster.create_database("taskflow")
            chosen = PostgresRestart(cluster, "taskflow")
            request.node.e2e_outage = chosen
            yield chosen
        finally:
            cluster.remove()


def lines_with(log: str, text: str) -> list[str]:
    return [line for line in log.splitlines() if text in line]


def lease_retry_times(log: str) -> list[datetime]:
    """Return when each failed heartbeat of an outage was logged, in order."""
    times = []
    for line in log.splitlines():
        matched = LOG_TIME.match(line)
        if matched and LEASE_RETRY.search(line):
            times.append(datetime.strptime(matched.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    return times


def open_store_connections(client: httpx.Client, run_file: Path) -> None:
    """Run 30 tasks at once, so that the app's store client keeps several connections open.

    A call during an outage then goes out on a connection that the server accepted
    before, as it would under load, and not on a new one.
    """
    add_records(client, run_file, 30)
    wait_until_settled(client)


def next_heartbeat_deadline(log: str) -> datetime:
    """Return a time by which the heartbeat loop has renewed the lease after an outage.

    The wait before each retry doubles, so the retry after the last failed one comes at
    most twice the last gap later. The extra second covers the call and the recovery
    that follows it.
    """
    times = lease_retry_times(log)
    last_gap = (times[-1] - times[-2]).total_seconds()
    return times[-1] + timedelta(seconds=2 * last_gap + 1.0)


def test_outage_results_written_after_recovery(
    outage: Outage, servers: ServerFactory, tmp_path: Path
) -> None:
    # Three slots, all taken by gated tasks, so the five record tasks wait in the
    # dispatcher's queue across the outage. The buffer takes two tasks.
    servers.configure(
        store=outage.store,
        runner={"max_concurrency": 3, "sync_workers": 4, "shutdown_grace": 2.0},
        leases=LEASES,
        outage={"policy": "buffer", "buffer_size": 2},
    )
    server = servers.start()
    gate = tmp_path / "gate"
    gate.touch()
    # Held until the lease was renewed after the outage, so that a renewal that failed
    # would show as this task taken back from its own, live instance.
    late_gate = tmp_path / "late-gate"
    late_gate.touch()
    run_file = tmp_path / "runs.txt"

    with server.client() as client:
        hold_ids = [add(client, "/hold", gate=str(gate)) for _ in range(2)]
        late_id = add(client, "/hold", gate=str(late_gate))
        for task_id in [*hold_ids, late_id]:
            wait_for_status(client, task_id, "RUNNING")
        record_ids = add_records(client, run_file, 5)

        outage.begin()
        began = time.monotonic()
        health_codes = [client.get("/health").status_code for _ in range(3)]
        buffered_ids = add_records(client, run_file, 2)
        rejected = client.post("/record", params={"run_file": str(run_file)})
        # These gated tasks end during the outage, so their results wait for the store.
        gate.unlink()
        wait_until(
            lambda: all(
                re.search(rf"unreachable.*(save logs of|finish) task {hold_id}", server.log())
                for hold_id in hold_ids
            ),
            timeout=20.0,
            what="the gated tasks to try to write their results",
            interval=0.1,
        )
        # Longer than the lease expiry, as real outages often are, and enough failed
        # heartbeats to see the backoff between them.
        wait_until(
            lambda: (
                time.monotonic() - began > LEASE_EXPIRY + 1.0
                and len(lease_retry_times(server.log())) >= 4
            ),
            timeout=20.0,
            what="an outage longer than the lease expiry, with four failed heartbeats",
            interval=0.1,
        )
        outage.end()
        deadline = next_heartbeat_deadline(server.log())
        wait_until(lambda: datetime.now() > deadline, 15.0, "the lease renewal after the outage")
        late_gate.unlink()

        expected = {*hold_ids, late_id, *record_ids, *buffered_ids}
        wait_until(
            lambda: {task["id"] for task in list_tasks(client, "SUCCESS")} >= expected,
            timeout=30.0,
            what="every task a client received to succeed",
            interval=0.2,
        )
        tasks = list_tasks(client)
        wait_until(lambda: REACHABLE_AGAIN in server.log(), 15.0, "the end of the outage")

    log = server.log()
    unreachable = lines_with(log, UNREACHABLE)
    reachable = lines_with(log, REACHABLE_AGAIN)
    retry_times = lease_retry_times(log)
    retry_gaps = [(later - earlier).total_seconds() for earlier, later in pairwise(retry_times)]
    runs = Counter(read_lines(run_file))
    assert health_codes == [200, 200, 200]
    assert len(buffered_ids) == 2
    assert rejected.status_code == 503
    assert "were not stored" in rejected.json()["detail"]
    assert {task["status"] for task in tasks} == {"SUCCESS"}
    assert {task["id"] for task in tasks} == expected
    assert set(runs) == {*record_ids, *buffered_ids}
    assert set(runs.values()) == {1}
    assert len(unreachable) == 1
    assert "WARNING" in unreachable[0]
    assert len(reachable) == 1
    assert "WARNING" in reachable[0]
    assert "2 task(s) were buffered" in reachable[0]
    assert "lease expired" not in log
    # Backoff: the wait between two failed heartbeats grows.
    assert retry_gaps[-1] > retry_gaps[0]


def test_outage_add_task_answers_503(
    outage: Outage, servers: ServerFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if isinstance(outage, RedisPause):
        # NOTE: a hung Redis runs a timed-out create once it continues, so the task of the
        # 503 response is stored after all. It stays PENDING, owned by this live instance
        # that never runs it, until the instance stops and hands it to the next one.
        request.applymarker(
            pytest.mark.xfail(reason="a timed-out create is stored once a hung Redis continues")
        )
    servers.configure(store=outage.store, leases=LEASES, outage={"policy": "raise"})
    server = servers.start()

    with server.client() as client:
        open_store_connections(client, tmp_path / "runs.txt")
        before_id = add(client, "/quick", label="before")
        wait_for_status(client, before_id, "SUCCESS")

        outage.begin()
        rejected = client.post("/quick", params={"label": "during"})
        health = client.get("/health")
        outage.end()

        wait_until(lambda: REACHABLE_AGAIN in server.log(), 15.0, "the end of the outage")
        after_id = add(client, "/quick", label="after")
        wait_for_status(client, after_id, "SUCCESS")
        task_ids = {task["id"] for task in list_tasks(client, name="quick")}

    log = server.log()
    assert rejected.status_code == 503
    assert rejected.headers["content-type"] == "application/json"
    assert rejected.headers["retry-after"] == "5"
    assert "The task store is unreachable" in rejected.json()["detail"]
    assert health.status_code == 200
    assert len(lines_with(log, UNREACHABLE)) == 1
    assert len(lines_with(log, REACHABLE_AGAIN)) == 1
    assert task_ids == {before_id, after_id}


def test_outage_retry_claimed_after_recovery(
    outage: Outage, servers: ServerFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A hung Redis runs a timed-out claim once it continues, so the claim's retry finds the
    # task RUNNING under this instance already; the dispatcher then runs that attempt.
    servers.configure(store=outage.store, leases=LEASES)
    server = servers.start()

    with server.client() as client:
        open_store_connections(client, tmp_path / "runs.txt")
        task_id = add(client, "/flaky", label="retried")

        def waiting_for_retry() -> dict[str, Any] | None:
            task = get_task(client, task_id)
            return task if task["attempts"] == 1 and task["status"] == "PENDING" else None

        first = wait_until(waiting_for_retry, timeout=15.0, what="the first attempt to fail")
        # The retry is due one second after the first attempt, within the outage.
        outage.begin()
        wait_until(
            lambda: re.search(rf"unreachable.*claim task {task_id}", server.log()),
            timeout=20.0,
            what="the claim of the retry to fail",
            interval=0.1,
        )
        outage.end()
        wait_until(
            lambda: get_task(client, task_id)["status"] != "PENDING",
            timeout=20.0,
            what="the retry to be claimed",
            interval=0.1,
        )
        task = wait_for_status(client, task_id, "SUCCESS", timeout=5.0)

    assert [attempt["status"] for attempt in first["attempt_history"]] == ["FAILED"]
    assert task["attempts"] == 2
    assert [attempt["status"] for attempt in task["attempt_history"]] == ["FAILED", "SUCCESS"]
