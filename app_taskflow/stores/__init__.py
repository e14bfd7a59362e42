"""Task stores: the abstract contract and the built-in backends."""

from app_taskflow.stores.base import TaskStore
from app_taskflow.stores.memory import MemoryStore
from app_taskflow.stores.sql import SqlStore

__all__ = ["MemoryStore", "SqlStore", "TaskStore"]
