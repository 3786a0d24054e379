"""The panels of the tokenfuse dashboards, built with grafana-foundation-sdk from the queries in `queries`.

Both dashboards draw from these factories; a `Scope` narrows a panel to one department. Alert-level thresholds
come from the config's departments.
"""

from __future__ import annotations

from collections.abc import Sequence

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import prometheus as prometheus_model

from tokenfuse.config import Config
from tokenfuse.dashboards import queries as q
from tokenfuse.exporter.metrics import BREAKER_STATES, OUTCOMES

__all__ = [
    "DATASOURCE",
    "DATASOURCE_VARIABLE",
    "alert_levels",
    "blocked_by_reason",
    "budget_used_stat",
    "budget_used_timeseries",
    "cost_in_range_stat",
    "cost_rate",
    "estimated_requests",
    "fuse_state_timeline",
    "fuse_transitions_table",
    "gateway_overhead",
    "latency_p95",
    "policy_source",
    "request_outcomes",
    "spend_vs_budget",
    "target",
    "tokens_by_model",
    "tokens_window_vs_limit",
    "top_cost_table",
    "unassigned_spend_stat",
    "unpriced_requests",
]

PanelBuilder = cogbuilder.Builder[model.Panel]

DATASOURCE_VARIABLE = "datasource"
# Every panel and target reads from the `$datasource` variable, so one dashboard works with any Prometheus.
DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VARIABLE + "}")

_BASE_COLOR = "green"
_BELOW_BUDGET_COLORS = ("yellow", "orange", "dark-orange")
_OVER_BUDGET_COLORS = ("red", "dark-red")
_OUTCOME_COLORS = {"success": "green", "upstream_error": "red", "client_error": "orange", "blocked": "purple"}
_FUSE_COLORS = {"closed": "green", "half_open": "orange", "open": "red"}
_HALF_WIDTH = 12
_FULL_WIDTH = 24
_HEIGHT = 8


def alert_levels(config: Config) -> dict[str, list[float]]:
    """The alert thresholds (fractions of the budget) of each department that has a monthly budget.

    Args:
        config: the validated tokenfuse.yaml.
    """
    return {
        name: list(d.alert_thresholds)
        for name, d in sorted(config.departments.items())
        if d.monthly_budget_usd is not None
    }


def _level_color(index: int, level: float, levels: Sequence[float]) -> str:
    if level >= 1.0:
        over = [t for t in levels if t >= 1.0]
        return _OVER_BUDGET_COLORS[min(over.index(level), len(_OVER_BUDGET_COLORS) - 1)]
    return _BELOW_BUDGET_COLORS[min(index, len(_BELOW_BUDGET_COLORS) - 1)]


def _steps(levels: Sequence[float], scale: float) -> list[model.Threshold]:
    # Grafana's first step has no value: it is the colour below the first threshold.
    steps = [model.Threshold(value=None, color=_BASE_COLOR)]
    for i, level in enumerate(sorted(levels)):
        # round() keeps 0.9 * 100 from rendering as 90.00000000000001
        steps.append(model.Threshold(value=round(level * scale, 9), color=_level_color(i, level, sorted(levels))))
    return steps


def _thresholds(levels: Sequence[float], mode: model.ThresholdsMode, scale: float) -> model.ThresholdsConfig:
    return model.ThresholdsConfig(mode=mode, steps=_steps(levels, scale))


def _base_thresholds() -> dashboard.ThresholdsConfig:
    return dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(_steps((), 1.0))


def target(
    expr: str, legend: str = "__auto", *, ref_id: str = "A", instant: bool = False, table_format: bool = False
) -> prometheus.Dataquery:
    """A Prometheus query target in code mode on the ``$datasource`` variable.

    Args:
        expr: the PromQL, Grafana variables allowed.
        legend: the series name template, e.g. ``{{department}}``.
        ref_id: unique within the panel.
        instant: evaluate once at the end of the range instead of over it.
        table_format: return a table frame (one row per series) instead of time series.
    """
    t = (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
        .editor_mode(prometheus_model.QueryEditorMode.CODE)
    )
    t = t.instant() if instant else t.range()
    if table_format:
        t = t.format(prometheus_model.PromQueryFormat.TABLE)
    return t


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.TABLE)
        .placement(common.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(["mean", "max"])
    )


def _timeseries(title: str, description: str, unit: str, width: int = _HALF_WIDTH) -> timeseries.Panel:
    return (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .fill_opacity(10)
        .legend(_legend())
        .span(width)
        .height(_HEIGHT)
    )


def _color_by_name(panel: timeseries.Panel, colors: dict[str, str]) -> timeseries.Panel:
    for name, color in colors.items():
        panel = panel.override_by_name(
            name, [model.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]
        )
    return panel


