"""What the policy engine shows on /metrics: limits, what it sees used, fuse states and transitions, source health.

The engine decides; this module writes the gauges and counters of the metric contract for it, so that only the
exporter layer touches metric objects (`tokenfuse.exporter.metrics`).
"""

from __future__ import annotations

import contextlib

from prometheus_client.metrics import Gauge

from tokenfuse.exporter.metrics import BREAKER_STATES, Metrics

__all__ = ["DepartmentGauges", "PolicyMetrics"]


class DepartmentGauges:
    """One department's policy gauges, resolved once (the engine updates them on every evaluation)."""

    __slots__ = ("_metrics", "_shown", "_spent", "_tokens", "_window", "name")

    def __init__(self, metrics: Metrics, name: str, window: str) -> None:
        self._metrics = metrics
        self.name = name
        self._window = window
        self._tokens = metrics.tokens_window.labels(name, window)
        self._spent = metrics.budget_spent.labels(name, "month")
        self._shown: tuple[float, float] | None = None

    def limits(self, budget_usd: float | None, token_limit: int | None) -> None:
        """The configured limits; a limit that is not set has no series."""
        m = self._metrics
        _set_or_remove(m.budget_limit, (self.name, "month"), budget_usd)
        _set_or_remove(m.token_limit, (self.name, self._window), token_limit)
        self._shown = None

    def usage(self, tokens: float, spent_usd: float) -> None:
        """Window tokens and month-to-date spend as the engine sees them (unchanged values are not set again)."""
        shown = (tokens, spent_usd)
        if shown != self._shown:
            self._shown = shown
            self._tokens.set(tokens)
            self._spent.set(spent_usd)

    def state(self, state: str) -> None:
        """The fuse state: 1 for ``state``, 0 for the others."""
        self._metrics.set_breaker_state(self.name, state)

    def transition(self, from_state: str, to_state: str) -> None:
        self._metrics.breaker_transitions.labels(self.name, from_state, to_state).inc()
        self.state(to_state)


class PolicyMetrics:
    """The policy engine's view of the metric contract.

    Args:
        metrics: the collectors (the meter's).
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def department(self, name: str, window: str) -> DepartmentGauges:
        """The gauges of department ``name``; ``window`` is the token window's label (``1h``)."""
        return DepartmentGauges(self._metrics, name, window)

    def forget(self, name: str, window: str) -> None:
        """Remove every policy series of a department that left the config (or of a window label that changed)."""
        m = self._metrics
        for gauge, label in ((m.budget_limit, "month"), (m.budget_spent, "month"), (m.token_limit, window),
                             (m.tokens_window, window)):  # fmt: skip
            with contextlib.suppress(KeyError):
                gauge.remove(name, label)
        for s in BREAKER_STATES:
            with contextlib.suppress(KeyError):
                m.breaker_state.remove(name, s)

    def forget_window(self, name: str, window: str) -> None:
        """Remove a department's window series under an old window label (``policy.token_window`` changed)."""
        m = self._metrics
        for gauge in (m.token_limit, m.tokens_window):
            with contextlib.suppress(KeyError):
                gauge.remove(name, window)

    def source_up(self, source: str, up: bool) -> None:
        self._metrics.policy_source_up.labels(source).set(1.0 if up else 0.0)


def _set_or_remove(gauge: Gauge, labels: tuple[str, str], value: float | None) -> None:
    if value is None:
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
    else:
        gauge.labels(*labels).set(value)
