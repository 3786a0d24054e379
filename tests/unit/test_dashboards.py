"""Grafana dashboards: checked-in files are fresh, every panel is well-formed, every query is valid contract PromQL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
import yaml
from prometheus_client import CollectorRegistry

from conftest import require_binary
from tokenfuse.cli import main as cli_main
from tokenfuse.config import AlertingConfig, Config, load_config, parse_config
from tokenfuse.dashboards import (
    DEPARTMENT_UID,
    OVERVIEW_UID,
    UnknownVariableError,
    build_department,
    build_overview,
    expand_variables,
    iter_panels,
    iter_targets,
    render_dashboard,
    write_dashboards,
)
from tokenfuse.dashboards.queries import FUSE_STATE_CODES
from tokenfuse.exporter.metrics import (
    BREAKER_STATES,
    GEN_AI_DURATION_ATTRS,
    GEN_AI_TOKEN_ATTRS,
    METRIC_NAMES,
    OUTCOMES,
    TOKENS_TOTAL,
    USAGE_LABELS,
    Metrics,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "tokenfuse.yaml"
CHECKED_IN = REPO / "grafana"
# What Grafana substitutes at query time; any concrete, valid value will do for parsing.
VARIABLES = {"department": "marketing", "__rate_interval": "1m", "__range": "1h", "__interval": "15s"}
ALLOWED_UNITS = {"currencyUSD", "short", "s", "percentunit", "reqps", "none"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="module")
def example() -> Config:
    return load_config(EXAMPLE_CONFIG)


@pytest.fixture(scope="module")
def dashboards(example: Config) -> dict[str, dict[str, Any]]:
    return {OVERVIEW_UID: build_overview(example), DEPARTMENT_UID: build_department(example)}


def _panels(dashboard: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [p for p in iter_panels(dashboard) if p["type"] != "row"]


def _panel(dashboard: Mapping[str, Any], title: str) -> Mapping[str, Any]:
    matches = [p for p in iter_panels(dashboard) if p["title"] == title]
    assert len(matches) == 1, f"expected one panel titled {title!r}, found {len(matches)}"
    return matches[0]


def _relative_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def _exposed_labels() -> dict[str, set[str]]:
    """Sample name → label names, from a registry where every collector of the contract has one child."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    usage = ["x"] * len(USAGE_LABELS)
    m.tokens.labels(*usage, "input").inc()
    m.token_details.labels(*usage, "cache_read").inc()
    m.label_overflow.labels("x").inc()
    m.cost.labels(*usage).inc()
    m.requests.labels(*usage, OUTCOMES[0]).inc()
    m.blocked.labels("x", "fuse_open").inc()
    m.estimated.labels("x", "x", "x").inc()
    m.unpriced.labels("x", "x").inc()
    m.budget_limit.labels("x", "month").set(1)
    m.budget_spent.labels("x", "month").set(1)
    m.token_limit.labels("x", "1h").set(1)
    m.tokens_window.labels("x", "1h").set(1)
    m.set_breaker_state("x", "closed")
    m.breaker_transitions.labels("x", "closed", "open").inc()
    m.policy_source_up.labels("local").set(1)
    m.overhead.labels("x").observe(0.001)
    m.gen_ai_tokens.labels(*["x"] * len(GEN_AI_TOKEN_ATTRS)).observe(10)
    m.gen_ai_duration.labels(*["x"] * len(GEN_AI_DURATION_ATTRS)).observe(0.1)
    exposed: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


EXPOSED = _exposed_labels()


def _contract_family(name: str) -> str | None:
    if name in METRIC_NAMES:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in METRIC_NAMES:
            return name.removesuffix(suffix)
    return None


def _selectors(expr: promql.Expr) -> Iterator[promql.VectorSelector]:
    found: list[promql.VectorSelector] = []

    def visit(node: promql.Expr) -> bool:
        if isinstance(node, promql.VectorSelector):
            found.append(node)
        return True

    promql.walk(expr, visit)
    return iter(found)


def contract_problems(expr_text: str) -> list[str]:
    """Every way ``expr_text`` strays from the metric contract: unknown metrics, labels, grouping labels."""
    expr = promql.parse(expr_text)
    problems: list[str] = []
    for sel in _selectors(expr):
        if sel.name is None:
            problems.append(f"selector without a metric name: {sel}")
            continue
        if _contract_family(sel.name) is None:
            problems.append(f"{sel.name} is not in METRIC_NAMES")
        if sel.name not in EXPOSED:
            problems.append(f"{sel.name} is not an exposed sample name")
            continue
        for matcher in sel.matchers.matchers:
            if matcher.name not in EXPOSED[sel.name]:
                problems.append(f"{sel.name} has no label {matcher.name!r}")

    def check_grouping(node: promql.Expr) -> bool:
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            available = set().union(*(EXPOSED.get(s.name or "", set()) for s in _selectors(node.expr)))
            for label in node.modifier.labels:
                if label not in available:
                    problems.append(f"grouping label {label!r} is on none of the metrics it aggregates")
        return True

    promql.walk(expr, check_grouping)
    return problems