def spend_vs_budget(
    config: Config, scope: q.Scope, *, width: int = _HALF_WIDTH, department_dashboard_uid: str | None = None
) -> PanelBuilder:
    """Bar gauge of month-to-date spend per department, each bar scaled to its budget and coloured at its alert levels.

    Args:
        config: departments' budgets and alert thresholds come from here.
        scope: the dashboard's matchers.
        width: grid columns (of 24).
        department_dashboard_uid: when given, clicking a bar opens that dashboard for the department.
    """
    panel = (
        bargauge.Panel()
        .title("Month-to-date spend vs budget")
        .description(
            "Spend this calendar month per department, as the policy engine sees it (max over replicas). Each bar "
            "runs from 0 to the department's monthly budget; its colour changes at the department's configured "
            "alert thresholds. Departments without a budget show plain green bars."
        )
        .datasource(DATASOURCE)
        .unit("currencyUSD")
        .min(0)
        .thresholds(_base_thresholds())
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .orientation(common.VizOrientation.HORIZONTAL)
        .show_unfilled(True)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target(q.spend_month_to_date(scope), "{{department}}", instant=True))
        .span(width)
        .height(_HEIGHT)
    )
    for name, levels in alert_levels(config).items():
        budget = config.departments[name].monthly_budget_usd
        assert budget is not None  # alert_levels() keeps only budgeted departments
        panel = panel.override_by_name(
            name,
            [
                model.DynamicConfigValue(id_val="max", value=budget),
                # Percentage thresholds are relative to min..max, i.e. to this department's budget.
                model.DynamicConfigValue(
                    id_val="thresholds", value=_thresholds(levels, model.ThresholdsMode.PERCENTAGE, 100.0)
                ),
            ],
        )
    if department_dashboard_uid is not None:
        panel = panel.data_links(
            [
                dashboard.DashboardLink("Open ${__field.displayName} dashboard").url(
                    f"/d/{department_dashboard_uid}?var-department=${{__field.displayName}}&${{__url_time_range}}"
                )
            ]
        )
    return panel


def budget_used_timeseries(config: Config, scope: q.Scope) -> PanelBuilder:
    """Month-to-date spend as a fraction of budget over time, with the configured alert levels as dashed lines.

    Args:
        config: the alert thresholds drawn come from here (all departments' levels together).
        scope: the dashboard's matchers.
    """
    levels = sorted({t for ts in alert_levels(config).values() for t in ts})
    return (
        _timeseries(
            "Budget used",
            "Month-to-date spend divided by the monthly budget, per department (100% = the whole budget). Dashed "
            "lines mark the alert thresholds configured for the departments. Departments without a budget are absent.",
            "percentunit",
            width=8,
        )
        .thresholds(dashboard.ThresholdsConfig().mode(model.ThresholdsMode.ABSOLUTE).steps(_steps(levels, 1.0)))
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED))
        .with_target(target(q.budget_used_ratio(scope), "{{department}}"))
    )


def budget_used_stat(config: Config, scope: q.Scope) -> PanelBuilder:
    """Single number: fraction of the monthly budget spent, coloured at the department's alert levels.

    Args:
        config: per-department alert thresholds.
        scope: the dashboard's matchers (one department).
    """
    panel = (
        stat.Panel()
        .title("Budget used")
        .description(
            "Month-to-date spend divided by the monthly budget. The colour changes at this department's "
            "configured alert thresholds; no value means the department has no budget."
        )
        .datasource(DATASOURCE)
        .unit("percentunit")
        .thresholds(_base_thresholds())
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target(q.budget_used_ratio(scope), "{{department}}"))
        .span(4)
        .height(_HEIGHT)
    )
    for name, levels in alert_levels(config).items():
        panel = panel.override_by_name(
            name,
            [
                model.DynamicConfigValue(
                    id_val="thresholds", value=_thresholds(levels, model.ThresholdsMode.ABSOLUTE, 1.0)
                )
            ],
        )
    return panel


def cost_in_range_stat(scope: q.Scope) -> PanelBuilder:
    """Single number: spend over the dashboard's time range.

    Args:
        scope: the dashboard's matchers.
    """
    return (
        stat.Panel()
        .title("Spend in selected range")
        .description("Total LLM spend over the dashboard's time range (increase of the cost counter).")
        .datasource(DATASOURCE)
        .unit("currencyUSD")
        .thresholds(_base_thresholds())
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target(q.cost_in_range(scope), "spend", instant=True))
        .span(4)
        .height(_HEIGHT)
    )


