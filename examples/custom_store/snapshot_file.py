"""The JSON file of JsonFileStore: its format, its lock, and writes that a crash cannot tear."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel

from app_taskflow.errors import SchemaVersionError, StoreError
from app_taskflow.models import TaskRecord

FORMAT_VERSION = 1
"""Version of the file layout that this code reads and writes."""


class Snapshot(BaseModel):
    """The content of the JSON file: every task with its logs and attempt history."""

    format: int
    tasks: list[TaskRecord]


def dump_snapshot(tasks: Iterable[TaskRecord]) -> bytes:
    """Serialize ``tasks`` to the content of the file."""
    return Snapshot(format=FORMAT_VERSION, tasks=list(tasks)).model_dump_json().encode()


def lock_exclusively(path: Path) -> BinaryIO:
    """Open ``<path>.lock`` and lock it, so that no other store uses ``path`` meanwhile.

    Creates the folder of ``path`` when it is missing.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = path.with_name(f"{path.name}.lock").open("ab")
    except OSError as error:
        raise StoreError(f"Opening the task file {path} failed: {error}.") from error
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        lock_file.close()
        raise StoreError(
            f"The task file {path} is already open in another JsonFileStore, in this process "
            "or another one. It cannot be shared: run one process, or use SqlStore to share "
            "tasks between processes."
        ) from error
    return lock_file


def read_snapshot(path: Path) -> bytes:
    """Return the content of ``path``, or an empty snapshot when the file does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return dump_snapshot([])
    except OSError as error:
        raise StoreError(f"Reading tasks from {path} failed: {error}.") from error


def parse_snapshot(path: Path, data: bytes) -> list[TaskRecord]:
    """Return the tasks in ``data``, the content of ``path``.

    Raises:
        SchemaVersionError: the file has a newer format than ``FORMAT_VERSION``.
        StoreError: the content is not a file of this store.
    """
    try:
        content = json.loads(data)
    except ValueError as error:
        raise StoreError(_invalid_file_message(path)) from error
    version = content.get("format") if isinstance(content, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise SchemaVersionError(
            f"The task file {path} has format {version}, but this JsonFileStore reads format "
            f"{FORMAT_VERSION}. Run the newer code that wrote it, or move the file away."
        )
    try:
        return Snapshot.model_validate(content).tasks
    except ValueError as error:
        raise StoreError(_invalid_file_message(path)) from error


def _invalid_file_message(path: Path) -> str:
    # The cause is left out of the message: it may quote task arguments, which may be
    # personal data.
    return (
        f"The task file {path} is not a JsonFileStore file (see the cause for the first "
        "invalid part). Restore it from a backup, or move it away to start with no tasks."
    )


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file."""
    # mkstemp creates the file readable by its owner only: task arguments may be private.
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            # Without this, a power failure after the rename could leave an empty file.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    # The rename is a change of the folder, which needs its own fsync to be durable. If this
    # fsync fails, the save counts as failed although the new file is in place.
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
