"""Section 5: how fast a live instance takes over the tasks of an instance that was killed.

The killed instance is simulated in the store: it holds a lease and owns the given number
of PENDING tasks. Its lease is set to expire a moment (``expires_in``) after the live
instance started, as if the instance had died ``lease expiry - expires_in`` seconds before.
The live instance is an app-taskflow app started in this process with the lease settings
given. The figures count from the moment the dead lease expired: until no task is PENDING
any more (each is running again or done), and until every task ended.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from time import perf_counter
from typing import Any

from benchmarks.apps import ASYNC_TASK_NAME, build_taskflow_app
from benchmarks.backends import LABELS, STORE_NAMES, fresh_store
from benchmarks.plan import Context, Plan, attempt, skipped_reason
from benchmarks.report import Table, TargetCheck, format_number

DEAD_INSTANCE = "benchmark-killed-instance"
GRACE = 5.0
"""Seconds after the lease expiry by which every task should run again (the target)."""
CREATE_BATCH = 1000
_POLL_INTERVAL = 0.05


@dataclass
class RecoveryRun:
    """The figures of one recovery, as seconds after the dead lease expired.

    Attributes:
        tasks: orphaned tasks.
        claimed_after: until no task was PENDING, or ``None`` if not within the limit.
        finished_after: until every task ended, or ``None`` if not within the limit.
        ended_by_target: tasks ended ``GRACE`` seconds after the expiry.
        ended_at_end: tasks ended when the measurement stopped.
        seconds_measured: from the expiry to the end of the measurement.
        problem: what went wrong, if anything.
    """

    tasks: int
    claimed_after: float | None = None
    finished_after: float | None = None
    ended_by_target: int | None = None
    ended_at_end: int | None = None
    seconds_measured: float = 0.0
    problem: str | None = None

    def estimated_finish(self) -> float | None:
        """Estimate when all tasks end, at the rate seen since the expiry, if they did not."""
        if self.finished_after is not None or not self.ended_at_end:
            return None
        return self.seconds_measured * self.tasks / self.ended_at_end


async def measure(
    store: dict[str, Any],
    tasks: int,
    settings: dict[str, Any],
    expires_in: float,
    time_limit: float,
) -> RecoveryRun:
    """Orphan ``tasks`` tasks in a fresh store and time their recovery by a live instance.

    Args:
        store: the ``store`` configuration of a new, empty store.
        tasks: orphaned PENDING tasks to create.
        settings: configuration sections of the live instance (``leases`` matters).
        expires_in: seconds from the live instance's start to the dead lease's expiry.
        time_limit: seconds after the dead lease expired at which the run stops waiting.
    """
    from app_taskflow import TaskflowContainer
    from app_taskflow.config import parse_settings
    from app_taskflow.models import TaskQuery, TaskRecord, TaskStatus, new_task_id, utcnow

    # The dead instance's own view of the store; a MemoryStore is shared with the live one.
    dead_container = TaskflowContainer.from_settings(parse_settings({"store": store}))
    dead_store = dead_container.store()
    await dead_store.open()
    now = utcnow()
    await dead_store.heartbeat(DEAD_INSTANCE, now, now + timedelta(minutes=10))
    for start in range(0, tasks, CREATE_BATCH):
        created_at = utcnow()
        records = [
            TaskRecord(
                id=new_task_id(),
                name=ASYNC_TASK_NAME,
                status=TaskStatus.PENDING,
                created_at=created_at,
                owner=DEAD_INSTANCE,
            )
            for _ in range(min(CREATE_BATCH, tasks - start))
        ]
        await dead_store.create(records)

    shared = dead_store if store["kind"] == "memory" else None
    app, taskflow = build_taskflow_app(store, settings, store_instance=shared)
    run = RecoveryRun(tasks=tasks)
    pending = TaskQuery(statuses=[TaskStatus.PENDING], limit=1)
    active = TaskQuery(statuses=[TaskStatus.PENDING, TaskStatus.RUNNING], limit=1)
    try:
        async with taskflow.lifespan(app):
            # Set only now, so that the live instance's start-up recovery found the lease valid
            # and the tasks are taken back by its heartbeat loop, as after a real crash.
            expires_at = utcnow() + timedelta(seconds=expires_in)
            await dead_store.heartbeat(DEAD_INSTANCE, utcnow(), expires_at)
            expiry = perf_counter() + (expires_at - utcnow()).total_seconds()
            live_store = taskflow.store
            while perf_counter() < expiry + time_limit:
                await asyncio.sleep(_POLL_INTERVAL)
                if run.ended_by_target is None and perf_counter() >= expiry + GRACE:
                    metrics = await live_store.metrics()
                    run.ended_by_target = metrics.counts[TaskStatus.SUCCESS]
                if run.claimed_after is None and not (await live_store.list(pending)).items:
                    run.claimed_after = perf_counter() - expiry
                if run.claimed_after is not None and not (await live_store.list(active)).items:
                    run.finished_after = perf_counter() - expiry
                    break
            run.seconds_measured = perf_counter() - expiry
            metrics = await live_store.metrics()
            run.ended_at_end = metrics.counts[TaskStatus.SUCCESS]
            if run.ended_by_target is None:
                run.ended_by_target = run.ended_at_end
            if run.finished_after is None:
                run.problem = f"tasks were still active {time_limit:g} s after the expiry"
    finally:
        if shared is None:
            await dead_store.close()
    return run


async def run_section(context: Context) -> None:
    """Run section 5 and add its table and targets."""
    plan = context.plan
    from app_taskflow.config import LeaseSettings

    leases = LeaseSettings(**plan.recovery_settings.get("leases", {}))
    table = Table(
        f"5. Recovery of {plan.recovery_tasks:,} PENDING tasks of a killed instance",
        [
            "store",
            "all running again or ended (s after lease expiry)",
            "all ended (s after lease expiry)",
            f"ended by expiry + {GRACE:g} s",
            "ended when measuring stopped",
        ],
    )
    for store in STORE_NAMES:
        reason = skipped_reason(context, store)
        if reason is not None:
            table.add(LABELS[store], reason, "-", "-", "-")
            context.checks.append(_recovery_check(plan, store, None, reason))
            continue

        async def run(store: str = store) -> RecoveryRun:
            with fresh_store(store, context.folder, context.servers) as config:
                return await measure(
                    config,
                    plan.recovery_tasks,
                    plan.recovery_settings,
                    plan.recovery_expires_in,
                    plan.recovery_time_limit,
                )

        result = await attempt(f"recovery, {store}", run)
        if isinstance(result, str):
            table.add(LABELS[store], result, "-", "-", "-")
            context.checks.append(_recovery_check(plan, store, None, result))
            continue
        limit = f"not within {plan.recovery_time_limit:g}"
        estimate = result.estimated_finish()
        finished = limit if estimate is None else f"{limit} (about {estimate:,.0f} at that rate)"
        table.add(
            LABELS[store],
            limit if result.claimed_after is None else format_number(result.claimed_after, 2),
            finished if result.finished_after is None else format_number(result.finished_after, 2),
            "-" if result.ended_by_target is None else f"{result.ended_by_target:,}",
            "-"
            if result.ended_at_end is None
            else f"{result.ended_at_end:,} after {result.seconds_measured:.0f} s",
        )
        context.checks.append(_recovery_check(plan, store, result, ""))
    table.notes += [
        "Leases of the live instance: heartbeat every "
        f"{leases.heartbeat_interval:g} s, expiry {leases.expiry:g} s, poll for "
        f"ownerless tasks every {leases.poll_interval:g} s"
        + (" (the library's defaults)." if not plan.recovery_settings else "."),
        f"The killed instance's lease expires {plan.recovery_expires_in:g} s after the live "
        "instance started; times count from that expiry. Tasks are trivial async tasks. "
        "'At that rate' extrapolates the tasks ended per second since the expiry: an estimate.",
    ]
    context.tables.append(table)


def _recovery_check(plan: Plan, store: str, run: RecoveryRun | None, reason: str) -> TargetCheck:
    target = f"recovery of {plan.recovery_tasks:,} tasks, {LABELS[store]}"
    goal = f"all running again by lease expiry + {GRACE:g} s"
    if run is None:
        return TargetCheck(target, goal, "-", None, reason)
    if run.claimed_after is None:
        figure = f"{run.ended_at_end or 0:,} ended within {run.seconds_measured:.0f} s"
        estimate = run.estimated_finish()
        if estimate is not None:
            figure += f", all in about {estimate:,.0f} s at that rate"
        return TargetCheck(target, goal, figure, False)
    return TargetCheck(
        target, goal, f"expiry + {run.claimed_after:.1f} s", run.claimed_after <= GRACE
    )
