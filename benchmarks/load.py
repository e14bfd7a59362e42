"""The load generator: HTTP/1.1 requests from their own process, bounded in count and time.

Run as ``python -m benchmarks.load --port PORT --path /ping ...`` (``--help`` lists the
options); it prints latency percentiles as one JSON line. Without ``--rate`` it keeps
``--concurrency`` requests in flight (closed loop). With ``--rate`` it sends requests at
that rate however long the responses take (open loop), until ``--requests`` were sent,
``--max-seconds`` passed or it receives SIGTERM. The latency of such a request counts from
the moment it was due, so time spent waiting for a free connection counts too.

It speaks HTTP over plain asyncio streams rather than through httpx: on the 2-core machine
of docs/benchmarks.md, httpx used about 1.2 ms of CPU per request and these streams about
40 µs, so an httpx client would have set the pace near 800 requests/s instead of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from benchmarks.report import percentile

HOST = "127.0.0.1"


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a request and reads its whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        """Connect to the server on ``HOST:port``."""
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def request(self, payload: bytes) -> int:
        """Send one encoded request, read the response and return its status code."""
        self._writer.write(payload)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            await self._read_chunked_body()
        elif length:
            await self._reader.readexactly(length)
        return status

    async def close(self) -> None:
        """Close the connection."""
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

    async def _read_chunked_body(self) -> None:
        while True:
            size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await self._reader.readexactly(size + 2)
            if size == 0:
                return


def encode_request(method: str, path: str, port: int) -> bytes:
    """Return the bytes of an HTTP/1.1 request without body."""
    return (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 0\r\n\r\n").encode(
        "ascii"
    )


async def fetch_status(port: int, method: str, path: str) -> int:
    """Send one request on a new connection and return the status code."""
    connection = await Connection.open(port)
    try:
        return await connection.request(encode_request(method, path, port))
    finally:
        await connection.close()


@dataclass
class LoadResult:
    """The results of a load run: latencies in seconds and the outcome of every request."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    seconds: float = 0.0

    def record(self, status: int, latency: float) -> None:
        """Count a response; only 2xx responses add a latency."""
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.latencies.append(latency)
        else:
            self.errors += 1

    def summary(self) -> dict[str, Any]:
        """Return the figures as a JSON-ready dict, latencies in milliseconds."""
        ok = len(self.latencies)
        return {
            "ok": ok,
            "errors": self.errors,
            "statuses": {str(status): count for status, count in sorted(self.statuses.items())},
            "seconds": self.seconds,
            "requests_per_second": ok / self.seconds if self.seconds else 0.0,
            "p50_ms": percentile(self.latencies, 0.50) * 1000,
            "p95_ms": percentile(self.latencies, 0.95) * 1000,
            "p99_ms": percentile(self.latencies, 0.99) * 1000,
            "max_ms": max(self.latencies, default=float("nan")) * 1000,
        }


async def closed_loop(
    port: int, payload: bytes, requests: int, concurrency: int, max_seconds: float
) -> LoadResult:
    """Send ``requests`` requests with ``concurrency`` in flight; stop early at ``max_seconds``."""
    result = LoadResult()
    remaining = requests
    started = perf_counter()
    deadline = started + max_seconds

    async def worker() -> None:
        nonlocal remaining
        connection = await Connection.open(port)
        try:
            while remaining > 0 and perf_counter() < deadline:
                remaining -= 1
                sent = perf_counter()
                try:
                    status = await connection.request(payload)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    result.errors += 1
                    await connection.close()
                    connection = await Connection.open(port)
                    continue
                result.record(status, perf_counter() - sent)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = perf_counter() - started
    return result


