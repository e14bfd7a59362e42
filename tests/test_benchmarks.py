"""The benchmark suite still runs: its quick mode on the in-process section, figures unchecked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_quick_benchmark_writes_report(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--quick",
        "--sections",
        "inprocess",
        "--stores",
        "memory,sqlite",
        "--output",
        str(report),
    ]

    finished = subprocess.run(
        command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=170, check=False
    )
    text = report.read_text(encoding="utf-8") if report.exists() else ""

    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "### 1. In process" in text
    assert "### 1b. What each task's log lines cost" in text
    assert "| async | 100 | MemoryStore |" in text
    assert "| async | 100 | SQLite |" in text
    assert "failed" not in text
    assert "still active" not in text
