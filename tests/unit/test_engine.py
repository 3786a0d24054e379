"""PolicyEngine: admission with reservations, fuse cycle, month rollover, overrides, reload, remote-source staleness."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry

from tokenfuse.config import Config, parse_config
from tokenfuse.exporter.meter import CallRecord, Meter
from tokenfuse.exporter.metrics import (
    BREAKER_STATE,
    BREAKER_TRANSITIONS_TOTAL,
    BUDGET_LIMIT_USD,
    BUDGET_SPENT_USD,
    POLICY_SOURCE_UP,
    TOKEN_LIMIT,
)
from tokenfuse.metering.types import Usage
from tokenfuse.policies import (
    Admission,
    BudgetExceeded,
    FuseState,
    PolicyEngine,
    Readings,
    SourceError,
    month_of,
)

TOKYO = ZoneInfo("Asia/Tokyo")
T0 = datetime(2026, 11, 15, 12, 0, tzinfo=TOKYO).timestamp()
LIMIT = 20_000
PER_TOKEN = 10.0 / 1_000_000  # the m-1 override: $10 per million tokens in and out


class Clock:
    """A settable clock for the engine."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_config(tmp_path: Path, departments: dict[str, Any] | None = None, **policy: Any) -> Config:
    return parse_config(
        {
            "timezone": "Asia/Tokyo",
            "pricing": {"overrides": {"m-1": {"input": 10.0, "output": 10.0}}},
            "departments": departments
            if departments is not None
            else {
                "eng": {"hourly_token_limit": LIMIT, "monthly_budget_usd": 1.0},
                "mkt": {"monthly_budget_usd": 0.5},
                "ops": {},
            },
            "policy": {"state_path": str(tmp_path / "state.db"), "open_for": 60, "half_open_probes": 2, **policy},
        }
    )


class Rig:
    """An engine on its own registry and state file, with helpers to run calls through it."""

    def __init__(self, tmp_path: Path, *, source: Any = None, t: float = T0, **kw: Any) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock(t)
        self.config = make_config(tmp_path, **kw)
        self.registry = CollectorRegistry()
        self.meter = Meter(self.config, self.registry)
        self.engine = PolicyEngine(self.config, self.meter, source=source, clock=self.clock)
        self.engine.open()

    def admit(self, dept: str = "eng", worst: int = 1000, now: float | None = None) -> Admission:
        return self.engine.admit(
            dept, input_tokens=worst // 2, max_output_tokens=worst - worst // 2, provider="openai", model="m-1", now=now
        )

    def record(self, tokens: int, dept: str = "eng", at: float | None = None, project: str = "web") -> CallRecord:
        labels = self.meter.labels(department=dept, project=project, environment="prod", provider="openai", model="m-1")
        usage = Usage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2)
        return self.meter.record(labels, usage=usage, outcome="success", now=self.clock.t if at is None else at)

    def call(self, tokens: int, dept: str = "eng", worst: int | None = None) -> Admission:
        adm = self.admit(dept, worst if worst is not None else tokens)
        if adm.admitted:
            self.engine.settle(adm.reservation, self.record(tokens, dept))
        return adm

    def state(self, dept: str = "eng") -> str:
        return str(self.engine.fuse_status(dept)[0]["state"])

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def transitions(self, dept: str, a: str, b: str) -> float:
        v = self.sample(BREAKER_TRANSITIONS_TOTAL, department=dept, from_state=a, to_state=b)
        return 0.0 if v is None else v


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.engine.close()


# -- admission ----------------------------------------------------------------------------------------------


def test_admission_reserves_the_worst_case_against_what_is_left(rig: Rig) -> None:
    """Each admission subtracts its worst case from tokens and budget left, before any usage exists."""
    a = rig.admit(worst=1000)
    b = rig.admit(worst=3000)
    assert a.admitted and b.admitted and a.reason is None
    assert (a.tokens_remaining, b.tokens_remaining) == (19_000, 16_000)
    assert a.budget_remaining_usd == pytest.approx(1.0 - 1000 * PER_TOKEN)
    assert b.budget_remaining_usd == pytest.approx(1.0 - 4000 * PER_TOKEN)
    assert a.reservation is not None and a.reservation.tokens == 1000
    assert a.reservation.cost_usd == pytest.approx(1000 * PER_TOKEN)


