"""Reading a rendered dashboard back: every panel (rows included), every query target, and Grafana variables.

Used by the tests that parse and execute each panel's PromQL, and handy for anyone checking a dashboard by hand.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PanelTarget", "UnknownVariableError", "expand_variables", "iter_panels", "iter_targets"]

# $name, ${name} and ${name:format}; Grafana's built-ins start with "__".
_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")


class UnknownVariableError(KeyError):
    """A query uses a Grafana variable no value was given for.

    Args:
        name: the variable, without ``$``.
        expr: the query it appears in.
    """

    def __init__(self, name: str, expr: str) -> None:
        super().__init__(f"no value for Grafana variable ${name} in {expr!r}")
        self.name = name


@dataclass(frozen=True)
class PanelTarget:
    """One query of one panel.

    Args:
        panel_id: the panel's ``id``.
        panel_title: the panel's ``title``.
        ref_id: the target's ``refId`` (A, B, …).
        expr: the PromQL, Grafana variables unexpanded.
        instant: True for an instant query, False for a range query.
    """

    panel_id: int
    panel_title: str
    ref_id: str
    expr: str
    instant: bool


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Yield every panel in layout order: rows, and the panels a collapsed row keeps inside it.

    Args:
        dashboard: a dashboard as Grafana stores it (the JSON model, parsed).
    """
    for panel in dashboard.get("panels", []):
        yield panel
        yield from iter_panels(panel)


def iter_targets(dashboard: Mapping[str, Any]) -> Iterator[PanelTarget]:
    """Yield every query target of every panel, rows and collapsed rows included.

    Args:
        dashboard: a dashboard as Grafana stores it (the JSON model, parsed).
    """
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            yield PanelTarget(
                panel_id=int(panel.get("id", 0)),
                panel_title=str(panel.get("title", "")),
                ref_id=str(target.get("refId", "")),
                expr=str(target.get("expr", "")),
                instant=bool(target.get("instant", False)),
            )


def expand_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables (``$x``, ``${x}``, ``${x:fmt}``) with concrete values, as Grafana would.

    Args:
        expr: a query with variables, e.g. ``rate(x[$__rate_interval])``.
        values: variable name (without ``$``) → replacement, e.g. ``{"__rate_interval": "1m"}``.

    Raises:
        UnknownVariableError: a variable in ``expr`` has no entry in ``values``.
    """

    def replace(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise UnknownVariableError(name, expr)
        return values[name]

    return _VARIABLE_RE.sub(replace, expr)
