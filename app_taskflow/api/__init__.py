"""The REST API of app-taskflow."""
