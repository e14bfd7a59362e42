"""A custom task store: JsonFileStore keeps tasks in memory and in one JSON file.

This example shows how to write a store for app-taskflow. It implements every method of
``TaskStore`` and passes the store contract suite, reusing what the library shares between
its own stores:

- the record rules in ``app_taskflow.stores.records`` (``apply_outcome``, ``take_back``,
  ``requeue`` and the ``check_*`` functions), so that a finish, a recovery or a retry
  changes a task exactly as the built-in stores do;
- ``ChangeFanout`` from ``app_taskflow.events`` for ``watch()``;
- ``build_metrics`` from ``app_taskflow.stores.base`` for ``metrics()``.

``json_file_store.py`` contains the store, with comments on how it keeps each method
atomic, saves before it returns and undoes the changes of a failed save.
``snapshot_file.py`` contains the file itself: its format, the lock that keeps a second
process out, and the atomic write (a temporary file, fsync, then ``os.replace``).

Use it in an app by overriding the container's store before the app starts::

    from dependency_injector import providers

    from app_taskflow import TaskflowContainer
    from examples.custom_store import JsonFileStore

    container = TaskflowContainer.from_environment()
    container.store.override(providers.Singleton(JsonFileStore, "var/tasks.json"))
    taskflow = container.taskflow()

It suits one process that needs its task history across restarts and no database. It
declares ``supports_multiple_instances = False``: run one uvicorn worker, since a second
process fails to open the file. Every change rewrites the whole file, so keep the history
short: app-taskflow deletes no task by itself, so call ``taskflow.store.prune(...)`` from a
periodic job of your own.

Tests: ``pytest tests/stores -k example-json`` runs the contract suite against it, and
``pytest examples/custom_store`` runs the tests of what the file adds: a restart, the lock,
failed and cancelled saves, and the group commit. The guide is ``docs/custom-store.md``.
"""

from examples.custom_store.json_file_store import JsonFileStore

__all__ = ["JsonFileStore"]
