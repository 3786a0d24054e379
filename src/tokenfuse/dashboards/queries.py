"""The PromQL behind every dashboard panel, built from the metric contract's names.

Each function takes a `Scope` (extra label matchers, e.g. ``department="$department"``) so the overview and the
per-department dashboard share one definition of every query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenfuse.config import UNASSIGNED
from tokenfuse.exporter.metrics import (
    BLOCKED_REQUESTS_TOTAL,
    BREAKER_STATE,
    BREAKER_TRANSITIONS_TOTAL,
    BUDGET_LIMIT_USD,
    BUDGET_SPENT_USD,
    COST_USD_TOTAL,
    ESTIMATED_REQUESTS_TOTAL,
    GATEWAY_OVERHEAD_SECONDS,
    GEN_AI_OPERATION_DURATION,
    POLICY_SOURCE_UP,
    REQUESTS_TOTAL,
    TOKEN_DETAILS_TOTAL,
    TOKEN_LIMIT,
    TOKENS_TOTAL,
    TOKENS_USED_WINDOW,
    UNPRICED_REQUESTS_TOTAL,
)

__all__ = [
    "ALL",
    "FUSE_STATE_CODES",
    "RANGE",
    "RATE_INTERVAL",
    "Scope",
    "blocked_rate",
    "budget_limit",
    "budget_used_ratio",
    "cost_in_range",
    "cost_rate_per_hour",
    "estimated_rate",
    "fuse_state_code",
    "fuse_transitions",
    "latency_quantile",
    "outcome_rate",
    "overhead_quantile",
    "policy_source_up",
    "selector",
    "spend_month_to_date",
    "token_limit",
    "token_rate",
    "tokens_in_window",
    "top_cost",
    "unassigned_spend",
    "unpriced_rate",
]

RATE_INTERVAL = "$__rate_interval"
"""Grafana's rate window: at least four scrape intervals, so `rate()` always has two samples."""
RANGE = "$__range"
"""Grafana's whole dashboard time range, for "cost in the selected period" panels."""

# The state timeline shows one number per department; value mappings turn it back into a name.
FUSE_STATE_CODES = {"closed": 0, "half_open": 1, "open": 2}
_MONTH = 'period="month"'


@dataclass(frozen=True)
class Scope:
    """Label matchers every selector of a dashboard carries.

    Args:
        matchers: PromQL matchers such as ``'department="$department"'``; empty for the overview.
    """

    matchers: tuple[str, ...] = ()


ALL = Scope()
"""No extra matchers: every department."""


def selector(metric: str, scope: Scope, *matchers: str) -> str:
    """Render ``metric{matchers…}`` with the scope's matchers after the query's own.

    Args:
        metric: an exposed name from `tokenfuse.exporter.metrics`.
        scope: the dashboard's matchers.
        matchers: the query's own matchers, e.g. ``'period="month"'``.
    """
    parts = (*matchers, *scope.matchers)
    return f"{metric}{{{', '.join(parts)}}}" if parts else metric


def _state(state: str) -> str:
    return f'state="{state}"'


def _by(labels: Sequence[str]) -> str:
    return f"by ({', '.join(labels)})"


def spend_month_to_date(scope: Scope) -> str:
    """Month-to-date spend per department; every gateway replica exports the same gauge, hence ``max``."""
    return f"max by (department) ({selector(BUDGET_SPENT_USD, scope, _MONTH)})"


def budget_limit(scope: Scope) -> str:
    """Monthly budget per department, as configured."""
    return f"max by (department) ({selector(BUDGET_LIMIT_USD, scope, _MONTH)})"


def budget_used_ratio(scope: Scope) -> str:
    """Month-to-date spend as a fraction of the monthly budget (1 = the whole budget)."""
    return f"{spend_month_to_date(scope)} / {budget_limit(scope)}"


def cost_rate_per_hour(by: Sequence[str], scope: Scope) -> str:
    """Spend rate in USD per hour, summed over replicas and grouped by ``by``.

    Args:
        by: labels to keep, e.g. ``("department",)``.
        scope: the dashboard's matchers.
    """
    return f"sum {_by(by)} (rate({selector(COST_USD_TOTAL, scope)}[{RATE_INTERVAL}])) * 3600"


def cost_in_range(scope: Scope) -> str:
    """Total spend over the dashboard's time range."""
    return f"sum(increase({selector(COST_USD_TOTAL, scope)}[{RANGE}]))"


def top_cost(k: int, by: Sequence[str], scope: Scope) -> str:
    """The ``k`` most expensive ``by`` combinations over the dashboard's time range.

    Args:
        k: how many rows to keep.
        by: labels that make a row, e.g. ``("department", "project")``.
        scope: the dashboard's matchers.
    """
    return f"topk({k}, sum {_by(by)} (increase({selector(COST_USD_TOTAL, scope)}[{RANGE}])))"