def unassigned_spend_stat() -> PanelBuilder:
    """Single number: spend no configured department owns, over the time range; orange once it is not zero."""
    return (
        stat.Panel()
        .title("Unassigned spend")
        .description(
            "Spend over the dashboard's time range from calls no configured department owns (no virtual key, or an "
            "unknown department label). Non-zero means someone is spending outside every budget: give them a key."
        )
        .datasource(DATASOURCE)
        .unit("currencyUSD")
        .thresholds(
            dashboard.ThresholdsConfig()
            .mode(model.ThresholdsMode.ABSOLUTE)
            .steps([model.Threshold(value=None, color=_BASE_COLOR), model.Threshold(value=0.01, color="orange")])
        )
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target(q.unassigned_spend(), "unassigned", instant=True))
        .span(4)
        .height(_HEIGHT)
    )


def cost_rate(by: Sequence[str], scope: q.Scope, *, title: str, description: str) -> PanelBuilder:
    """Time series of spend in USD per hour, one series per ``by`` combination.

    Args:
        by: labels that make a series, e.g. ``("department",)``.
        scope: the dashboard's matchers.
        title: panel title.
        description: panel description (what a series is).
    """
    legend = " / ".join("{{" + label + "}}" for label in by)
    return _timeseries(title, description, "currencyUSD").with_target(target(q.cost_rate_per_hour(by, scope), legend))


def tokens_by_model(scope: q.Scope) -> PanelBuilder:
    """Time series of tokens per second by model and token type (input / output).

    Args:
        scope: the dashboard's matchers.
    """
    return _timeseries(
        "Tokens by model and token type",
        "Billable tokens per second, one series per model and token type (input or output), summed over "
        "departments in view and over replicas.",
        "short",
    ).with_target(target(q.token_rate(("model", "token_type"), scope), "{{model}} {{token_type}}"))


def top_cost_table(k: int, by: Sequence[str], scope: q.Scope, *, title: str, description: str) -> PanelBuilder:
    """Table of the ``k`` most expensive ``by`` combinations over the time range, most expensive first.

    Args:
        k: rows to keep.
        by: labels that make a row.
        scope: the dashboard's matchers.
        title: panel title.
        description: panel description.
    """
    return (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit("currencyUSD")
        .with_target(target(q.top_cost(k, by, scope), instant=True, table_format=True))
        # Instant table queries carry a Time column that says nothing here.
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "renameByName": {"Value": "Cost (USD)"}},
            )
        )
        .sort_by([common_builders.TableSortByFieldState().display_name("Cost (USD)").desc(True)])
        .span(_FULL_WIDTH)
        .height(_HEIGHT)
    )


def fuse_state_timeline(scope: q.Scope) -> PanelBuilder:
    """State timeline of each department's fuse: closed, half-open or open.

    Args:
        scope: the dashboard's matchers.
    """
    codes = q.FUSE_STATE_CODES
    mappings: list[model.ValueMapping] = [
        model.ValueMap(
            options={
                str(codes[state]): model.ValueMappingResult(
                    text=state.replace("_", "-"), color=_FUSE_COLORS[state], index=codes[state]
                )
                for state in BREAKER_STATES
            }
        )
    ]
    return (
        statetimeline.Panel()
        .title("Fuse state")
        .description(
            "Each department's fuse (circuit breaker) over time: closed admits requests, open refuses them with "
            "HTTP 429, half-open admits a few probe requests to test whether the department is back under its limit."
        )
        .datasource(DATASOURCE)
        .unit("none")
        .mappings(mappings)
        .show_value(common.VisibilityMode.AUTO)
        .merge_values(True)
        .with_target(target(q.fuse_state_code(scope), "{{department}}"))
        .span(_HALF_WIDTH)
        .height(_HEIGHT)
    )


def fuse_transitions_table(scope: q.Scope) -> PanelBuilder:
    """Table of fuse state changes over the time range.

    Args:
        scope: the dashboard's matchers.
    """
    return (
        table.Panel()
        .title("Fuse transitions")
        .description("How often the fuse changed state over the dashboard's time range, by edge (from → to).")
        .datasource(DATASOURCE)
        .unit("short")
        .decimals(0)
        .with_target(target(q.fuse_transitions(scope), instant=True, table_format=True))
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={"excludeByName": {"Time": True}, "renameByName": {"Value": "Transitions"}},
            )
        )
        .span(_HALF_WIDTH)
        .height(_HEIGHT)
    )


def blocked_by_reason(scope: q.Scope) -> PanelBuilder:
    """Time series of refused requests per second by department and reason.

    Args:
        scope: the dashboard's matchers.
    """
    return _timeseries(
        "Blocked requests by reason",
        "Requests the gateway refused with HTTP 429, per second, by department and reason: fuse_open (the fuse is "
        "open), insufficient_budget (the request's worst case does not fit what is left of the monthly budget), "
        "token_limit (the hourly token limit is reached).",
        "reqps",
    ).with_target(target(q.blocked_rate(scope), "{{department}} {{reason}}"))


