"""Runnable example apps of app-taskflow, each with its own tests."""
