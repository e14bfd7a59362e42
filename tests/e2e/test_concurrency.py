"""Several server processes on one store under concurrent requests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from .support import (
    Server,
    ServerFactory,
    every_store,
    list_tasks,
    read_lines,
    wait_until,
    wait_until_settled,
)

pytestmark = pytest.mark.e2e

CLIENT_THREADS = 16


class ClientPool:
    """One ``httpx.Client`` per thread and server, all closed together."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[httpx.Client] = []

    def get(self, server: Server) -> httpx.Client:
        """Return this thread's client for ``server``."""
        clients: dict[int, httpx.Client] = self._local.__dict__.setdefault("clients", {})
        if server.port not in clients:
            client = server.client()
            clients[server.port] = client
            with self._lock:
                self._clients.append(client)
        return clients[server.port]

    def close(self) -> None:
        """Close every client made so far."""
        for client in self._clients:
            client.close()


@contextmanager
def client_pool() -> Iterator[ClientPool]:
    pool = ClientPool()
    try:
        yield pool
    finally:
        pool.close()


@every_store
def test_idempotency_key_runs_once(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure()
    instances = [servers.start(), servers.start()]
    run_file = tmp_path / "runs.txt"

    def send(index: int) -> tuple[int, str]:
        server = instances[index % len(instances)]
        response = clients.get(server).post(
            "/keyed", params={"key": "order-42", "run_file": str(run_file)}
        )
        return response.status_code, response.json().get("task_id", response.text)

    with client_pool() as clients, ThreadPoolExecutor(CLIENT_THREADS) as executor:
        answers = list(executor.map(send, range(500)))

    with instances[0].client() as client:
        tasks = wait_until_settled(client)

    status_codes = Counter(code for code, _ in answers)
    task_ids = {task_id for _, task_id in answers}
    assert status_codes == {200: 500}
    assert len(task_ids) == 1
    assert [task["id"] for task in tasks] == list(task_ids)
    assert tasks[0]["status"] == "SUCCESS"
    assert read_lines(run_file) == list(task_ids)


@every_store
def test_instances_share_one_store(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure(runner={"max_concurrency": 20, "sync_workers": 4, "shutdown_grace": 2.0})
    # Started together, so the four processes also race to create the schema.
    instances = [servers.start(wait=False) for _ in range(4)]
    for server in instances:
        servers.wait_ready(server)
    run_file = tmp_path / "runs.txt"
    polls_done = threading.Event()
    poll_codes: Counter[int] = Counter()
    poll_errors: list[str] = []

    def add_one(index: int) -> tuple[int, str]:
        server = instances[index % len(instances)]
        response = clients.get(server).post("/record", params={"run_file": str(run_file)})
        if response.status_code != 200:
            return response.status_code, response.text
        [task_id] = response.json()["task_ids"]
        return response.status_code, task_id

    def poll(server: Server) -> None:
        # Bounded in time as well, in case the adding side hangs.
        deadline = time.monotonic() + 60.0
        with server.client() as client:
            while not polls_done.is_set() and time.monotonic() < deadline:
                try:
                    response = client.get("/tasks", params={"limit": 100})
                except httpx.HTTPError as error:
                    poll_errors.append(repr(error))
                    continue
                poll_codes[response.status_code] += 1

    pollers = [threading.Thread(target=poll, args=(server,)) for server in instances]
    for poller in pollers:
        poller.start()
    try:
        with client_pool() as clients, ThreadPoolExecutor(CLIENT_THREADS) as executor:
            answers = list(executor.map(add_one, range(800)))
        with instances[0].client() as client:
            wait_until(
                lambda: len(list_tasks(client, "SUCCESS")) == 800 or None,
                timeout=40.0,
                what="800 tasks to succeed",
                interval=0.2,
            )
            tasks = wait_until_settled(client)
    finally:
        polls_done.set()
        for poller in pollers:
            poller.join()

    add_codes = Counter(code for code, _ in answers)
    added_ids = [task_id for _, task_id in answers]
    runs = Counter(read_lines(run_file))
    owners = Counter(task["owner"] for task in tasks)
    assert add_codes == {200: 800}
    assert poll_errors == []
    assert set(poll_codes) == {200}
    assert len(tasks) == 800
    assert {task["status"] for task in tasks} == {"SUCCESS"}
    assert set(runs) == set(added_ids)
    assert set(runs.values()) == {1}
    assert sorted(owners.values()) == [200, 200, 200, 200]


@every_store
def test_workers_share_one_port(servers: ServerFactory, tmp_path: Path) -> None:
    servers.configure(runner={"max_concurrency": 20, "sync_workers": 4, "shutdown_grace": 2.0})
    server = servers.start(workers=2)
    run_file = tmp_path / "runs.txt"

    def add_one(index: int) -> int:
        response = clients.get(server).post("/record", params={"run_file": str(run_file)})
        return response.status_code

    with client_pool() as clients, ThreadPoolExecutor(CLIENT_THREADS) as executor:
        add_codes = Counter(executor.map(add_one, range(200)))
    with server.client() as client:
        wait_until(
            lambda: len(list_tasks(client, "SUCCESS")) == 200 or None,
            timeout=30.0,
            what="200 tasks to succeed",
            interval=0.2,
        )
        tasks = wait_until_settled(client)
    server.terminate()

    runs = Counter(read_lines(run_file))
    owners = Counter(task["owner"] for task in tasks)
    print(f"Tasks per worker process: {sorted(owners.values())}")
    log = server.log()
    assert add_codes == {200: 200}
    assert {task["status"] for task in tasks} == {"SUCCESS"}
    assert set(runs) == {task["id"] for task in tasks}
    assert set(runs.values()) == {1}
    assert log.count("Dispatcher started as instance") == 2
    assert log.count("Dispatcher of instance") == 2
