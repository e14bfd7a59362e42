"""Start the signup example on SQLite, send it a few requests and print the tasks they added.

Run it from a clone with ``make demo``, or with ``.venv/bin/python examples/demo.py``. The
app runs under uvicorn in the development environment (tasks in ``var/taskflow.db``), and
keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from app_taskflow.models import TERMINAL_STATUSES

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 30.0
"""Seconds to wait for the server's first response."""
REPORT_FAILURE_RATE = 0.6
"""Fraction of ``build_report`` attempts that fail in the demo."""
STOP_TIMEOUT = 30.0
"""Seconds the server gets to stop after Ctrl-C: the shutdown grace (10 s) plus margin."""


def main() -> int:
    """Run the demo and return its exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the demo's tasks to end (default: 60)",
    )
    options = parser.parse_args()
    # Keep this script's lines in order with the server's log lines when output is piped.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    base_url = f"http://{options.host}:{options.port}"

    if not port_is_free(options.host, options.port):
        print(
            f"Port {options.port} on {options.host} is in use. Stop what listens there, or "
            "pick another port: make demo PORT=8001",
            file=sys.stderr,
        )
        return 1

    # SIGTERM stops the demo the way Ctrl-C does, so the server is never left behind.
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    server = start_server(options.host, options.port, base_url)
    try:
        wait_until_up(server, base_url)
        with httpx.Client(base_url=base_url, timeout=10.0, trust_env=False) as client:
            task_ids = send_requests(client)
            tasks = wait_until_settled(client, task_ids, options.settle_timeout)
            print_tasks(tasks)
            events = client.get("/webhooks/signup").json()
            print(f"\nThe webhook receiver of the app got {len(events)} signup event(s).")
        print_urls(base_url, tasks)
        return server.wait()
    except KeyboardInterrupt:
        print("\nStopping the server...")
        return 0
    finally:
        stop_server(server)


def raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Turn a signal into ``KeyboardInterrupt``."""
    raise KeyboardInterrupt


