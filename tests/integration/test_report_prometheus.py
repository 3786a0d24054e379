"""`tokenfuse report` from a real Prometheus scraping a real gateway: totals equal what the fake upstream reported."""

from __future__ import annotations

import csv
import io
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import KEYS, fake_config
from tests.integration._procs import eventually, start_prometheus
from tests.integration.test_gateway_prometheus import GatewayProcess

from tokenfuse.config import parse_config
from tokenfuse.exporter.metrics import REQUESTS_TOTAL
from tokenfuse.policies import month_of
from tokenfuse.report import run_report
from tokenfuse.testing.fake_upstream import USAGE_HEADER, FakeUpstream, FakeUpstreamThread

# (department, project, model, input tokens, output tokens): serial traffic, one request each.
TRAFFIC = [
    ("marketing", "ads", "gpt-4o", 1200, 300),
    ("marketing", "ads", "gpt-4o-mini", 800, 50),
    ("marketing", "web", "gpt-4o", 40, 9),
    ("engineering", "ci", "gpt-4o-mini", 5000, 700),
    ("engineering", "ci", "claude-sonnet-4-0", 2500, 400),
    ("support", "bot", "gpt-4o-mini", 90, 30),
]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


def send(gw: GatewayProcess, dept: str, project: str, model: str, inp: int, out: int) -> None:
    body = json.dumps({"model": model, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]})
    headers = {
        "Authorization": f"Bearer {KEYS[dept]}",
        "Content-Type": "application/json",
        "x-tokenfuse-project": project,
        USAGE_HEADER: json.dumps({"input_tokens": inp, "output_tokens": out}),
    }
    req = urllib.request.Request(gw.url + "/v1/chat/completions", data=body.encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def run(config: Any, source: str, fmt: str, by: str = "department") -> str:
    out, err = io.StringIO(), io.StringIO()
    month = month_of(time.time(), config.zone).name
    rc = run_report(config, month, source, fmt, by, out, err=err)
    assert rc == 0, err.getvalue()
    return out.getvalue()


def test_report_from_prometheus_and_ledger_equals_upstream_usage(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Every format from both sources totals the tokens and requests the upstream reported; costs agree."""
    cfg = fake_config(upstream.url, tmp_path).model_dump(mode="json")
    gw = GatewayProcess(cfg, tmp_path, "gw").start()
    try:
        for t in TRAFFIC:
            send(gw, *t)
        # Prometheus starts after the traffic, so each series' first sample is already its final value: the
        # report's "first value of a series born in the range" term carries it exactly, with no extrapolation.
        with start_prometheus(tmp_path, [f"127.0.0.1:{gw.port}"]) as prom:

            def scraped() -> bool:
                got = prom.query(f'sum({REQUESTS_TOTAL}{{outcome="success"}})')
                return bool(got) and float(got[0]["value"][1]) == len(TRAFFIC)

            eventually(scraped, 20, what="Prometheus scraped every request")
            config = parse_config(
                {**cfg, "policy": {**cfg["policy"], "state_path": str(tmp_path / "gw.db"), "prometheus_url": prom.url}}
            )
            reports = {
                (src, fmt): run(config, src, fmt)
                for src in ("local", "prometheus")
                for fmt in ("json", "csv", "table", "markdown")
            }
            by_model = {src: json.loads(run(config, src, "json", "model")) for src in ("local", "prometheus")}
            by_project = {src: json.loads(run(config, src, "json", "project")) for src in ("local", "prometheus")}
    finally:
        gw.stop()

    assert len(upstream.requests) == len(TRAFFIC)
    expected: dict[str, list[int]] = {}
    for (dept, *_), rec in zip(TRAFFIC, upstream.requests, strict=True):
        assert rec.usage is not None
        acc = expected.setdefault(dept, [0, 0, 0])
        acc[0] += rec.usage["input_tokens"]
        acc[1] += rec.usage["output_tokens"]
        acc[2] += 1
    want_total = [sum(v[i] for v in expected.values()) for i in range(3)]
    assert want_total == [sum(t[3] for t in TRAFFIC), sum(t[4] for t in TRAFFIC), len(TRAFFIC)]

    docs = {src: json.loads(reports[(src, "json")]) for src in ("local", "prometheus")}
    local_cost = docs["local"]["total"]["cost_usd"]
    assert local_cost > 0
    for src, doc in docs.items():
        assert doc["source"] == src
        total = doc["total"]
        assert [total["input_tokens"], total["output_tokens"], total["requests"]] == want_total, src
        assert total["cost_usd"] == pytest.approx(local_cost, rel=1e-9), src
        rows = {r["department"]: r for r in doc["rows"]}
        for dept, (inp, out, n) in expected.items():
            assert [rows[dept]["input_tokens"], rows[dept]["output_tokens"], rows[dept]["requests"]] == [inp, out, n]
            budget = config.departments[dept].monthly_budget_usd
            if budget is not None:
                assert rows[dept]["utilization"] == pytest.approx(rows[dept]["cost_usd"] / budget, rel=1e-9)
        assert sum(r["share"] for r in doc["rows"]) == pytest.approx(1.0)

        lines = list(csv.DictReader(io.StringIO(reports[(src, "csv")])))
        assert sum(int(r["input_tokens"]) for r in lines) == want_total[0]
        assert sum(int(r["requests"]) for r in lines) == want_total[2]
        assert sum(float(r["cost_usd"]) for r in lines) == pytest.approx(local_cost, rel=1e-6)

        table = reports[(src, "table")].splitlines()
        assert table[-1].startswith("TOTAL") and f"{want_total[0]:,}" in table[-1]
        assert f"source {src}" in table[0]
        md = reports[(src, "markdown")].splitlines()
        assert md[-1].startswith("| **TOTAL** |") and f"**{want_total[1]:,}**" in md[-1]

        models = {(r["provider"], r["model"]): r["requests"] for r in by_model[src]["rows"]}
        assert models == {("openai", "gpt-4o"): 2, ("openai", "gpt-4o-mini"): 3, ("anthropic", "claude-sonnet-4-0"): 1}
        projects = {(r["department"], r["project"]): r["input_tokens"] for r in by_project[src]["rows"]}
        assert projects == {
            ("marketing", "ads"): 2000,
            ("marketing", "web"): 40,
            ("engineering", "ci"): 7500,
            ("support", "bot"): 90,
        }
