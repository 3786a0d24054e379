"""tokenfuse: per-department LLM metering, budget alerts and fuses."""

from __future__ import annotations

__version__ = "0.1.0"