def test_settle_swaps_the_reservation_for_the_real_usage(rig: Rig) -> None:
    """After settle, only the real usage (from the meter) counts, not the worst case."""
    adm = rig.admit(worst=5000)
    rig.engine.settle(adm.reservation, rig.record(300))
    nxt = rig.admit(worst=1000)
    assert nxt.tokens_remaining == LIMIT - 300 - 1000


def test_a_record_counts_once_whether_or_not_settle_gets_it(rig: Rig) -> None:
    """Usage reaches the ledger through the meter exactly once; settle with or without the record, or twice, adds none."""
    a = rig.admit(worst=1000)
    rec = rig.record(400)
    rig.engine.settle(a.reservation, rec)
    rig.engine.settle(a.reservation, rec)  # idempotent
    b = rig.admit(worst=1000)
    rig.record(600)
    rig.engine.settle(b.reservation, None)
    (st,) = rig.engine.fuse_status("eng")
    assert st["tokens_window"] == 1000
    assert st["tokens_reserved"] == 0 and st["reserved_usd"] == 0.0
    assert st["spent_usd"] == pytest.approx(1000 * PER_TOKEN)


def test_a_request_that_cannot_fit_is_blocked_while_the_fuse_is_closed(rig: Rig) -> None:
    """With 500 tokens left, a 1000-token worst case is refused (token_limit); the fuse stays closed."""
    rig.record(LIMIT - 500, at=T0 - 100)
    adm = rig.admit(worst=1000)
    assert (adm.admitted, adm.reason, adm.state) == (False, "token_limit", FuseState.CLOSED)
    assert adm.tokens_remaining == 500 and adm.reservation is None
    assert adm.retry_after == pytest.approx(3500)  # when the old usage leaves the 1 h window
    assert rig.admit(worst=500).admitted


def test_a_request_larger_than_the_whole_limit_has_no_retry_after(rig: Rig) -> None:
    """A worst case above the hourly limit can never fit: refused with retry_after None."""
    adm = rig.admit(worst=LIMIT + 1)
    assert (adm.admitted, adm.reason, adm.retry_after) == (False, "token_limit", None)


def test_insufficient_budget_waits_for_the_next_month_in_the_zone(rig: Rig) -> None:
    """A worst case above the budget left is refused with retry_after = time to the month start in Tokyo."""
    rig.record(45_000, dept="mkt")  # $0.45 of $0.50
    adm = rig.admit("mkt", worst=10_000)  # $0.10
    assert (adm.admitted, adm.reason) == (False, "insufficient_budget")
    assert adm.retry_after == pytest.approx(datetime(2026, 12, 1, tzinfo=TOKYO).timestamp() - T0)
    assert adm.budget_remaining_usd == pytest.approx(0.05)
    assert rig.admit("mkt", worst=4000).admitted


def test_budget_held_by_requests_in_flight_says_retry_soon(rig: Rig) -> None:
    """When only in-flight reservations hold the budget, the refusal's retry_after is the interval, not month end."""
    held = rig.admit("mkt", worst=45_000)  # $0.45 reserved, nothing spent
    adm = rig.admit("mkt", worst=10_000)
    assert (adm.admitted, adm.reason, adm.retry_after) == (False, "insufficient_budget", 5.0)
    rig.engine.settle(held.reservation, None)
    assert rig.admit("mkt", worst=10_000).admitted


def test_unassigned_and_unlimited_departments_are_never_blocked(rig: Rig) -> None:
    """unassigned, unknown and limit-free departments are admitted without reservation whatever they use."""
    rig.record(10**9, dept="ops")
    for dept in ("unassigned", "nobody", "ops"):
        adm = rig.admit(dept, worst=10**8)
        assert adm.admitted and adm.reservation is None and adm.tokens_remaining is None
        assert adm.budget_remaining_usd is None


