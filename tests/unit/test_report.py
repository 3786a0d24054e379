"""The chargeback report: local-ledger totals in every format, breakdowns, month bounds, Prometheus PromQL, errors."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry

from tokenfuse.cli import main
from tokenfuse.config import Config, ConfigError, parse_config
from tokenfuse.exporter.meter import CallRecord, Meter
from tokenfuse.exporter.metrics import COST_USD_TOTAL, REQUESTS_TOTAL, TOKENS_TOTAL
from tokenfuse.metering.types import Usage
from tokenfuse.policies import PolicyEngine, parse_period
from tokenfuse.report import (
    ChargebackRow,
    ReportError,
    UsageRow,
    build_chargeback,
    format_table,
    prometheus_queries,
    read_prometheus,
    run_report,
)

TOKYO = ZoneInfo("Asia/Tokyo")
NOV = parse_period("2026-11", TOKYO)
MID_NOV = datetime(2026, 11, 15, 12, 0, tzinfo=TOKYO).timestamp()
AFTER = datetime(2026, 12, 10, tzinfo=TOKYO).timestamp()  # November is a past month then
BUDGETS = {"eng": 0.05, "mkt": 0.02}


def make_config(tmp_path: Path, **policy: Any) -> Config:
    return parse_config(
        {
            "timezone": "Asia/Tokyo",
            "pricing": {"overrides": {"m-1": {"input": 10.0, "output": 30.0}, "m-2": {"input": 1.0, "output": 2.0}}},
            "departments": {
                "eng": {"monthly_budget_usd": BUDGETS["eng"]},
                "mkt": {"monthly_budget_usd": BUDGETS["mkt"]},
                "ops": {},
                "idle": {"monthly_budget_usd": 10.0},
            },
            "policy": {"state_path": str(tmp_path / "state.db"), **policy},
        }
    )


@dataclass
class Month:
    """A ledger filled through a Meter + PolicyEngine, and the November calls that went into it."""

    config: Config
    calls: list[CallRecord]


# (department, project, provider, model, input, output): November traffic, one call each.
TRAFFIC = [
    ("eng", "web", "openai", "m-1", 120, 40),
    ("eng", "web", "openai", "m-1", 300, 80),
    ("eng", "batch", "openai", "m-2", 1000, 500),
    ("mkt", "ads", "openai", "m-1", 50, 10),
    ("mkt", "ads", "anthropic", "m-2", 700, 20),
    ("ops", "none", "openai", "m-2", 9, 1),
]


@pytest.fixture
def month(tmp_path: Path) -> Iterator[Month]:
    config = make_config(tmp_path)
    meter = Meter(config, CollectorRegistry())
    engine = PolicyEngine(config, meter, clock=lambda: MID_NOV)
    engine.open()

    def record(dept: str, project: str, provider: str, model: str, inp: int, out: int, at: float) -> CallRecord:
        labels = meter.labels(department=dept, project=project, environment="prod", provider=provider, model=model)
        return meter.record(labels, usage=Usage(input_tokens=inp, output_tokens=out), outcome="success", now=at)

    calls = [record(*t, at=MID_NOV + i) for i, t in enumerate(TRAFFIC)]
    # The month bounds are Tokyo's: the last instant of October and the first of December stay out.
    record("eng", "web", "openai", "m-1", 5000, 5000, at=NOV.start - 0.001)
    record("eng", "web", "openai", "m-1", 7000, 7000, at=NOV.end)
    calls.append(record("mkt", "ads", "openai", "m-1", 1, 1, at=NOV.start))
    # A blocked request consumed nothing and is billed nothing.
    meter.record(meter.labels(department="eng", provider="openai", model="m-1"), usage=None, outcome="blocked")
    engine.close()
    yield Month(config, calls)


def report(config: Config, fmt: str, by: str = "department", **kw: Any) -> str:
    out = io.StringIO()
    rc = run_report(config, "2026-11", "local", fmt, by, out, now=kw.pop("now", AFTER), **kw)
    assert rc == 0
    return out.getvalue()


def sums(calls: list[CallRecord], key: Callable[[CallRecord], tuple[str, ...]]) -> dict[tuple[str, ...], list[float]]:
    out: dict[tuple[str, ...], list[float]] = {}
    for c in calls:
        assert c.usage is not None
        acc = out.setdefault(key(c), [0.0, 0, 0, 0])
        acc[0] += c.cost_usd
        acc[1] += c.usage.input_tokens
        acc[2] += c.usage.output_tokens
        acc[3] += 1
    return out


def test_json_totals_equal_the_sum_of_the_metered_calls(month: Month) -> None:
    """JSON total and per-department rows equal what the meter recorded in the month, and nothing outside it."""
    doc = json.loads(report(month.config, "json"))
    assert doc["period"] == "2026-11" and doc["source"] == "local" and doc["timezone"] == "Asia/Tokyo"
    assert doc["from"] == "2026-11-01T00:00:00+09:00" and doc["to"] == "2026-12-01T00:00:00+09:00"
    total = doc["total"]
    assert total["cost_usd"] == pytest.approx(math.fsum(c.cost_usd for c in month.calls), rel=1e-12)
    assert total["cost_usd"] > 0
    assert total["input_tokens"] == sum(c.usage.input_tokens for c in month.calls if c.usage)
    assert total["output_tokens"] == sum(c.usage.output_tokens for c in month.calls if c.usage)
    assert total["requests"] == len(month.calls)
    expected = sums(month.calls, lambda c: (c.labels.department,))
    got = {(r["department"],): r for r in doc["rows"]}
    assert set(got) == {*expected, ("idle",)}  # every configured department appears, even at zero
    for key, (cost, inp, out, n) in expected.items():
        row = got[key]
        assert (row["input_tokens"], row["output_tokens"], row["requests"]) == (inp, out, n)
        assert row["cost_usd"] == pytest.approx(cost, rel=1e-12)
        assert row["avg_cost_usd"] == pytest.approx(cost / n, rel=1e-12)
    assert got[("idle",)]["cost_usd"] == 0 and got[("idle",)]["avg_cost_usd"] is None


def test_shares_sum_to_one_and_utilization_is_cost_over_budget(month: Month) -> None:
    """Shares add up to 100 %; utilization is cost / monthly budget, and absent without a budget."""
    doc = json.loads(report(month.config, "json"))
    assert math.fsum(r["share"] for r in doc["rows"]) == pytest.approx(1.0, rel=1e-12)
    for r in doc["rows"]:
        assert r["share"] == pytest.approx(r["cost_usd"] / doc["total"]["cost_usd"], rel=1e-12)
        budget = month.config.departments[r["department"]].monthly_budget_usd
        assert r["budget_usd"] == budget
        if budget is None:
            assert r["utilization"] is None
        else:
            assert r["utilization"] == pytest.approx(r["cost_usd"] / budget, rel=1e-12)
    rows = {r["department"]: r for r in doc["rows"]}
    assert rows["eng"]["utilization"] > 0.1  # the budgets are small enough that the test traffic shows
    budgets = BUDGETS["eng"] + BUDGETS["mkt"] + 10.0
    assert doc["total"]["budget_usd"] == pytest.approx(budgets)
    # ops has no budget: its spend is left out of the total's utilization, as its budget is.
    budgeted = rows["eng"]["cost_usd"] + rows["mkt"]["cost_usd"] + rows["idle"]["cost_usd"]
    assert rows["ops"]["cost_usd"] > 0
    assert doc["total"]["utilization"] == pytest.approx(budgeted / budgets, rel=1e-12)
    costs = [r["cost_usd"] for r in doc["rows"]]
    assert costs == sorted(costs, reverse=True)


def test_csv_imports_as_the_same_rows_as_json(month: Month) -> None:
    """CSV parses with the csv module into one line per JSON row, numbers plain, column sums equal the total."""
    doc = json.loads(report(month.config, "json"))
    text = report(month.config, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [
        "department", "cost_usd", "share", "input_tokens", "output_tokens", "requests", "avg_cost_usd",
        "budget_usd", "utilization",
    ]  # fmt: skip
    assert [r["department"] for r in rows] == [r["department"] for r in doc["rows"]]  # no TOTAL line
    for line, ref in zip(rows, doc["rows"], strict=True):
        assert float(line["cost_usd"]) == pytest.approx(ref["cost_usd"], rel=1e-9)
        assert int(line["input_tokens"]) == ref["input_tokens"]
        assert int(line["requests"]) == ref["requests"]
        assert (line["utilization"] == "") == (ref["utilization"] is None)
    assert math.fsum(float(r["cost_usd"]) for r in rows) == pytest.approx(doc["total"]["cost_usd"], rel=1e-9)
    assert sum(int(r["output_tokens"]) for r in rows) == doc["total"]["output_tokens"]
    assert "$" not in text and "%" not in text


def test_table_is_aligned_and_ends_with_the_total(month: Month) -> None:
    """The terminal table puts every numeric column flush right, so all data lines are equally long."""
    doc = json.loads(report(month.config, "json"))
    lines = report(month.config, "table").splitlines()
    assert lines[0].startswith("Chargeback 2026-11 (Asia/Tokyo")
    grid = lines[2:]
    assert len({len(line) for line in grid}) == 1, "\n".join(grid)
    assert grid[0].split()[:2] == ["department", "cost"]
    assert grid[-1].startswith("TOTAL")
    assert f"{doc['total']['input_tokens']:,}" in grid[-1]
    assert f"{doc['total']['requests']:,}" in grid[-1]
    assert [line.split()[0] for line in grid[2:-2]] == [r["department"] for r in doc["rows"]]
    # The "utilization" column header ends exactly where each row's utilization cell ends.
    end = grid[0].index("utilization") + len("utilization")
    assert all(line[end - 1] in "%-" for line in grid[2:-2] if line)


def test_markdown_has_one_cell_per_column_and_a_bold_total(month: Month) -> None:
    """Markdown rows all have the header's column count; numbers are right-aligned; the total is bold."""
    text = report(month.config, "markdown")
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1
    assert table[1].startswith("| --- | ---: |")
    assert table[-1].startswith("| **TOTAL** |")
    assert len(table) == 2 + 4 + 1  # header, alignment, four departments, total