async def open_loop(
    port: int,
    payload: bytes,
    rate: float,
    requests: int,
    concurrency: int,
    max_seconds: float,
    stop: asyncio.Event,
) -> LoadResult:
    """Send requests at ``rate`` per second over up to ``concurrency`` connections."""
    result = LoadResult()
    connections: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(concurrency):
        connections.put_nowait(await Connection.open(port))
    in_flight: set[asyncio.Task[None]] = set()

    async def send(due: float) -> None:
        connection = await connections.get()
        try:
            status = await connection.request(payload)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            await connection.close()
            connection = await Connection.open(port)
        else:
            result.record(status, perf_counter() - due)
        connections.put_nowait(connection)

    started = perf_counter()
    sent = 0
    while sent < requests and not stop.is_set():
        due = started + sent / rate
        if due - started > max_seconds:
            break
        wait = due - perf_counter()
        if wait > 0:
            try:
                await asyncio.wait_for(stop.wait(), wait)
                break
            except TimeoutError:
                pass
        task = asyncio.create_task(send(due))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        sent += 1
    await asyncio.gather(*in_flight)
    result.seconds = perf_counter() - started
    while not connections.empty():
        await connections.get_nowait().close()
    return result


def _command(
    port: int, method: str, path: str, requests: int, concurrency: int, max_seconds: float
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.load",
        f"--port={port}",
        f"--method={method}",
        f"--path={path}",
        f"--requests={requests}",
        f"--concurrency={concurrency}",
        f"--max-seconds={max_seconds}",
    ]


async def run_closed_loop(
    port: int, method: str, path: str, requests: int, concurrency: int, max_seconds: float
) -> dict[str, Any]:
    """Run a closed-loop load in a new process and return its summary.

    Raises:
        RuntimeError: the load process failed; the message quotes its stderr.
    """
    process = await asyncio.create_subprocess_exec(
        *_command(port, method, path, requests, concurrency, max_seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"The load process failed: {stderr.decode(errors='replace')}")
    summary: dict[str, Any] = json.loads(stdout)
    return summary


class OpenLoopProcess:
    """An open-loop load in its own process, which runs until ``stop()`` or its time limit."""

    def __init__(
        self, port: int, path: str, rate: float, concurrency: int, max_seconds: float
    ) -> None:
        self._command = [
            *_command(port, "GET", path, 10**9, concurrency, max_seconds),
            f"--rate={rate}",
        ]
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start the process and wait until its connections are open."""
        self._process = await asyncio.create_subprocess_exec(
            *self._command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert self._process.stderr is not None
        line = await self._process.stderr.readline()
        if line.strip() != b"started":
            rest = await self._process.stderr.read()
            raise RuntimeError(f"The load process failed: {(line + rest).decode()}")

    async def stop(self) -> dict[str, Any]:
        """Stop sending, wait for the responses in flight and return the summary."""
        process = self._process
        assert process is not None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        stdout, stderr = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"The load process failed: {stderr.decode(errors='replace')}")
        summary: dict[str, Any] = json.loads(stdout)
        return summary


async def _main(options: argparse.Namespace) -> dict[str, Any]:
    payload = encode_request(options.method, options.path, options.port)
    if options.rate is None:
        result = await closed_loop(
            options.port, payload, options.requests, options.concurrency, options.max_seconds
        )
    else:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("started", file=sys.stderr, flush=True)
        result = await open_loop(
            options.port,
            payload,
            options.rate,
            options.requests,
            options.concurrency,
            options.max_seconds,
            stop,
        )
    return result.summary()


def main() -> None:
    """Parse the options, run the load and print the summary as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="server port on 127.0.0.1")
    parser.add_argument("--method", default="GET", help="HTTP method (default GET)")
    parser.add_argument("--path", required=True, help="path and query, such as /ping")
    parser.add_argument("--requests", type=int, default=10_000, help="requests to send at most")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (default 16)")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop sending after this many seconds"
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="requests per second (open loop); unset: closed"
    )
    options = parser.parse_args()
    print(json.dumps(asyncio.run(_main(options))), flush=True)


if __name__ == "__main__":
    main()
