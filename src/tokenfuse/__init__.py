"""tokenfuse: per-department LLM metering, budget alerts and fuses.

The public API is what this module exports; everything else may change.
"""

from __future__ import annotations

from tokenfuse.config import Config, ConfigError, load_config
from tokenfuse.exporter import (
    AsyncMeteredTransport,
    CallRecord,
    Meter,
    MeteredTransport,
    labels,
    start_metrics_server,
)
from tokenfuse.metering.types import Usage
from tokenfuse.policies import BudgetExceeded, PolicyEngine

__version__ = "0.1.0"

__all__ = [
    "AsyncMeteredTransport",
    "BudgetExceeded",
    "CallRecord",
    "Config",
    "ConfigError",
    "Meter",
    "MeteredTransport",
    "PolicyEngine",
    "Usage",
    "__version__",
    "labels",
    "load_config",
    "start_metrics_server",
]