def test_by_project_groups_within_each_department(month: Month) -> None:
    """``--by project`` lines are (department, project) pairs with that pair's calls summed; no budget columns."""
    doc = json.loads(report(month.config, "json", by="project"))
    expected = sums(month.calls, lambda c: (c.labels.department, c.labels.project))
    got = {(r["department"], r["project"]): r for r in doc["rows"]}
    assert set(got) == set(expected)
    for key, (cost, inp, out, n) in expected.items():
        assert (got[key]["input_tokens"], got[key]["output_tokens"], got[key]["requests"]) == (inp, out, n)
        assert got[key]["cost_usd"] == pytest.approx(cost, rel=1e-12)
    assert "utilization" not in doc["rows"][0]
    rows = list(csv.DictReader(io.StringIO(report(month.config, "csv", by="project"))))
    assert list(rows[0])[:3] == ["department", "project", "cost_usd"]


def test_by_model_groups_by_provider_and_model(month: Month) -> None:
    """``--by model`` lines are (provider, model) pairs: the same model from two providers stays apart."""
    doc = json.loads(report(month.config, "json", by="model"))
    expected = sums(month.calls, lambda c: (c.labels.provider, c.labels.model))
    got = {(r["provider"], r["model"]): r for r in doc["rows"]}
    assert set(got) == set(expected) == {("openai", "m-1"), ("openai", "m-2"), ("anthropic", "m-2")}
    for key, (cost, _inp, _out, n) in expected.items():
        assert got[key]["requests"] == n
        assert got[key]["cost_usd"] == pytest.approx(cost, rel=1e-12)
    assert math.fsum(r["share"] for r in doc["rows"]) == pytest.approx(1.0)
    table = report(month.config, "table", by="model").splitlines()
    assert table[2].split()[:3] == ["provider", "model", "cost"]