# --- generated files -------------------------------------------------------------------------------------------


def test_checked_in_files_match_a_fresh_generation(tmp_path: Path, example: Config) -> None:
    """grafana/ is exactly what `tokenfuse dashboards` makes from examples/tokenfuse.yaml: nothing stale, nothing extra."""
    written = write_dashboards(example, tmp_path)
    generated = {p.relative_to(tmp_path) for p in written}
    assert _relative_files(CHECKED_IN) == generated, "grafana/ holds files the generator does not make, or lacks some"
    for rel in sorted(generated):
        fresh = (tmp_path / rel).read_text(encoding="utf-8")
        assert (CHECKED_IN / rel).read_text(encoding="utf-8") == fresh, (
            f"grafana/{rel} is stale: run `tokenfuse dashboards --config examples/tokenfuse.yaml -o grafana`"
        )


def test_generation_is_deterministic_sorted_and_newline_terminated(tmp_path: Path, example: Config) -> None:
    """Two generations are byte-identical; JSON has sorted keys and ends with a newline."""
    first = write_dashboards(example, tmp_path / "a")
    second = write_dashboards(example, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    for path in first:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n")
        if path.suffix == ".json":
            assert json.dumps(json.loads(text), sort_keys=True, indent=2, ensure_ascii=False) + "\n" == text


def test_write_dashboards_returns_the_four_paths_in_layout(tmp_path: Path, example: Config) -> None:
    """write_dashboards writes both dashboards and both provisioning files where Grafana's layout expects them."""
    written = write_dashboards(example, tmp_path / "grafana")
    assert [p.relative_to(tmp_path / "grafana").as_posix() for p in written] == [
        "dashboards/tokenfuse-overview.json",
        "dashboards/tokenfuse-department.json",
        "provisioning/datasources/prometheus.yml",
        "provisioning/dashboards/tokenfuse.yml",
    ]
    assert all(p.is_file() for p in written)


def test_cli_dashboards_command_writes_the_same_files(tmp_path: Path, example: Config) -> None:
    """`tokenfuse dashboards --config … -o DIR` exits 0 and writes what write_dashboards writes."""
    rc = cli_main(["dashboards", "--config", str(EXAMPLE_CONFIG), "-o", str(tmp_path / "cli")])
    assert rc == 0
    for path in write_dashboards(example, tmp_path / "lib"):
        rel = path.relative_to(tmp_path / "lib")
        assert (tmp_path / "cli" / rel).read_bytes() == path.read_bytes()


def test_provisioning_files_are_standard_grafana_provisioning(tmp_path: Path, example: Config) -> None:
    """The datasource file provisions a Prometheus; the provider file loads JSON dashboards from a folder."""
    write_dashboards(example, tmp_path)
    ds = yaml.safe_load((tmp_path / "provisioning/datasources/prometheus.yml").read_text(encoding="utf-8"))
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"].startswith("http") and source["uid"]
    assert source["jsonData"]["timeInterval"]
    prov = yaml.safe_load((tmp_path / "provisioning/dashboards/tokenfuse.yml").read_text(encoding="utf-8"))
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- dashboard structure ---------------------------------------------------------------------------------------


def test_uids_are_stable_and_match_the_alert_link(dashboards: dict[str, dict[str, Any]]) -> None:
    """The uids are fixed, and the default alert dashboard_url points at the overview's uid."""
    assert OVERVIEW_UID == "tokenfuse-overview" and DEPARTMENT_UID == "tokenfuse-department"
    assert {uid: d["uid"] for uid, d in dashboards.items()} == {uid: uid for uid in dashboards}
    assert AlertingConfig().dashboard_url.endswith(f"/d/{OVERVIEW_UID}")
    assert all("id" not in d for d in dashboards.values()), "provisioned dashboards must not carry a database id"


@pytest.mark.parametrize("uid", [OVERVIEW_UID, DEPARTMENT_UID])
def test_every_panel_and_target_reads_the_datasource_variable(dashboards: dict[str, dict[str, Any]], uid: str) -> None:
    """A `$datasource` variable of type prometheus exists and every panel and target uses it."""
    dashboard = dashboards[uid]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for t in panel["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


@pytest.mark.parametrize("uid", [OVERVIEW_UID, DEPARTMENT_UID])
def test_every_panel_has_description_unit_and_unique_ids(dashboards: dict[str, dict[str, Any]], uid: str) -> None:
    """Every panel has a description and a known unit; panel ids are unique; refIds are unique per panel."""
    dashboard = dashboards[uid]
    ids = [p["id"] for p in iter_panels(dashboard)]
    assert len(ids) == len(set(ids))
    assert all(isinstance(i, int) and i > 0 for i in ids)
    for panel in _panels(dashboard):
        assert len(panel.get("description", "")) > 20, f"{panel['title']} needs a description"
        assert panel["fieldConfig"]["defaults"].get("unit") in ALLOWED_UNITS, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert all(refs) and len(refs) == len(set(refs)), panel["title"]


def test_units_fit_what_each_core_panel_shows(dashboards: dict[str, dict[str, Any]]) -> None:
    """Money is currencyUSD, token counts are short, latencies are seconds."""
    overview = dashboards[OVERVIEW_UID]
    expected = {
        "Month-to-date spend vs budget": "currencyUSD",
        "Cost rate by department": "currencyUSD",
        "Top projects by cost": "currencyUSD",
        "Unassigned spend": "currencyUSD",
        "Tokens by model and token type": "short",
        "Request latency p95 by model": "s",
        "Gateway overhead": "s",
    }
    assert {t: _panel(overview, t)["fieldConfig"]["defaults"]["unit"] for t in expected} == expected


def test_overview_has_every_panel_the_issue_asks_for(dashboards: dict[str, dict[str, Any]]) -> None:
    """The overview shows spend vs budget, cost rate, tokens, top projects, fuse state, blocks, unassigned, outcomes,
    latency and overhead."""
    titles = {p["title"]: p["type"] for p in _panels(dashboards[OVERVIEW_UID])}
    required = {
        "Month-to-date spend vs budget": "bargauge",
        "Cost rate by department": "timeseries",
        "Tokens by model and token type": "timeseries",
        "Top projects by cost": "table",
        "Fuse state": "state-timeline",
        "Blocked requests by reason": "timeseries",
        "Unassigned spend": "stat",
        "Request outcomes": "timeseries",
        "Request latency p95 by model": "timeseries",
        "Gateway overhead": "timeseries",
    }
    assert {t: titles.get(t) for t in required} == required


def test_iter_panels_descends_into_collapsed_rows() -> None:
    """Panels kept inside a collapsed row, and their targets, are walked like top-level ones."""
    dashboard = {
        "panels": [
            {"id": 1, "type": "timeseries", "title": "top", "targets": [{"refId": "A", "expr": "a"}]},
            {
                "id": 2,
                "type": "row",
                "title": "folded",
                "collapsed": True,
                "panels": [{"id": 3, "type": "stat", "title": "inner", "targets": [{"refId": "B", "expr": "b"}]}],
            },
        ]
    }
    assert [p["id"] for p in iter_panels(dashboard)] == [1, 2, 3]
    assert [(t.panel_id, t.ref_id, t.expr) for t in iter_targets(dashboard)] == [(1, "A", "a"), (3, "B", "b")]


def test_generated_collapsed_rows_keep_their_panels_inside(dashboards: dict[str, dict[str, Any]]) -> None:
    """The overview's collapsed row holds its panels, and their queries are among the walked targets."""
    overview = dashboards[OVERVIEW_UID]
    collapsed = [p for p in overview["panels"] if p["type"] == "row" and p["collapsed"]]
    assert collapsed and all(r["panels"] for r in collapsed)
    inner_ids = {p["id"] for r in collapsed for p in r["panels"]}
    assert inner_ids <= {t.panel_id for t in iter_targets(overview)}


# --- thresholds from config ------------------------------------------------------------------------------------


def _two_department_config() -> Config:
    return parse_config(
        {
            "departments": {
                "sales": {"monthly_budget_usd": 120, "alert_thresholds": [0.6, 1.0, 1.2]},
                "research": {"monthly_budget_usd": 4000, "alert_thresholds": [0.8]},
                "interns": {},
            }
        }
    )


def _overrides(panel: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        o["matcher"]["options"]: {prop["id"]: prop["value"] for prop in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }


def test_spend_bar_gauge_scales_to_budget_with_thresholds_at_alert_levels() -> None:
    """Each budgeted department's bar runs to its budget and changes colour at its configured alert levels."""
    overview = build_overview(_two_department_config())
    overrides = _overrides(_panel(overview, "Month-to-date spend vs budget"))
    assert set(overrides) == {"sales", "research"}, "a department without a budget gets no budget scale"
    assert overrides["sales"]["max"] == 120 and overrides["research"]["max"] == 4000
    for name, levels in {"sales": [60, 100, 120], "research": [80]}.items():
        thresholds = overrides[name]["thresholds"]
        assert thresholds["mode"] == "percentage"
        assert [s["value"] for s in thresholds["steps"]] == [None, *levels]


def test_budget_used_stat_colours_at_each_departments_alert_levels() -> None:
    """The department dashboard's budget-used stat has absolute thresholds at the alert fractions, per department."""
    department = build_department(_two_department_config())
    overrides = _overrides(_panel(department, "Budget used"))
    assert [s["value"] for s in overrides["sales"]["thresholds"]["steps"]] == [None, 0.6, 1.0, 1.2]
    assert [s["value"] for s in overrides["research"]["thresholds"]["steps"]] == [None, 0.8]
    assert overrides["sales"]["thresholds"]["mode"] == "absolute"


def test_changing_alert_thresholds_changes_the_rendered_overview(example: Config) -> None:
    """The rendered overview depends on the config's thresholds, so a stale checked-in file is detectable."""
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    data["departments"]["support"]["alert_thresholds"] = [0.8, 1.0]
    changed = parse_config(data)
    assert render_dashboard(build_overview(changed)) != render_dashboard(build_overview(example))


def test_fuse_state_mappings_name_every_breaker_state(dashboards: dict[str, dict[str, Any]]) -> None:
    """The state timeline maps a code for each state of the contract, and the codes are distinct."""
    assert set(FUSE_STATE_CODES) == set(BREAKER_STATES)
    assert len(set(FUSE_STATE_CODES.values())) == len(FUSE_STATE_CODES)
    (mapping,) = _panel(dashboards[OVERVIEW_UID], "Fuse state")["fieldConfig"]["defaults"]["mappings"]
    assert set(mapping["options"]) == {str(c) for c in FUSE_STATE_CODES.values()}


# --- query validation ------------------------------------------------------------------------------------------


def test_expand_variables_substitutes_every_form_and_rejects_unknown_ones() -> None:
    """$x, ${x} and ${x:fmt} are replaced; a variable without a value raises UnknownVariableError naming it."""
    values = {"a": "1", "__range": "5m"}
    assert expand_variables("f($a, ${a}, ${a:raw})[$__range]", values) == "f(1, 1, 1)[5m]"
    with pytest.raises(UnknownVariableError) as err:
        expand_variables("rate(x[$__rate_interval])", values)
    assert err.value.name == "__rate_interval"


def test_contract_check_catches_unknown_metrics_labels_and_grouping() -> None:
    """The checker used below reports a metric outside the contract, a label a metric lacks, and a bad `by`."""
    assert contract_problems(f"sum by (department) (rate({TOKENS_TOTAL}[5m]))") == []
    assert any("not in METRIC_NAMES" in p for p in contract_problems("rate(tokenfuse_tokns_total[5m])"))
    assert any("no label 'departmnt'" in p for p in contract_problems(f'{TOKENS_TOTAL}{{departmnt="x"}}'))
    assert any("grouping label 'reason'" in p for p in contract_problems(f"sum by (reason) ({TOKENS_TOTAL})"))


def _all_targets(dashboards: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (uid, f"{t.panel_title}/{t.ref_id}", expand_variables(t.expr, VARIABLES))
        for uid, d in dashboards.items()
        for t in iter_targets(d)
    ]


def test_every_expr_parses_and_uses_only_the_metric_contract(dashboards: dict[str, dict[str, Any]]) -> None:
    """Every target of every panel (rows included) parses as PromQL and names only contract metrics and labels."""
    targets = _all_targets(dashboards)
    assert len(targets) >= 25, "the walk found fewer targets than the dashboards have"
    problems = {f"{uid}: {where}": contract_problems(expr) for uid, where, expr in targets}
    assert {k: v for k, v in problems.items() if v} == {}


def test_department_dashboard_filters_every_selector_by_the_department_variable(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    """Each selector of the department dashboard carries department="$department"; the variable lists departments."""
    department = dashboards[DEPARTMENT_UID]
    variables = {v["name"]: v for v in department["templating"]["list"]}
    assert variables["department"]["query"] == f"label_values({TOKENS_TOTAL}, department)"
    assert variables["department"]["datasource"]["uid"] == "${datasource}"
    keep_department = {**VARIABLES, "department": "$department"}
    for t in iter_targets(department):
        for sel in _selectors(promql.parse(expand_variables(t.expr, keep_department))):
            equal = {(m.name, m.value) for m in sel.matchers.matchers if m.op == promql.MatchOp.Equal}
            assert ("department", "$department") in equal, f"{t.panel_title}: {sel}"


def test_promtool_parses_every_expr(tmp_path: Path, dashboards: dict[str, dict[str, Any]]) -> None:
    """Prometheus' own parser (promtool check rules) accepts every panel query, variables substituted."""
    promtool = require_binary("promtool")
    rules = [
        {"record": f"tokenfuse_dashboard_check:expr_{i}", "expr": expr}
        for i, (_, _, expr) in enumerate(_all_targets(dashboards))
    ]
    path = tmp_path / "dashboard-exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
