"""Fresh stores for each measurement: a SQLite file, a PostgreSQL database or a Redis prefix."""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORE_NAMES = ("memory", "sqlite", "redis", "postgres")
"""Every store the benchmarks know, in the order the tables list them."""

LABELS = {
    "plain": "plain BackgroundTasks",
    "memory": "MemoryStore",
    "sqlite": "SQLite",
    "redis": "Redis",
    "postgres": "PostgreSQL",
}


@dataclass(frozen=True)
class Servers:
    """The addresses of the Redis and PostgreSQL servers.

    Attributes:
        redis_url: the Redis database that stores use, under a random key prefix.
        postgres_admin_url: an existing database to connect to when creating and dropping
            the benchmark's own databases; the same user and host serve those.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    postgres_admin_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"


def server_versions(servers: Servers) -> list[str]:
    """Return the versions of the Redis and PostgreSQL servers, or why they are unknown."""
    versions: list[str] = []
    if importlib.util.find_spec("psycopg") is not None:
        import psycopg

        try:
            with psycopg.connect(servers.postgres_admin_url, connect_timeout=3) as connection:
                row = connection.execute("SHOW server_version").fetchone()
                versions.append(f"PostgreSQL {row[0] if row else '?'}")
        except psycopg.Error as error:
            versions.append(f"PostgreSQL not reachable ({type(error).__name__})")
    if importlib.util.find_spec("redis") is not None:
        import redis

        try:
            with redis.Redis.from_url(servers.redis_url, socket_connect_timeout=3) as client:
                versions.append(f"Redis {client.info('server')['redis_version']}")
        except redis.RedisError as error:
            versions.append(f"Redis not reachable ({type(error).__name__})")
    return versions


def unavailable_reason(name: str, servers: Servers) -> str | None:
    """Return why store ``name`` cannot be measured here, or ``None`` when it can."""
    if name in ("memory", "sqlite"):
        return None
    if name == "redis":
        if importlib.util.find_spec("app_taskflow.stores.redis") is None:
            return "app_taskflow has no Redis store yet (no app_taskflow/stores/redis.py)"
        if importlib.util.find_spec("redis") is None:
            return "the redis package is missing: pip install 'app-taskflow[redis]'"
        import redis

        try:
            with redis.Redis.from_url(servers.redis_url, socket_connect_timeout=3) as client:
                client.ping()
        except redis.RedisError as error:
            return f"Redis is not reachable at {servers.redis_url}: {error}"
        return None
    if name == "postgres":
        if importlib.util.find_spec("psycopg") is None:
            return "the psycopg package is missing: pip install 'app-taskflow[postgres]'"
        import psycopg

        try:
            psycopg.connect(servers.postgres_admin_url, connect_timeout=3).close()
        except psycopg.Error as error:
            return f"PostgreSQL is not reachable at {servers.postgres_admin_url}: {error}"
        return None
    raise ValueError(f"Unknown store {name!r}: expected one of {', '.join(STORE_NAMES)}.")


@contextmanager
def fresh_store(name: str, folder: Path, servers: Servers) -> Iterator[dict[str, Any]]:
    """Yield the ``store`` configuration of a new, empty store; remove the store afterwards.

    SQLite gets a new file in ``folder``; PostgreSQL a database ``taskflow_bench_<random>``,
    dropped at the end; Redis a key prefix ``taskflow-bench-<random>``, whose keys are
    deleted at the end.
    """
    token = secrets.token_hex(6)
    if name == "memory":
        yield {"kind": "memory"}
    elif name == "sqlite":
        path = folder / f"tasks-{token}.db"
        try:
            yield {"kind": "sqlite", "path": str(path)}
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    elif name == "postgres":
        with _postgres_database(f"taskflow_bench_{token}", servers) as url:
            yield {"kind": "postgres", "url": url}
    elif name == "redis":
        prefix = f"taskflow-bench-{token}"
        try:
            yield {"kind": "redis", "url": servers.redis_url, "prefix": prefix}
        finally:
            _delete_redis_keys(prefix, servers.redis_url)
    else:
        raise ValueError(f"Unknown store {name!r}: expected one of {', '.join(STORE_NAMES)}.")


def sqlalchemy_url(store: dict[str, Any]) -> str:
    """Return the SQLAlchemy URL of a SQLite or PostgreSQL store configuration."""
    if store["kind"] == "sqlite":
        return f"sqlite:///{store['path']}"
    rest = str(store["url"]).partition("://")[2]
    return f"postgresql+psycopg://{rest}"


@contextmanager
def _postgres_database(database: str, servers: Servers) -> Iterator[str]:
    import psycopg
    from psycopg import conninfo, sql

    with psycopg.connect(servers.postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        try:
            parts = conninfo.conninfo_to_dict(servers.postgres_admin_url)
            user = parts.get("user", "postgres")
            password = f":{parts['password']}" if parts.get("password") else ""
            host = parts.get("host", "127.0.0.1")
            port = parts.get("port", 5432)
            yield f"postgresql://{user}{password}@{host}:{port}/{database}"
        finally:
            # FORCE ends the connections that a stopped server process may have left.
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )


def _delete_redis_keys(prefix: str, url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