def test_an_empty_month_reports_zero_without_dividing_by_zero(month: Month) -> None:
    """A month without traffic lists the configured departments at zero, shares 0, utilization 0."""
    out = io.StringIO()
    assert run_report(month.config, "2026-09", "local", "json", "department", out, now=AFTER) == 0
    doc = json.loads(out.getvalue())
    assert doc["total"]["cost_usd"] == 0 and doc["total"]["requests"] == 0
    assert {r["department"] for r in doc["rows"]} == {"eng", "mkt", "ops", "idle"}
    assert all(r["share"] == 0 for r in doc["rows"])
    assert {r["department"]: r["utilization"] for r in doc["rows"]}["eng"] == 0


def test_bad_month_is_a_clear_error_with_exit_code_2(month: Month) -> None:
    """``2026-13`` and ``nov`` exit 2 with a message that shows the expected YYYY-MM form; nothing is printed."""
    for bad in ("2026-13", "nov", "2026-1"):
        out, err = io.StringIO(), io.StringIO()
        assert run_report(month.config, bad, "local", "table", "department", out, err=err) == 2
        assert "YYYY-MM" in err.getvalue() and bad in err.getvalue()
        assert out.getvalue() == ""


def test_missing_ledger_is_an_error_not_a_new_empty_file(tmp_path: Path) -> None:
    """A state_path without a ledger exits 2 naming the path, and does not create the file."""
    config = make_config(tmp_path)
    err = io.StringIO()
    assert run_report(config, "2026-11", "local", "table", "department", io.StringIO(), err=err) == 2
    assert config.policy.state_path in err.getvalue()
    assert not Path(config.policy.state_path).exists()


