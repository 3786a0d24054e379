"""Grafana dashboards for tokenfuse, generated from code: builders, provisioning files, and a target walker.

`write_dashboards` is what ``tokenfuse dashboards -o grafana/`` runs; `iter_targets` reads a dashboard back.
"""

from __future__ import annotations

from tokenfuse.dashboards.generate import (
    DEPARTMENT_UID,
    OVERVIEW_UID,
    build_department,
    build_overview,
    render_dashboard,
    render_dashboard_provider,
    render_datasource,
    write_dashboards,
)
from tokenfuse.dashboards.targets import PanelTarget, UnknownVariableError, expand_variables, iter_panels, iter_targets

__all__ = [
    "DEPARTMENT_UID",
    "OVERVIEW_UID",
    "PanelTarget",
    "UnknownVariableError",
    "build_department",
    "build_overview",
    "expand_variables",
    "iter_panels",
    "iter_targets",
    "render_dashboard",
    "render_dashboard_provider",
    "render_datasource",
    "write_dashboards",
]
