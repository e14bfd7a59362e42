"""Errors raised by app-taskflow.

Every error derives from ``TaskflowError``::

    TaskflowError
    ├── ConfigurationError          a configuration file or value is invalid
    ├── TaskDefinitionError         a task is declared or registered wrongly
    │   └── NotATaskError           a plain function was given where a task is expected
    ├── TaskArgumentError           an argument cannot make the round trip through the store
    ├── IdempotencyConflictError    a key is reused with different arguments
    ├── TaskStateError              an action does not fit the task's current status
    ├── TaskNotFoundError           no task has the given id
    ├── NotInstalledError           ``TaskflowTasks`` is used in an app without ``install()``
    ├── MissingExtraError           an optional driver is not installed
    └── StoreError                  the store failed (driver errors are translated to this)
        ├── StoreUnavailableError   the store cannot be reached; retrying later may work
        └── SchemaVersionError      the store's schema is newer than this code
"""

from __future__ import annotations


class TaskflowError(Exception):
    """Root of every error that app-taskflow raises."""


class ConfigurationError(TaskflowError):
    """Raised at startup when a configuration file or value is invalid."""


class TaskDefinitionError(TaskflowError):
    """Raised when a task is declared with invalid options or under a name already taken."""


class NotATaskError(TaskDefinitionError):
    """Raised when ``add_task`` receives a function that is not decorated as a task."""


class TaskArgumentError(TaskflowError):
    """Raised by ``add_task`` when an argument cannot be stored and restored with its type."""


class IdempotencyConflictError(TaskflowError):
    """Raised when an idempotency key is reused for a task with different arguments."""


class TaskStateError(TaskflowError):
    """Raised when retry or cancel is requested for a task whose status does not allow it."""


class TaskNotFoundError(TaskflowError):
    """Raised when no task with the given id exists in the store."""


class NotInstalledError(TaskflowError):
    """Raised when tracked tasks are requested in an app that did not call ``install()``."""


class MissingExtraError(TaskflowError):
    """Raised when a store or feature needs an optional package that is not installed."""


class StoreError(TaskflowError):
    """Raised when the store fails; the driver's own exception is the ``__cause__``."""


class StoreUnavailableError(StoreError):
    """Raised when the store cannot be reached (connection refused, lost or timed out).

    Callers may retry later. Stores raise it for connection failures, so that the
    dispatcher can tell an outage, which it waits out, from a failure that repeats.
    """


class SchemaVersionError(StoreError):
    """Raised at startup when the store was migrated by a newer version of app-taskflow."""