def request_outcomes(scope: q.Scope) -> PanelBuilder:
    """Stacked time series of requests per second by outcome.

    Args:
        scope: the dashboard's matchers.
    """
    panel = (
        _timeseries(
            "Request outcomes",
            "Metered requests per second by outcome, stacked: success, upstream_error (the LLM API failed), "
            "client_error (the request was invalid), blocked (refused by a fuse or budget).",
            "reqps",
        )
        .stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
        .with_target(target(q.outcome_rate(scope), "{{outcome}}"))
    )
    return _color_by_name(panel, {o: _OUTCOME_COLORS[o] for o in OUTCOMES})


def latency_p95() -> PanelBuilder:
    """Time series of the 95th percentile end-to-end request latency by model."""
    return _timeseries(
        "Request latency p95 by model",
        "95th percentile of the end-to-end LLM call duration (OpenTelemetry gen_ai.client.operation.duration), by "
        "requested model, over all departments: the histogram carries no department label.",
        "s",
    ).with_target(target(q.latency_quantile(0.95), "{{gen_ai_request_model}}"))


def gateway_overhead() -> PanelBuilder:
    """Time series of the time the gateway itself adds (total minus upstream), p50 and p95 by route."""
    return (
        _timeseries(
            "Gateway overhead",
            "Time the gateway adds to a request (total time minus time waiting for the upstream LLM API), p50 and "
            "p95 by route. This is tokenfuse's own cost in latency.",
            "s",
        )
        .with_target(target(q.overhead_quantile(0.5), "p50 {{route}}", ref_id="A"))
        .with_target(target(q.overhead_quantile(0.95), "p95 {{route}}", ref_id="B"))
    )


def tokens_window_vs_limit(scope: q.Scope) -> PanelBuilder:
    """Time series of tokens in the fuse's rolling window against the configured limit.

    Args:
        scope: the dashboard's matchers.
    """
    return (
        _timeseries(
            "Tokens in rolling window vs limit",
            "Tokens used in the fuse's rolling window (default 1 h), as the policy engine sees it, and the "
            "department's hourly token limit. The fuse opens when the first line reaches the second.",
            "short",
            width=8,
        )
        .with_target(target(q.tokens_in_window(scope), "used {{department}}", ref_id="A"))
        .with_target(target(q.token_limit(scope), "limit {{department}}", ref_id="B"))
    )


def cache_hit_rate(by: Sequence[str], scope: q.Scope) -> PanelBuilder:
    """Time series of the prompt-cache hit rate (cached input tokens / input tokens).

    Args:
        by: labels to split by.
        scope: the dashboard's matchers.
    """
    legend = " ".join("{{" + b + "}}" for b in by)
    return (
        _timeseries(
            "Prompt cache hit rate",
            "Share of input tokens served from the provider's prompt cache (tokenfuse_token_details_total "
            "detail=cache_read over input tokens). Cached input is billed at a fraction of the price: a falling rate "
            "raises cost at the same traffic.",
            "percentunit",
        )
        .min(0)
        .max(1)
        .with_target(target(q.cache_hit_ratio(by, scope), legend))
    )


def estimated_requests(scope: q.Scope) -> PanelBuilder:
    """Time series of requests whose usage had to be estimated.

    Args:
        scope: the dashboard's matchers.
    """
    return _timeseries(
        "Requests with estimated usage",
        "Requests per second whose response carried no usage, so tokens were estimated with tiktoken. A steady "
        "non-zero rate means a client or upstream strips usage (e.g. streaming without include_usage).",
        "reqps",
    ).with_target(target(q.estimated_rate(scope), "{{department}} {{model}}"))


def unpriced_requests() -> PanelBuilder:
    """Time series of requests for models without a known price (costed at 0)."""
    return _timeseries(
        "Requests for unpriced models",
        "Requests per second for models tokenfuse has no price for; they are costed at 0, so spend is "
        "under-reported. Add a pricing override for the model.",
        "reqps",
    ).with_target(target(q.unpriced_rate(), "{{provider}} {{model}}"))


def policy_source() -> PanelBuilder:
    """Time series of whether the policy engine's rate source answered (1) or not (0)."""
    return (
        _timeseries(
            "Policy rate source up",
            "1 when the policy engine's rate source (local ledger or Prometheus) answered at its last evaluation, "
            "worst replica shown. While 0, fuses act on stale numbers, then fail open or closed as configured.",
            "short",
        )
        .max(1)
        .with_target(target(q.policy_source_up(), "{{source}}"))
    )