def test_prometheus_source_needs_a_url(tmp_path: Path) -> None:
    """``--source prometheus`` without ``policy.prometheus_url`` is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match=r"policy\.prometheus_url"):
        run_report(make_config(tmp_path), "2026-11", "prometheus", "table", "department", io.StringIO())


def test_unreachable_prometheus_exits_2(tmp_path: Path) -> None:
    """A Prometheus nobody listens on exits 2 with the URL in the message."""
    import socket

    with socket.socket() as s:  # bound but never listening: connections are refused at once
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        config = make_config(tmp_path, source="prometheus", prometheus_url=url)
        err = io.StringIO()
        assert run_report(config, "2026-11", None, "csv", "department", io.StringIO(), now=AFTER, err=err) == 2
    assert url in err.getvalue()


def test_cli_report_writes_the_ledger_report(month: Month, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``tokenfuse report --config F --month 2026-11 --format csv`` prints the CSV of the ledger's month."""
    path = tmp_path / "tokenfuse.yaml"
    path.write_text(yaml.safe_dump(month.config.model_dump(mode="json")))
    assert main(["report", "--config", str(path), "--month", "2026-11", "--format", "csv", "--by", "model"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sum(int(r["requests"]) for r in rows) == len(month.calls)
    assert main(["report", "--config", str(path), "--month", "2026-13"]) == 2
    assert "YYYY-MM" in capsys.readouterr().err


# -- pure parts -------------------------------------------------------------------------------------------


def test_build_chargeback_keeps_unconfigured_departments_without_budget(tmp_path: Path) -> None:
    """Usage of a department no longer in config (or unassigned) is still charged, with no budget."""
    rows = [
        UsageRow("eng", "web", "openai", "m-1", 10, 5, 0.3, 2),
        UsageRow("unassigned", "none", "openai", "m-1", 1, 1, 0.1, 1),
    ]
    rep = build_chargeback(rows, make_config(tmp_path), NOV)
    got = {r.key: r for r in rep.rows}
    assert got[("unassigned",)].budget_usd is None and got[("unassigned",)].utilization is None
    assert got[("eng",)].utilization == pytest.approx(0.3 / BUDGETS["eng"])
    assert rep.total.cost_usd == pytest.approx(0.4) and rep.total.requests == 3
    assert rep.rows[0].key == ("eng",)


def test_small_costs_keep_four_places_in_the_table(tmp_path: Path) -> None:
    """Sub-dollar costs print with four decimals so a trial month does not read as $0.00."""
    rows = [UsageRow("eng", "web", "openai", "m-1", 10, 5, 0.00123, 1)]
    text = format_table(build_chargeback(rows, make_config(tmp_path), NOV))
    assert "$0.0012" in text
    row = ChargebackRow(("x",), 1234.5, 1.0, 1, 1, 1)
    assert row.avg_cost_usd == 1234.5 and row.utilization is None


def test_promql_for_a_past_month_is_evaluated_at_its_end_over_its_length() -> None:
    """A past month's queries run at the month end with a range of the month's length; each imports the names."""
    plan = prometheus_queries(NOV, AFTER)
    assert plan is not None
    at, queries = plan
    assert at == NOV.end
    assert set(queries) == {"cost", "input", "output", "requests"}
    rng = f"[{int(NOV.end - NOV.start)}s]"
    assert int(NOV.end - NOV.start) == 30 * 86400
    assert all(rng in q for qs in queries.values() for q in qs)
    assert COST_USD_TOTAL in queries["cost"][0] and 'token_type="input"' in queries["input"][0]
    assert TOKENS_TOTAL in queries["output"][0] and f'{REQUESTS_TOTAL}{{outcome="success"}}' in queries["requests"][0]
    assert "increase(" in queries["cost"][0] and "min_over_time(" in queries["cost"][1]


def test_promql_for_the_current_month_runs_now_from_the_month_start() -> None:
    """In the current month the range is now − month start (in the zone); a future month runs no query."""
    plan = prometheus_queries(NOV, MID_NOV)
    assert plan is not None
    at, queries = plan
    assert at == MID_NOV
    assert f"[{int(MID_NOV - NOV.start)}s]" in queries["cost"][0]
    assert prometheus_queries(NOV, NOV.start - 1) is None


def test_read_prometheus_adds_increase_and_new_series_by_label_set() -> None:
    """Rows sum the increase and the first value of new series per (department, project, provider, model)."""
    seen: list[dict[str, list[str]]] = []
    labels = {"department": "eng", "project": "web", "provider": "openai", "model": "m-1"}

    def handler(request: httpx.Request) -> httpx.Response:
        qs = parse_qs(urlsplit(str(request.url)).query)
        seen.append(qs)
        q = qs["query"][0]
        if 'token_type="input"' in q:
            v = 100.4
        elif 'token_type="output"' in q:
            v = 20.0
        elif REQUESTS_TOTAL in q:
            v = 3.0
        else:
            v = 0.5
        if "min_over_time(" in q:
            v = 1.0
        result = [
            {"metric": labels, "value": [0, str(v)]},
            {"metric": {**labels, "department": "x"}, "value": [0, "NaN"]},
        ]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        rows = read_prometheus("http://prom:9090/", NOV, now=AFTER, client=client)
    assert len(seen) == 8
    assert {qs["time"][0] for qs in seen} == {f"{NOV.end:.3f}"}
    assert rows == [UsageRow("eng", "web", "openai", "m-1", 101, 21, 1.5, 4)]


def test_read_prometheus_rejects_error_answers() -> None:
    """A PromQL error or a non-vector answer is a ReportError naming the Prometheus URL."""
    answers = [
        httpx.Response(400, json={"status": "error", "error": "parse error"}),
        httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": []}}),
        httpx.Response(502, text="<html>bad gateway</html>"),
    ]
    for answer in answers:
        with (
            httpx.Client(transport=httpx.MockTransport(lambda _r, a=answer: a)) as client,
            pytest.raises(ReportError, match="prom:9090"),
        ):
            read_prometheus("http://prom:9090", NOV, now=AFTER, client=client)
