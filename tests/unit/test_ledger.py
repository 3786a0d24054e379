"""The SQLite ledger: rolling window, month sums in the budget zone, persistence, fuse state, audit, reports."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.metering.types import Usage
from tokenfuse.policies.calendar import month_of, parse_period
from tokenfuse.policies.ledger import Ledger, LedgerError

TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 15, 12, 0, tzinfo=TOKYO).timestamp()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    lg = Ledger(tmp_path / "state.db", zone=TOKYO, window_seconds=3600)
    lg.open(T0)
    yield lg
    lg.close()


def add(lg: Ledger, at: float, tokens: int, cost: float = 0.0, dept: str = "eng", **kw: str) -> None:
    lg.add(at=at, department=dept, input_tokens=tokens // 2, output_tokens=tokens - tokens // 2, cost_usd=cost, **kw)


def test_window_counts_calls_inside_and_drops_them_exactly_at_the_edge(ledger: Ledger) -> None:
    """A call at t counts until t + window (exclusive): at exactly t + window it has left the window."""
    add(ledger, T0, 100)
    add(ledger, T0 + 10, 50)
    assert ledger.window_tokens("eng", T0 + 3599.999) == 150
    assert ledger.window_tokens("eng", T0 + 3600) == 50
    assert ledger.window_tokens("eng", T0 + 3610) == 0
    assert ledger.window_tokens("other", T0) == 0


def test_out_of_order_records_expire_in_time_order(ledger: Ledger) -> None:
    """A record that arrives late (earlier timestamp) still leaves the window at its own time."""
    add(ledger, T0 + 100, 1)
    add(ledger, T0, 10)  # late arrival
    add(ledger, T0 + 50, 100)
    assert ledger.window_tokens("eng", T0 + 3600) == 101
    assert ledger.window_tokens("eng", T0 + 3650) == 1


def test_window_since_sums_only_newer_calls(ledger: Ledger) -> None:
    """window_since(t) is the usage recorded strictly after t."""
    add(ledger, T0, 10, 0.1)
    add(ledger, T0 + 5, 20, 0.2)
    add(ledger, T0 + 9, 40, 0.4)
    tokens, cost = ledger.window_since("eng", T0 + 5)
    assert tokens == 40 and cost == pytest.approx(0.4)


def test_window_wait_is_when_enough_tokens_have_left(ledger: Ledger) -> None:
    """window_wait says how long until N tokens leave the window; None when the window does not hold N."""
    add(ledger, T0, 100)
    add(ledger, T0 + 60, 100)
    assert ledger.window_wait("eng", T0 + 100, 50) == pytest.approx(3500)
    assert ledger.window_wait("eng", T0 + 100, 150) == pytest.approx(3560)
    assert ledger.window_wait("eng", T0 + 100, 201) is None


def test_month_spend_follows_the_zone_at_the_boundary(ledger: Ledger) -> None:
    """A call one second before midnight Tokyo counts for November, one second after for December."""
    dec = datetime(2026, 12, 1, tzinfo=TOKYO).timestamp()
    add(ledger, dec - 1, 10, 1.0)
    add(ledger, dec + 1, 10, 2.0)
    assert ledger.month_spent("eng", parse_period("2026-11", TOKYO)) == pytest.approx(1.0)
    assert ledger.month_spent("eng", month_of(dec, TOKYO)) == pytest.approx(2.0)


def test_cached_month_sum_keeps_counting_new_records(ledger: Ledger) -> None:
    """After the month sum is cached, later records add to it exactly once."""
    nov = parse_period("2026-11", TOKYO)
    add(ledger, T0, 10, 0.5)
    assert ledger.month_usage("eng", nov) == (10, pytest.approx(0.5))
    add(ledger, T0 + 1, 30, 0.25)
    assert ledger.month_usage("eng", nov) == (40, pytest.approx(0.75))


def test_reopen_rebuilds_window_and_month_from_the_file(tmp_path: Path) -> None:
    """A new Ledger on the same file sees the same window tokens and month spend."""
    path = tmp_path / "s.db"
    a = Ledger(path, zone=TOKYO, window_seconds=3600)
    a.open(T0)
    add(a, T0 - 7200, 1000, 3.0)  # out of the window, in the month
    add(a, T0 - 60, 70, 0.7)
    a.close()
    b = Ledger(path, zone=TOKYO, window_seconds=3600)
    b.open(T0)
    assert b.window_tokens("eng", T0) == 70
    assert b.month_spent("eng", month_of(T0, TOKYO)) == pytest.approx(3.7)


def test_each_record_is_committed_before_add_returns(ledger: Ledger) -> None:
    """Another connection sees the row as soon as add() returns (no open transaction holds it)."""
    add(ledger, T0, 10, 0.1)
    other = sqlite3.connect(ledger.path)
    try:
        assert other.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1
    finally:
        other.close()


def test_file_is_in_wal_mode_with_normal_sync(ledger: Ledger) -> None:
    """The state file uses journal_mode=WAL; the ledger's connection runs synchronous=NORMAL."""
    other = sqlite3.connect(ledger.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()
    assert ledger._conn().execute("PRAGMA synchronous").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A state file written by a newer tokenfuse is refused with a message naming the fix."""
    path = tmp_path / "new.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(LedgerError, match="newer"):
        Ledger(path, zone=TOKYO, window_seconds=60).open(T0)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    """A state path that is not SQLite raises LedgerError naming the file."""
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match=r"junk\.db"):
        Ledger(path, zone=TOKYO, window_seconds=60).open(T0)


def test_use_before_open_is_an_error(tmp_path: Path) -> None:
    """Recording into a ledger that is not open raises LedgerError instead of losing the call."""
    lg = Ledger(tmp_path / "x.db", zone=TOKYO, window_seconds=60)
    with pytest.raises(LedgerError, match="not open"):
        add(lg, T0, 1)


def test_fuse_snapshots_and_override_audit_persist(tmp_path: Path) -> None:
    """Fuse snapshots (last write wins) and override audit rows survive a reopen."""
    path = tmp_path / "f.db"
    a = Ledger(path, zone=TOKYO, window_seconds=60)
    a.open(T0)
    a.save_fuse("eng", {"state": "closed"}, T0)
    a.save_fuse("eng", {"state": "open", "cause": "budget"}, T0 + 1)
    a.audit_override(at=T0, department="eng", action="open", reason="incident", ttl_seconds=60.0, actor="alice")
    a.audit_override(at=T0 + 5, department="eng", action="auto", reason="", ttl_seconds=None, actor="bob")
    a.close()
    b = Ledger(path, zone=TOKYO, window_seconds=60)
    b.open(T0)
    assert b.load_fuses() == {"eng": {"state": "open", "cause": "budget"}}
    log = b.overrides("eng")
    assert [(e["action"], e["actor"]) for e in log] == [("auto", "bob"), ("open", "alice")]
    assert log[1]["ttl_seconds"] == 60.0 and b.overrides("ops") == []


def test_reconfigure_to_a_shorter_window_rebuilds_it(ledger: Ledger) -> None:
    """Shrinking the window drops calls now outside it; the month sum is unchanged."""
    add(ledger, T0 - 600, 100, 1.0)
    add(ledger, T0 - 30, 5, 0.1)
    assert ledger.window_tokens("eng", T0) == 105
    ledger.reconfigure(zone=TOKYO, window_seconds=60, now=T0)
    assert ledger.window_tokens("eng", T0) == 5
    assert ledger.month_spent("eng", month_of(T0, TOKYO)) == pytest.approx(1.1)


def test_record_stores_metered_calls_and_skips_calls_without_usage(tmp_path: Path) -> None:
    """record() stores a CallRecord's labels, tokens and cost; a call without usage writes nothing."""
    cfg = parse_config({"departments": {"eng": {}}, "pricing": {"overrides": {"m-1": {"input": 1.0, "output": 2.0}}}})
    meter = Meter(cfg, CollectorRegistry())
    lg = Ledger(tmp_path / "r.db", zone=TOKYO, window_seconds=3600)
    lg.open(T0)
    labels = meter.labels(department="eng", project="web", environment="prod", provider="openai", model="m-1")
    rec = meter.record(labels, usage=Usage(input_tokens=1000, output_tokens=500), outcome="success", now=T0)
    assert lg.record(rec) is True
    assert lg.record(meter.record(labels, usage=None, outcome="blocked", now=T0)) is False
    (row,) = lg.month_totals(month_of(T0, TOKYO))
    assert row == {
        "department": "eng",
        "project": "web",
        "environment": "prod",
        "provider": "openai",
        "model": "m-1",
        "requests": 1,
        "input_tokens": 1000,
        "output_tokens": 500,
        "tokens": 1500,
        "cost_usd": pytest.approx(0.002),
    }


def test_usage_report_groups_and_totals_agree(ledger: Ledger) -> None:
    """usage() by project and by model each add up to the total, and only the asked month counts."""
    add(ledger, T0, 100, 1.0, project="web", model="a")
    add(ledger, T0 + 1, 200, 2.0, project="web", model="b")
    add(ledger, T0 + 2, 300, 4.0, project="etl", model="a")
    add(ledger, T0 + 3, 999, 9.0, dept="ops", project="web", model="a")
    add(ledger, parse_period("2026-10", TOKYO).start, 5, 5.0, project="web", model="a")  # October
    u = ledger.usage("eng", parse_period("2026-11", TOKYO))
    assert u["total"]["tokens"] == 600 and u["total"]["cost_usd"] == pytest.approx(7.0)
    assert [(p["project"], p["tokens"]) for p in u["by_project"]] == [("etl", 300), ("web", 300)]
    assert {m["model"]: m["cost_usd"] for m in u["by_model"]} == {"a": pytest.approx(5.0), "b": pytest.approx(2.0)}
    everyone = ledger.usage(None, parse_period("2026-11", TOKYO))
    assert {d["department"]: d["tokens"] for d in everyone["by_department"]} == {"eng": 600, "ops": 999}
    assert everyone["from"].startswith("2026-11-01T00:00:00+09:00")


def test_month_totals_equal_the_sum_of_recorded_calls(ledger: Ledger) -> None:
    """The chargeback rows add up to exactly the tokens and cost that were recorded."""
    costs = [0.1, 0.2, 0.3, 0.123456789, 1e-9]
    for i, c in enumerate(costs):
        add(ledger, T0 + i, 10 * (i + 1), c, project=f"p{i % 2}")
    rows = ledger.month_totals(month_of(T0, TOKYO))
    assert sum(r["tokens"] for r in rows) == 150
    assert sum(r["requests"] for r in rows) == 5
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(sum(costs), rel=1e-12)


async def test_group_commit_rows_are_durable_when_their_future_completes(tmp_path: Path) -> None:
    """Rows queued in one loop iteration count in memory at once and commit together before their futures complete."""
    from tokenfuse.exporter.meter import CallRecord

    path = tmp_path / "gc.db"
    lg = Ledger(path, zone=TOKYO, window_seconds=3600)
    lg.open(1_000_000.0)
    meter = Meter(parse_config({"departments": {"ops": {}}}), CollectorRegistry())
    labels = meter.labels(department="ops", provider="openai", model="gpt-4o")
    futures = []
    for i in range(50):
        rec = CallRecord(labels, Usage(input_tokens=10, output_tokens=5), 0.01, "success", 1_000_000.0 + i)
        futures.append(lg.record_queued(rec))
    assert lg.window_tokens("ops", 1_000_100.0) == 750  # counted in memory before the commit
    other = sqlite3.connect(path)
    assert other.execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)  # not yet on disk
    assert not any(f is not None and f.done() for f in futures)
    for f in futures:
        assert f is not None
        await f
    assert other.execute("SELECT COUNT(*), SUM(input_tokens + output_tokens) FROM usage").fetchone() == (50, 750)
    assert lg.record_queued(CallRecord(labels, None, 0.0, "blocked", 1_000_060.0)) is None
    last = lg.record_queued(CallRecord(labels, Usage(input_tokens=1), 0.0, "success", 1_000_061.0))
    lg.close()  # commits what is queued
    assert last is not None and last.done()
    assert other.execute("SELECT COUNT(*) FROM usage").fetchone() == (51,)
    other.close()
    again = Ledger(path, zone=TOKYO, window_seconds=3600)
    again.open(1_000_100.0)
    assert again.window_tokens("ops", 1_000_100.0) == 751
    again.close()