def port_is_free(host: str, port: int) -> bool:
    """Return whether ``host:port`` can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def start_server(host: str, port: int, base_url: str) -> subprocess.Popen[bytes]:
    """Start uvicorn with the signup example in the development environment."""
    env = os.environ.copy()
    env["APP_TASKFLOW_ENV"] = "development"
    env["SIGNUP_WEBHOOK_URL"] = f"{base_url}/webhooks/signup"
    # The webhook task calls this server over loopback, which a configured HTTP proxy must
    # not intercept.
    env["NO_PROXY"] = ",".join(filter(None, [host, "localhost", env.get("NO_PROXY")]))
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "examples.signup.app:app",
        "--host",
        host,
        "--port",
        str(port),
        "--no-access-log",
    ]
    print(f"Starting the signup example on {base_url} (tasks in var/taskflow.db)")
    # A session of its own keeps the terminal's Ctrl-C away from uvicorn, so that it gets
    # exactly one SIGINT, from stop_server(), and shuts down gracefully.
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


def wait_until_up(server: subprocess.Popen[bytes], base_url: str) -> None:
    """Poll the server until it responds.

    Raises:
        SystemExit: the server exited, or did not respond within ``STARTUP_TIMEOUT``.
    """
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"The server exited with status {server.returncode} at startup.")
        try:
            httpx.get(f"{base_url}/tasks/metrics", timeout=1.0, trust_env=False)
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        return
    raise SystemExit(f"The server did not respond within {STARTUP_TIMEOUT:.0f} s.")


def send_requests(client: httpx.Client) -> list[str]:
    """Sign up two users, request four reports and return the ids of the tasks added."""
    run = uuid.uuid4().hex[:6]
    task_ids: list[str] = []

    print("\nSending requests:")
    for user in ("ada", "grace"):
        email = f"{user}+{run}@example.com"
        body = post(client, "/signup", params={"email": email})
        task_ids += [body["task_id"], body["webhook_task_id"]]

    # build_report fails at random, 60 % of the time here, and is retried up to 3 times, so
    # most runs show retries and some show a report that FAILED after its 4 attempts.
    for number in range(1, 5):
        body = post(
            client, f"/reports/{run}-{number}", params={"failure_rate": REPORT_FAILURE_RATE}
        )
        task_ids.append(body["task_id"])

    # The report id is the idempotency key, so asking again returns the same task.
    again = post(client, f"/reports/{run}-1", params={"failure_rate": REPORT_FAILURE_RATE})
    same = "the same task" if again["task_id"] == task_ids[4] else "a new task"
    print(f"  Report {run}-1 requested twice: {same}")
    return task_ids


def post(client: httpx.Client, path: str, params: dict[str, Any]) -> dict[str, str]:
    """Send one POST request, print it and its response, and return the JSON body."""
    response = client.post(path, params=params)
    response.raise_for_status()
    body: dict[str, str] = response.json()
    query = "&".join(f"{key}={value}" for key, value in params.items())
    print(f"  POST {path}?{query} -> {response.status_code} {body}")
    return body


def wait_until_settled(
    client: httpx.Client, task_ids: list[str], timeout: float
) -> list[dict[str, Any]]:
    """Poll ``GET /tasks`` until every task in ``task_ids`` has ended, or ``timeout`` passes.

    Returns:
        The listed tasks among ``task_ids``, newest first.
    """
    print("\nWaiting for the tasks to end (a failed report is retried after 0.5, 1 and 2 s)")
    expected_ids = set(task_ids)
    deadline = time.monotonic() + timeout
    while True:
        # The newest tasks come first, and the demo's tasks are the newest ones.
        response = client.get("/tasks", params={"limit": 100})
        response.raise_for_status()
        tasks = [task for task in response.json()["items"] if task["id"] in expected_ids]
        settled = all(task["status"] in TERMINAL_STATUSES for task in tasks)
        if (settled and len(tasks) == len(expected_ids)) or time.monotonic() > deadline:
            return tasks
        time.sleep(0.5)


def print_tasks(tasks: list[dict[str, Any]]) -> None:
    """Print one line per task: id, name, status and attempts."""
    name_width = max((len(task["name"]) for task in tasks), default=4)
    print(f"\nGET /tasks (the demo's {len(tasks)} tasks, newest first):")
    print(f"  {'id':36}  {'name':{name_width}}  {'status':11}  attempts")
    for task in tasks:
        attempts = f"{task['attempts']} of {task['max_attempts']}"
        print(f"  {task['id']:36}  {task['name']:{name_width}}  {task['status']:11}  {attempts}")


def print_urls(base_url: str, tasks: list[dict[str, Any]]) -> None:
    """Print the pages to open while the server runs, showing the task with most attempts."""
    task_id = max(tasks, key=lambda task: task["attempts"])["id"]
    pages = [
        ("the dashboard: live tasks, logs, actions", "/tasks/dashboard"),
        ("every task, newest first", "/tasks"),
        ("one task, with its logs and attempts", f"/tasks/{task_id}"),
        ("counts, success rate and durations", "/tasks/metrics"),
        ("the API docs, to retry or cancel a task", "/docs"),
    ]
    print("\nOpen:")
    for description, path in pages:
        print(f"  {description:40} {base_url}{path}")

    failed = [task["id"] for task in tasks if task["status"] == "FAILED"]
    if failed:
        print(
            "\nRun a FAILED task again: curl -X POST -H 'X-Taskflow-Request: 1' "
            f"{base_url}/tasks/{failed[0]}/retry"
        )
    print("\nThe server keeps running. Press Ctrl-C to stop it.")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """Ask uvicorn to shut down gracefully; kill it if it has not within ``STOP_TIMEOUT``."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        server.kill()
        server.wait()


if __name__ == "__main__":
    sys.exit(main())
