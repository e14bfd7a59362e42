"""The live dashboard under ``<api prefix>/dashboard``, its event stream and throughput."""

from app_taskflow.dashboard.hub import DashboardHub, DashboardSettings
from app_taskflow.dashboard.router import build_dashboard_router
from app_taskflow.dashboard.throughput import Throughput, ThroughputBucket, throughput

__all__ = [
    "DashboardHub",
    "DashboardSettings",
    "Throughput",
    "ThroughputBucket",
    "build_dashboard_router",
    "throughput",
]
