"""Result tables, target checks and the machine description, printed as Markdown."""

from __future__ import annotations

import datetime
import math
import os
import platform
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata


@dataclass
class Table:
    """One Markdown table of a section, with the notes printed under it."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append a row; each cell is printed with ``str()``."""
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        """Return the title, the table and its notes as Markdown."""
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("| " + " | ".join("---" for _ in self.header) + " |")
        lines.extend("| " + " | ".join(row) + " |" for row in self.rows)
        if self.notes:
            lines.append("")
            lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass
class TargetCheck:
    """A figure set against its target.

    ``met`` is ``None`` when the figure could not be measured; ``reason`` then gives the cause.
    """

    target: str
    goal: str
    figure: str
    met: bool | None
    reason: str = ""

    @property
    def verdict(self) -> str:
        """The check's outcome as printed in the table."""
        if self.met is None:
            return f"not measured yet: {self.reason}" if self.reason else "not measured yet"
        return "met" if self.met else "**not met**"


def targets_table(checks: Sequence[TargetCheck]) -> Table:
    """Return the table of every target with its figure and verdict."""
    table = Table("Targets", ["target", "goal", "figure", "verdict"])
    for check in checks:
        table.add(check.target, check.goal, check.figure, check.verdict)
    return table


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (any order); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def format_number(value: float | None, digits: int = 1) -> str:
    """Format a figure with thousands separators, or a dash when it is missing."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def format_ratio(value: float | None) -> str:
    """Format a ratio such as ``1.23x``, or a dash when it is missing."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.2f}x"


def describe_machine() -> list[str]:
    """Return lines that name the CPU, memory, OS and the versions of what was measured."""
    cpu = _lscpu_field("Model name") or platform.processor() or "unknown CPU"
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} logical CPUs "
        f"({_lscpu_field('Thread(s) per core') or '?'} thread(s) per core)",
        f"Memory: {_memory_total()}",
        f"OS: {platform.platform()}",
        f"Python {platform.python_version()} ({sys.implementation.name}), "
        f"SQLite {sqlite3.sqlite_version}",
        "Packages: "
        + ", ".join(
            f"{name} {_version(name)}"
            for name in (
                "app-taskflow",
                "fastapi",
                "starlette",
                "uvicorn",
                "httpx",
                "pydantic",
                "sqlalchemy",
                "psycopg",
                "redis",
                "loguru",
            )
        ),
    ]
    git = _command_output(["git", "rev-parse", "--short", "HEAD"])
    if git:
        dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
        lines.append(f"app-taskflow commit: {git}{' with uncommitted changes' if dirty else ''}")
    lines.append(f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    return lines


def _lscpu_field(name: str) -> str | None:
    output = _command_output(["lscpu"])
    for line in (output or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def _memory_total() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _command_output(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None