def test_200_concurrent_threads_with_room_for_20_admit_exactly_20(rig: Rig) -> None:
    """200 threads admitting at once at a department with room for 20 worst cases: exactly 20 get a reservation."""
    start, admitted_all = threading.Barrier(200), threading.Barrier(200)
    results: list[Admission] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        adm = rig.admit(worst=1000)
        with lock:
            results.append(adm)
        admitted_all.wait()  # every admission decided before any usage arrives
        if adm.admitted:
            rig.engine.settle(adm.reservation, rig.record(1000))  # the worst case, fully used

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 200
    assert sum(a.admitted for a in results) == 20
    assert {a.reason for a in results if not a.admitted} == {"token_limit"}
    (st,) = rig.engine.fuse_status("eng")
    assert (st["tokens_window"], st["tokens_reserved"], st["state"]) == (LIMIT, 0, "open")  # 0 tokens beyond


def test_200_free_running_threads_never_pass_the_limit(rig: Rig) -> None:
    """200 threads that admit, record and settle as they go: the window never holds more than the limit."""
    barrier = threading.Barrier(200)
    admitted = [0]
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        adm = rig.admit(worst=1000)
        if adm.admitted:
            rig.engine.settle(adm.reservation, rig.record(1000))
            with lock:
                admitted[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    (st,) = rig.engine.fuse_status("eng")
    # Between meter.record and settle a call counts twice (usage + reservation): that can refuse a thread that would
    # have fit, never admit one that does not.
    assert 1 <= admitted[0] <= 20
    assert st["tokens_window"] == admitted[0] * 1000 <= LIMIT


async def test_200_concurrent_gateway_requests_never_exceed_the_limit(tmp_path: Path) -> None:
    """200 asyncio requests (admit, await upstream, record, settle) at room for 20: used tokens never pass the limit."""
    rig = Rig(tmp_path)

    async def request(i: int) -> bool:
        adm = rig.admit(worst=1000)
        if not adm.admitted:
            return False
        await asyncio.sleep(0.001 * (i % 7))
        rig.engine.settle(adm.reservation, rig.record(700 + i % 300))  # real usage below the worst case
        return True

    admitted = await asyncio.gather(*(request(i) for i in range(200)))
    (st,) = rig.engine.fuse_status("eng")
    assert st["tokens_window"] <= LIMIT
    assert sum(admitted) >= 20  # settled requests free room for later ones
    rig.engine.close()


# -- the fuse through the engine ---------------------------------------------------------------------------


def test_reaching_the_limit_opens_the_fuse_exports_and_logs_it(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """Usage reaching the hourly limit opens the fuse: gauges, transition counter and a JSON log line say so."""
    caplog.set_level(logging.INFO, logger="tokenfuse.policy")
    rig.record(LIMIT)
    adm = rig.admit(worst=1)
    assert (adm.admitted, adm.reason, adm.state) == (False, "fuse_open", FuseState.OPEN)
    assert adm.retry_after == pytest.approx(60)  # open_for
    assert rig.sample(BREAKER_STATE, department="eng", state="open") == 1.0
    assert rig.sample(BREAKER_STATE, department="eng", state="closed") == 0.0
    assert rig.transitions("eng", "closed", "open") == 1.0
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if "fuse_transition" in r.getMessage()]
    assert line["event"] == "fuse_transition"
    assert (line["department"], line["from"], line["to"], line["reason"]) == ("eng", "closed", "open", "token_limit")
    assert line["tokens_window"] == LIMIT and line["spent_usd"] == pytest.approx(LIMIT * PER_TOKEN)


def test_full_cycle_open_half_open_probes_closed(tmp_path: Path) -> None:
    """OPEN for open_for, then HALF_OPEN admits exactly half_open_probes, and their settling closes the fuse."""
    rig = Rig(tmp_path, token_window=120)
    rig.record(LIMIT)
    assert rig.state() == "open"
    rig.clock.t = T0 + 59
    assert rig.admit(worst=1).reason == "fuse_open"
    rig.clock.t = T0 + 121  # open_for elapsed and the usage left the 120 s window
    p1, p2, p3 = rig.admit(), rig.admit(), rig.admit()
    assert (p1.admitted, p2.admitted, p3.admitted) == (True, True, False)
    assert p1.state is FuseState.HALF_OPEN and p3.reason == "fuse_open" and p3.retry_after == 5.0
    rig.engine.settle(p1.reservation, rig.record(100))
    assert rig.state() == "half_open"  # one probe still out
    rig.engine.settle(p2.reservation, rig.record(100))
    assert rig.state() == "closed"
    for a, b in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert rig.transitions("eng", a, b) == 1.0
    rig.engine.close()


def test_half_open_probe_that_reaches_the_limit_reopens_the_fuse(tmp_path: Path) -> None:
    """A probe whose usage brings the window back to the limit sends HALF_OPEN back to OPEN."""
    rig = Rig(tmp_path, token_window=120)
    rig.record(LIMIT)
    rig.clock.t = T0 + 121
    probe = rig.admit(worst=LIMIT)
    assert probe.admitted and probe.state is FuseState.HALF_OPEN
    rig.engine.settle(probe.reservation, rig.record(LIMIT))
    assert rig.state() == "open"
    assert rig.transitions("eng", "half_open", "open") == 1.0
    rig.engine.close()


def test_budget_fuse_opens_until_the_month_rolls_over_in_tokyo(tmp_path: Path) -> None:
    """A spent budget blocks until 00:00 Dec 1 Tokyo (retry_after counts to it), though UTC is still in November."""
    late_nov = datetime(2026, 11, 30, 23, 30, tzinfo=TOKYO).timestamp()
    rig = Rig(tmp_path, t=late_nov)
    rig.record(50_000, dept="mkt")  # $0.50: the whole budget
    adm = rig.admit("mkt")
    assert (adm.admitted, adm.reason, adm.retry_after) == (False, "fuse_open", pytest.approx(1800))
    rig.clock.t = late_nov + 1799
    assert not rig.admit("mkt").admitted  # open_for (60 s) does not half-open a budget fuse
    dec = late_nov + 1801
    assert month_of(dec, ZoneInfo("UTC")).name == "2026-11"
    rig.clock.t = dec
    adm = rig.admit("mkt")
    assert adm.admitted and adm.state is FuseState.CLOSED
    assert adm.budget_remaining_usd == pytest.approx(0.5 - 1000 * PER_TOKEN)
    assert rig.transitions("mkt", "open", "closed") == 1.0
    assert rig.engine.usage("mkt", "2026-11")["total"]["cost_usd"] == pytest.approx(0.5)
    rig.engine.close()


def test_the_open_fuse_refuses_even_requests_that_would_fit(tmp_path: Path) -> None:
    """Hysteresis: once open, a 1-token request is refused though the window slid under the limit."""
    rig = Rig(tmp_path, token_window=30)
    rig.record(LIMIT)
    rig.clock.t = T0 + 31  # usage gone from the 30 s window, open_for (60 s) not over
    adm = rig.admit(worst=1)
    assert (adm.admitted, adm.reason, adm.tokens_remaining) == (False, "fuse_open", LIMIT)
    rig.engine.close()


# -- overrides ----------------------------------------------------------------------------------------------


def test_override_open_blocks_until_its_ttl(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """A forced open blocks a department with room left until ttl_seconds pass, and is logged as JSON."""
    caplog.set_level(logging.INFO, logger="tokenfuse.policy")
    out = rig.engine.override("eng", "open", "runaway agent", 120, actor="alice")
    assert out["state"] == "open" and out["override"]["until"] == T0 + 120
    adm = rig.admit(worst=1)
    assert (adm.reason, adm.retry_after) == ("fuse_open", pytest.approx(120))
    rig.clock.t = T0 + 120
    assert rig.admit(worst=1).admitted
    events = [json.loads(r.getMessage()) for r in caplog.records]
    ov = next(e for e in events if e["event"] == "fuse_override")
    assert (ov["action"], ov["reason"], ov["actor"], ov["ttl_seconds"]) == ("open", "runaway agent", "alice", 120)
    assert [e["reason"] for e in events if e["event"] == "fuse_transition"] == ["override", "override_ended"]


def test_override_close_admits_a_spent_department_and_auto_restores(rig: Rig) -> None:
    """A forced close admits past a spent budget; auto puts the numbers back in charge at once."""
    rig.record(50_000, dept="mkt")
    assert rig.admit("mkt").reason == "fuse_open"
    rig.engine.override("mkt", "close", "quarter-end demo", None, actor="bob")
    adm = rig.admit("mkt", worst=100_000)
    assert adm.admitted and adm.reservation is not None and adm.budget_remaining_usd == 0.0
    rig.engine.settle(adm.reservation, None)
    out = rig.engine.override("mkt", "auto", "demo over", None, actor="bob")
    assert out["state"] == "open" and out["override"] is None
    audit = rig.engine.overrides("mkt")
    assert [(e["action"], e["actor"], e["reason"]) for e in audit] == [
        ("auto", "bob", "demo over"),
        ("close", "bob", "quarter-end demo"),
    ]


@pytest.mark.parametrize(
    ("dept", "action", "ttl", "match"),
    [("nope", "open", None, "unknown department"), ("eng", "melt", None, "action"), ("eng", "open", -1.0, "ttl")],
)
def test_override_rejects_bad_input(rig: Rig, dept: str, action: Any, ttl: float | None, match: str) -> None:
    """Unknown department, unknown action and a non-positive ttl are refused with a message naming the field."""
    with pytest.raises(ValueError, match=match):
        rig.engine.override(dept, action, "x", ttl)


# -- persistence and reload ---------------------------------------------------------------------------------


def test_fuse_spend_and_override_survive_a_restart(tmp_path: Path) -> None:
    """A new engine on the same state file has the same open fuse, month spend and override."""
    a = Rig(tmp_path)
    a.record(50_000, dept="mkt")
    a.engine.override("eng", "open", "audit", 3600)
    a.engine.close()
    b = Rig(tmp_path, t=T0 + 10)
    assert b.state("mkt") == "open" and b.state("eng") == "open"
    (mkt,) = b.engine.fuse_status("mkt")
    assert mkt["spent_usd"] == pytest.approx(0.5) and mkt["cause"] == "budget"
    assert b.engine.fuse_status("eng")[0]["override"]["reason"] == "audit"
    assert b.sample(BREAKER_STATE, department="mkt", state="open") == 1.0
    b.engine.close()


def test_limit_gauges_follow_the_config(rig: Rig) -> None:
    """Budget and token-limit gauges are exported for departments that have them, and only those."""
    assert rig.sample(BUDGET_LIMIT_USD, department="eng", period="month") == 1.0
    assert rig.sample(TOKEN_LIMIT, department="eng", window="1h") == LIMIT
    assert rig.sample(BUDGET_LIMIT_USD, department="mkt", period="month") == 0.5
    assert rig.sample(TOKEN_LIMIT, department="mkt", window="1h") is None
    assert rig.sample(BUDGET_LIMIT_USD, department="ops", period="month") is None


def test_reload_raises_a_budget_without_losing_spend(rig: Rig) -> None:
    """Raising the budget on reload closes the budget fuse; the spend and the gauges carry over."""
    rig.record(50_000, dept="mkt")
    assert rig.state("mkt") == "open"
    cfg = make_config(
        rig.tmp_path,
        departments={"eng": {"hourly_token_limit": LIMIT, "monthly_budget_usd": 1.0}, "mkt": {"monthly_budget_usd": 2}},
    )
    rig.engine.reconfigure(cfg)
    assert rig.state("mkt") == "closed"
    assert rig.sample(BUDGET_LIMIT_USD, department="mkt", period="month") == 2.0
    assert rig.sample(BUDGET_SPENT_USD, department="mkt", period="month") == pytest.approx(0.5)
    assert rig.sample(BREAKER_STATE, department="ops", state="closed") is None  # ops was removed
    assert rig.admit("mkt", worst=10_000).budget_remaining_usd == pytest.approx(1.4)


def test_reload_lowering_a_limit_opens_the_fuse(rig: Rig) -> None:
    """Lowering the hourly limit below the window's usage opens the fuse on reload."""
    rig.record(5_000)
    rig.engine.reconfigure(make_config(rig.tmp_path, departments={"eng": {"hourly_token_limit": 4_000}}))
    assert rig.state() == "open"


# -- remote sources -----------------------------------------------------------------------------------------


class FakeSource:
    """A RateSource whose numbers and failures the test sets."""

    name = "fake"

    def __init__(self) -> None:
        self.tokens: dict[str, float] = {}
        self.spent: dict[str, float] = {}
        self.fail = False

    async def fetch(self, now: float, departments: Sequence[str]) -> Readings:
        if self.fail:
            raise SourceError("fake source down")
        return Readings(at=now, period=month_of(now, TOKYO).name, tokens=dict(self.tokens), spent_usd=dict(self.spent))

    async def aclose(self) -> None:
        return None


async def test_remote_numbers_plus_own_usage_since_the_query(tmp_path: Path) -> None:
    """Other replicas' usage (remote) plus this replica's usage since the query both count against the limit."""
    src = FakeSource()
    rig = Rig(tmp_path, source=src, max_staleness=30)
    src.tokens = {"eng": 15_000}
    await rig.engine.evaluate()
    rig.clock.t += 1
    rig.record(3_000)
    adm = rig.admit(worst=1_000)
    assert adm.tokens_remaining == LIMIT - 15_000 - 3_000 - 1_000
    assert not rig.admit(worst=1_500).admitted
    await rig.engine.stop()


async def test_remote_numbers_never_hide_what_this_replica_metered(tmp_path: Path) -> None:
    """When the remote sum lags below this replica's own usage, the own (exact) usage decides."""
    src = FakeSource()
    rig = Rig(tmp_path, source=src)
    rig.record(LIMIT)
    await rig.engine.evaluate()  # remote still says 0
    assert rig.state() == "open"
    await rig.engine.stop()


async def test_stale_source_keeps_the_last_decision_then_fails_open(tmp_path: Path) -> None:
    """A failing source keeps the last numbers for max_staleness, then fail_open admits on local numbers."""
    src = FakeSource()
    rig = Rig(tmp_path, source=src, max_staleness=30, on_source_error="fail_open")
    src.spent = {"mkt": 0.6}
    await rig.engine.evaluate()
    assert rig.admit("mkt").reason == "fuse_open"
    assert rig.sample(POLICY_SOURCE_UP, source="fake") == 1.0
    src.fail = True
    rig.clock.t += 20
    await rig.engine.evaluate()
    assert rig.sample(POLICY_SOURCE_UP, source="fake") == 0.0
    assert rig.admit("mkt").reason == "fuse_open"  # within max_staleness: last decision holds
    rig.clock.t += 11
    assert rig.admit("mkt").admitted  # stale: fail_open, this replica spent nothing
    src.fail = False
    await rig.engine.evaluate()
    assert rig.admit("mkt").reason == "fuse_open"  # fresh numbers again
    await rig.engine.stop()


async def test_stale_source_fails_closed_when_configured(tmp_path: Path) -> None:
    """With fail_closed, a source down longer than max_staleness blocks limited departments only, until it is back."""
    src = FakeSource()
    rig = Rig(tmp_path, source=src, max_staleness=30, on_source_error="fail_closed")
    await rig.engine.evaluate()
    src.fail = True
    rig.clock.t += 31
    await rig.engine.evaluate()
    adm = rig.admit()
    assert (adm.admitted, adm.reason, adm.retry_after) == (False, "fuse_open", 5.0)
    assert rig.engine.fuse_status("eng")[0]["cause"] == "source_unavailable"
    assert rig.admit("ops").admitted
    src.fail = False
    await rig.engine.evaluate()
    assert rig.admit().admitted
    await rig.engine.stop()


# -- reports, status, housekeeping ---------------------------------------------------------------------------


def test_usage_and_month_totals_equal_the_metered_calls(rig: Rig) -> None:
    """usage() and month_totals() add up to exactly what the meter recorded for the month."""
    for i, n in enumerate((100, 250, 400)):
        rig.call(n, worst=1000) if i != 1 else rig.record(n, project="etl")
    rig.record(999, dept="ops")
    u = rig.engine.usage("eng", "2026-11")
    assert u["total"]["tokens"] == 750 and u["timezone"] == "Asia/Tokyo"
    assert {p["project"]: p["tokens"] for p in u["by_project"]} == {"web": 500, "etl": 250}
    rows = rig.engine.month_totals("2026-11")
    assert sum(r["tokens"] for r in rows) == 750 + 999
    assert sum(r["cost_usd"] for r in rows) == pytest.approx((750 + 999) * PER_TOKEN)
    with pytest.raises(ValueError, match="YYYY-MM"):
        rig.engine.usage("eng", "November")


def test_fuse_status_reports_limits_usage_and_reservations(rig: Rig) -> None:
    """fuse_status lists every department with state, window usage, spend, limits and outstanding reservations."""
    rig.record(1_000)
    rig.admit(worst=2_000)
    status = {s["department"]: s for s in rig.engine.fuse_status()}
    assert set(status) == {"eng", "mkt", "ops"}
    eng = status["eng"]
    assert (eng["state"], eng["tokens_window"], eng["token_limit"], eng["tokens_reserved"]) == (
        "closed",
        1_000,
        LIMIT,
        2_000,
    )
    assert (eng["budget_usd"], eng["period"], eng["window"], eng["source"]) == (1.0, "2026-11", "1h", "local")
    with pytest.raises(ValueError, match="unknown department"):
        rig.engine.fuse_status("nope")


async def test_a_reservation_never_settled_expires(rig: Rig) -> None:
    """A reservation nobody settles is released after the reservation ttl, so it cannot block forever."""
    rig.admit(worst=LIMIT)
    assert not rig.admit(worst=1).admitted
    rig.clock.t += 601
    await rig.engine.evaluate()
    assert rig.admit(worst=1).admitted


def test_admit_before_open_is_an_error(tmp_path: Path) -> None:
    """An engine that was never opened refuses to admit instead of silently admitting everything."""
    cfg = make_config(tmp_path)
    engine = PolicyEngine(cfg, Meter(cfg, CollectorRegistry()))
    with pytest.raises(RuntimeError, match="open"):
        engine.admit("eng", input_tokens=1, max_output_tokens=1, provider="openai", model="m-1")


def test_budget_exceeded_carries_the_refusal(rig: Rig) -> None:
    """BudgetExceeded.from_admission keeps department, reason and retry_after, and says them in its message."""
    rig.record(LIMIT)
    exc = BudgetExceeded.from_admission(rig.admit())
    assert (exc.department, exc.reason, exc.retry_after) == ("eng", "fuse_open", pytest.approx(60))
    assert "eng" in str(exc) and "fuse_open" in str(exc) and "60" in str(exc)


async def test_start_and_stop_run_the_evaluation_loop(tmp_path: Path) -> None:
    """start() evaluates on its interval: an open_for timer expires without any traffic."""
    rig = Rig(tmp_path, interval=0.05, open_for=0.1, token_window=0.1, t=T0)
    rig.engine.close()
    engine = PolicyEngine(rig.config, rig.meter)  # real clock
    await engine.start()
    rig.meter.record(
        rig.meter.labels(department="eng", provider="openai", model="m-1"),
        usage=Usage(input_tokens=LIMIT, output_tokens=0),
        outcome="success",
    )
    assert rig.sample(BREAKER_STATE, department="eng", state="open") == 1.0
    for _ in range(200):  # only the loop evaluates here: reading the gauge does not
        await asyncio.sleep(0.05)
        if rig.sample(BREAKER_STATE, department="eng", state="half_open") == 1.0:
            break
    assert rig.sample(BREAKER_STATE, department="eng", state="half_open") == 1.0
    await engine.stop()
    assert engine._task is None
