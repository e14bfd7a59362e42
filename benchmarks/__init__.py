"""Benchmarks of app-taskflow against plain FastAPI ``BackgroundTasks``."""