def token_rate(by: Sequence[str], scope: Scope) -> str:
    """Tokens per second grouped by ``by`` (e.g. model and token type).

    Args:
        by: labels to keep.
        scope: the dashboard's matchers.
    """
    return f"sum {_by(by)} (rate({selector(TOKENS_TOTAL, scope)}[{RATE_INTERVAL}]))"


def cache_hit_ratio(by: Sequence[str], scope: Scope) -> str:
    """Share of input tokens read from the provider's prompt cache, grouped by ``by`` (0 when none were cached).

    Args:
        by: labels to keep (e.g. department, model).
        scope: the dashboard's matchers.
    """
    read = selector(TOKEN_DETAILS_TOTAL, scope, 'detail="cache_read"')
    tokens = selector(TOKENS_TOTAL, scope, 'token_type="input"')
    cached = f"sum {_by(by)} (rate({read}[{RATE_INTERVAL}]))"
    inp = f"sum {_by(by)} (rate({tokens}[{RATE_INTERVAL}]))"
    return f"({cached} or {inp} * 0) / ({inp} > 0)"


def unassigned_spend() -> str:
    """Spend no configured department owns, over the time range; 0 rather than "no data" when there is none."""
    unassigned = Scope((f'department="{UNASSIGNED}"',))
    return f"{cost_in_range(unassigned)} or vector(0)"


def fuse_state_code(scope: Scope) -> str:
    """One number per department: 0 closed, 1 half-open, 2 open (see `FUSE_STATE_CODES`)."""
    half_open = f"max by (department) ({selector(BREAKER_STATE, scope, _state('half_open'))})"
    is_open = f"max by (department) ({selector(BREAKER_STATE, scope, _state('open'))})"
    # Exactly one state gauge is 1 per department, so the weighted sum is the state's code.
    return f"{half_open} * {FUSE_STATE_CODES['half_open']} + {is_open} * {FUSE_STATE_CODES['open']}"


def fuse_transitions(scope: Scope) -> str:
    """Fuse state changes over the time range, by department and edge."""
    sel = selector(BREAKER_TRANSITIONS_TOTAL, scope)
    return f"sum by (department, from_state, to_state) (increase({sel}[{RANGE}])) > 0"


def blocked_rate(scope: Scope) -> str:
    """Refused requests per second by department and reason."""
    return f"sum by (department, reason) (rate({selector(BLOCKED_REQUESTS_TOTAL, scope)}[{RATE_INTERVAL}]))"


def outcome_rate(scope: Scope) -> str:
    """Requests per second by outcome."""
    return f"sum by (outcome) (rate({selector(REQUESTS_TOTAL, scope)}[{RATE_INTERVAL}]))"


def tokens_in_window(scope: Scope) -> str:
    """Tokens in the fuse's rolling window, as the policy engine sees it."""
    return f"max by (department) ({selector(TOKENS_USED_WINDOW, scope)})"


def token_limit(scope: Scope) -> str:
    """The rolling-window token limit, as configured."""
    return f"max by (department) ({selector(TOKEN_LIMIT, scope)})"


def _quantile(q: float, histogram: str, by: Sequence[str]) -> str:
    bucket = f"{histogram}_bucket"
    return f"histogram_quantile({q}, sum {_by(('le', *by))} (rate({bucket}[{RATE_INTERVAL}])))"


def latency_quantile(q: float) -> str:
    """End-to-end request latency quantile by requested model (the histogram has no department label).

    Args:
        q: the quantile, e.g. 0.95.
    """
    return _quantile(q, GEN_AI_OPERATION_DURATION, ("gen_ai_request_model",))


def overhead_quantile(q: float) -> str:
    """Time the gateway itself adds, as a quantile by route.

    Args:
        q: the quantile, e.g. 0.95.
    """
    return _quantile(q, GATEWAY_OVERHEAD_SECONDS, ("route",))


def estimated_rate(scope: Scope) -> str:
    """Requests per second whose usage was estimated (the response carried none)."""
    return f"sum by (department, model) (rate({selector(ESTIMATED_REQUESTS_TOTAL, scope)}[{RATE_INTERVAL}]))"


def unpriced_rate() -> str:
    """Requests per second for models without a price (costed at 0; these hide spend)."""
    return f"sum by (provider, model) (rate({UNPRICED_REQUESTS_TOTAL}[{RATE_INTERVAL}]))"


def policy_source_up() -> str:
    """Whether the policy engine's rate source answered, worst replica first."""
    return f"min by (source) ({POLICY_SOURCE_UP})"
