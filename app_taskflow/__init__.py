"""Tracked, retried and persisted background tasks for FastAPI, inside the app itself."""

from app_taskflow.container import TaskflowContainer
from app_taskflow.context import TaskContext, current_task
from app_taskflow.dependencies import TaskflowTasks
from app_taskflow.errors import (
    ConfigurationError,
    IdempotencyConflictError,
    NotATaskError,
    TaskArgumentError,
    TaskDefinitionError,
    TaskflowError,
    TaskNotFoundError,
    TaskStateError,
)
from app_taskflow.logs import task_log
from app_taskflow.models import TaskRecord, TaskStatus
from app_taskflow.routing import TaskflowRoute
from app_taskflow.taskflow import Taskflow
from app_taskflow.tasks import RetryPolicy, TaskDefinition

__all__ = [
    "ConfigurationError",
    "IdempotencyConflictError",
    "NotATaskError",
    "RetryPolicy",
    "TaskArgumentError",
    "TaskContext",
    "TaskDefinition",
    "TaskDefinitionError",
    "TaskNotFoundError",
    "TaskRecord",
    "TaskStateError",
    "TaskStatus",
    "Taskflow",
    "TaskflowContainer",
    "TaskflowError",
    "TaskflowRoute",
    "TaskflowTasks",
    "current_task",
    "task_log",
]
