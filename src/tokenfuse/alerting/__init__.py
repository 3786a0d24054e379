"""Alerting generators: Prometheus rules and the Alertmanager configuration, both derived from `Config`.

`tokenfuse rules` and `tokenfuse alertmanager` print what these functions return.
"""

from __future__ import annotations

from tokenfuse.alerting.alertmanager import render_alertmanager
from tokenfuse.alerting.rules import ALERT_NAMES, DEFAULT_JOB, render_rules

__all__ = ["ALERT_NAMES", "DEFAULT_JOB", "render_alertmanager", "render_rules"]
