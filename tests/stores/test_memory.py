"""Tests of MemoryStore beyond the contract: a watcher that falls behind."""

from __future__ import annotations

import asyncio

from contract_support import Clock, RecordFactory

from app_taskflow.events import WATCH_BUFFER
from app_taskflow.models import LogEntry, TaskChange, TaskStatus
from app_taskflow.stores.memory import MemoryStore


async def test_watch_behind_gets_resync(make_record: RecordFactory, clock: Clock) -> None:
    store = MemoryStore()
    record = make_record()
    changes = store.watch()
    try:
        first = asyncio.ensure_future(anext(changes))
        await asyncio.sleep(0)
        await store.create([record])
        assert (await asyncio.wait_for(first, 5)).task_id == record.id

        # One change more than the buffer holds, published before the watcher reads any.
        entries = [
            LogEntry(timestamp=clock(1), message=f"line {number}")
            for number in range(WATCH_BUFFER + 1)
        ]
        await store.append_logs(record.id, entries)
        await store.cancel(record.id, clock(2))

        resync = await asyncio.wait_for(anext(changes), 5)
        after = await asyncio.wait_for(anext(changes), 5)
    finally:
        await changes.aclose()

    assert resync == TaskChange(resync=True)
    assert after.summary is not None
    assert after.summary.status == TaskStatus.CANCELLED
