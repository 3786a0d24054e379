"""The fuse state machine and the budget calendar: every transition, hysteresis, overrides, month rollover."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfuse.policies.calendar import month_of, parse_period
from tokenfuse.policies.fuse import (
    Fuse,
    FuseLimits,
    FuseState,
    OpenCause,
    Override,
    Reading,
)

TOKYO = ZoneInfo("Asia/Tokyo")
BERLIN = ZoneInfo("Europe/Berlin")
LIMITS = FuseLimits(token_limit=1000, budget_usd=10.0, open_for=300.0, half_open_probes=2)
T0 = 1_800_000_000.0
JAN = "2027-01"  # the month of T0


def rd(tokens: float = 0, spent: float = 0.0, period: str = JAN) -> Reading:
    return Reading(tokens=tokens, spent_usd=spent, period=period)


def tripped_on_tokens() -> Fuse:
    f = Fuse("eng", since=T0)
    f.evaluate(T0, rd(tokens=1000), LIMITS)
    return f


# -- CLOSED -------------------------------------------------------------------------------------------------


def test_closed_stays_closed_just_below_both_limits() -> None:
    """One token under the limit and one cent under the budget keep the fuse closed."""
    f = Fuse("eng")
    assert f.evaluate(T0, rd(tokens=999, spent=9.99), LIMITS) == []
    assert f.state is FuseState.CLOSED


def test_closed_opens_when_window_tokens_reach_the_limit() -> None:
    """Tokens equal to the hourly limit open the fuse with cause token_limit and a half-open time open_for later."""
    f = Fuse("eng")
    (t,) = f.evaluate(T0, rd(tokens=1000), LIMITS)
    assert (t.from_state, t.to_state, t.reason) == (FuseState.CLOSED, FuseState.OPEN, "token_limit")
    assert f.cause is OpenCause.TOKEN_LIMIT
    assert f.half_open_at == T0 + 300.0
    assert f.retry_after(T0 + 100, T0 + 10**6) == 200.0


def test_closed_opens_when_spend_reaches_the_budget() -> None:
    """Spend equal to the monthly budget opens the fuse with cause budget; retry_after is the time to month end."""
    f = Fuse("eng")
    (t,) = f.evaluate(T0, rd(spent=10.0), LIMITS)
    assert (t.to_state, t.reason, f.cause, f.period) == (FuseState.OPEN, "budget", OpenCause.BUDGET, JAN)
    assert f.half_open_at is None
    assert f.retry_after(T0, T0 + 5000.0) == 5000.0


def test_budget_wins_when_both_limits_are_reached() -> None:
    """Over both the budget and the token limit, the cause is budget (the one that does not half-open)."""
    f = Fuse("eng")
    f.evaluate(T0, rd(tokens=5000, spent=50.0), LIMITS)
    assert f.cause is OpenCause.BUDGET


def test_department_without_limits_never_opens() -> None:
    """A department with neither limit stays closed whatever it uses."""
    f = Fuse("ops")
    none = FuseLimits(None, None, 300.0, 2)
    assert f.evaluate(T0, rd(tokens=10**9, spent=10**6), none) == []
    assert f.state is FuseState.CLOSED


# -- OPEN (token limit) ------------------------------------------------------------------------------------------


def test_token_fuse_stays_open_until_open_for_even_when_usage_drops() -> None:
    """Hysteresis: an hourly-limit fuse does not close when the window dips below the limit before open_for."""
    f = tripped_on_tokens()
    assert f.evaluate(T0 + 299.999, rd(tokens=0), LIMITS) == []
    assert f.state is FuseState.OPEN


def test_token_fuse_goes_half_open_after_open_for() -> None:
    """At exactly open_for after opening the fuse goes HALF_OPEN with half_open_probes probes."""
    f = tripped_on_tokens()
    (t,) = f.evaluate(T0 + 300.0, rd(tokens=10), LIMITS)
    assert (t.from_state, t.to_state, t.reason) == (FuseState.OPEN, FuseState.HALF_OPEN, "open_for_elapsed")
    assert f.probes_left == 2 and f.cause is None


def test_token_fuse_becomes_budget_fuse_when_spend_catches_up() -> None:
    """An hourly-limit fuse whose department then spends its budget stays OPEN past open_for (cause budget)."""
    f = tripped_on_tokens()
    assert f.evaluate(T0 + 10, rd(tokens=1000, spent=10.0), LIMITS) == []
    assert f.cause is OpenCause.BUDGET
    assert f.evaluate(T0 + 10_000, rd(tokens=0, spent=10.0), LIMITS) == []
    assert f.state is FuseState.OPEN


def test_token_fuse_closes_when_its_limit_is_removed() -> None:
    """An hourly-limit fuse closes when a reload removes the hourly limit."""
    f = tripped_on_tokens()
    (t,) = f.evaluate(T0 + 1, rd(tokens=5000), FuseLimits(None, 10.0, 300.0, 2))
    assert (t.to_state, t.reason) == (FuseState.CLOSED, "token_limit_removed")


# -- HALF_OPEN ----------------------------------------------------------------------------------------------


def half_open() -> Fuse:
    f = tripped_on_tokens()
    f.evaluate(T0 + 300, rd(tokens=10), LIMITS)
    assert f.state is FuseState.HALF_OPEN
    return f


def test_half_open_hands_out_exactly_the_configured_probes() -> None:
    """HALF_OPEN gives out half_open_probes probes, then refuses more."""
    f = half_open()
    assert [f.take_probe() for _ in range(3)] == [True, True, False]
    assert f.probes_in_flight == 2


def test_half_open_waits_for_probes_to_settle_before_closing() -> None:
    """HALF_OPEN stays while probes are unused or in flight; closes once all settled under the limit."""
    f = half_open()
    assert f.evaluate(T0 + 301, rd(tokens=10), LIMITS) == []  # no probe used yet
    f.take_probe()
    f.take_probe()
    assert f.evaluate(T0 + 302, rd(tokens=10), LIMITS) == []  # both in flight
    f.probe_done(f.epoch)
    assert f.evaluate(T0 + 303, rd(tokens=10), LIMITS) == []  # one still in flight
    f.probe_done(f.epoch)
    (t,) = f.evaluate(T0 + 304, rd(tokens=900), LIMITS)
    assert (t.from_state, t.to_state, t.reason) == (FuseState.HALF_OPEN, FuseState.CLOSED, "probes_passed")


def test_half_open_reopens_when_probes_push_usage_over_the_limit() -> None:
    """HALF_OPEN goes back to OPEN (a fresh open_for) when usage is at the limit again."""
    f = half_open()
    f.take_probe()
    (t,) = f.evaluate(T0 + 310, rd(tokens=1000), LIMITS)
    assert (t.from_state, t.to_state, t.reason) == (FuseState.HALF_OPEN, FuseState.OPEN, "token_limit")
    assert f.half_open_at == T0 + 610
    assert f.probes_in_flight == 0 and f.probes_left == 0


def test_half_open_reopens_on_budget() -> None:
    """HALF_OPEN goes to OPEN with cause budget when the budget is spent."""
    f = half_open()
    (t,) = f.evaluate(T0 + 310, rd(tokens=0, spent=10.0), LIMITS)
    assert (t.to_state, f.cause) == (FuseState.OPEN, OpenCause.BUDGET)


def test_probe_from_an_earlier_half_open_phase_is_ignored() -> None:
    """A probe settled after its HALF_OPEN phase ended does not count against the next phase."""
    f = half_open()
    f.take_probe()
    old_epoch = f.epoch
    f.evaluate(T0 + 310, rd(tokens=1000), LIMITS)  # back to OPEN
    f.evaluate(T0 + 610, rd(tokens=0), LIMITS)  # HALF_OPEN again
    f.take_probe()
    f.probe_done(old_epoch)
    assert f.probes_in_flight == 1


def test_one_transition_per_evaluation() -> None:
    """An evaluation makes at most one state change (OPEN→HALF_OPEN, not straight on to OPEN)."""
    f = tripped_on_tokens()
    out = f.evaluate(T0 + 300, rd(tokens=5000), LIMITS)
    assert [t.to_state for t in out] == [FuseState.HALF_OPEN]
    out = f.evaluate(T0 + 300, rd(tokens=5000), LIMITS)
    assert [t.to_state for t in out] == [FuseState.OPEN]


# -- OPEN (budget) ------------------------------------------------------------------------------------------


def budget_open(period: str = JAN) -> Fuse:
    f = Fuse("eng")
    f.evaluate(T0, rd(spent=10.0, period=period), LIMITS)
    return f


def test_budget_fuse_never_half_opens() -> None:
    """A spent monthly budget keeps the fuse OPEN long after open_for."""
    f = budget_open()
    assert f.evaluate(T0 + 86_400, rd(spent=10.0), LIMITS) == []
    assert f.state is FuseState.OPEN


def test_budget_fuse_closes_on_month_rollover() -> None:
    """When the month rolls over (spend of the new month is 0), the budget fuse closes with reason month_rollover."""
    f = budget_open()
    (t,) = f.evaluate(T0 + 10, rd(spent=0.0, period="2027-02"), LIMITS)
    assert (t.to_state, t.reason) == (FuseState.CLOSED, "month_rollover")


def test_budget_fuse_closes_when_budget_is_raised() -> None:
    """Raising the budget above the spend closes the fuse (reason budget_cleared)."""
    f = budget_open()
    raised = FuseLimits(1000, 20.0, 300.0, 2)
    (t,) = f.evaluate(T0 + 10, rd(spent=10.0), raised)
    assert (t.to_state, t.reason) == (FuseState.CLOSED, "budget_cleared")


def test_budget_cleared_but_tokens_over_keeps_fuse_open_on_the_hourly_clock() -> None:
    """A cleared budget with the window still over the limit becomes an hourly-limit fuse timed from opening."""
    f = budget_open()
    assert f.evaluate(T0 + 10, rd(tokens=2000, spent=0.0, period="2027-02"), LIMITS) == []
    assert (f.state, f.cause, f.half_open_at) == (FuseState.OPEN, OpenCause.TOKEN_LIMIT, T0 + 300)


# -- overrides ----------------------------------------------------------------------------------------------


def test_override_open_blocks_and_expires() -> None:
    """A forced open with a ttl opens at once and closes on the first evaluation after the ttl."""
    f = Fuse("eng")
    ov = Override("open", "incident 42", "alice", T0, T0 + 60)
    (t,) = f.set_override(ov, T0, rd(), LIMITS)
    assert (t.to_state, t.reason, f.cause) == (FuseState.OPEN, "override", OpenCause.OVERRIDE)
    assert f.retry_after(T0 + 15, T0 + 10**6) == 45.0
    assert f.evaluate(T0 + 59.9, rd(), LIMITS) == []
    (t,) = f.evaluate(T0 + 60, rd(), LIMITS)
    assert (t.to_state, t.reason, f.override) == (FuseState.CLOSED, "override_ended", None)


def test_expired_override_open_hands_over_to_a_spent_budget() -> None:
    """When a forced open ends while the budget is spent, the fuse stays OPEN with cause budget."""
    f = Fuse("eng")
    f.set_override(Override("open", "x", "a", T0, T0 + 60), T0, rd(), LIMITS)
    assert f.evaluate(T0 + 61, rd(spent=10.0), LIMITS) == []
    assert (f.state, f.cause) == (FuseState.OPEN, OpenCause.BUDGET)


def test_override_close_holds_against_a_spent_budget_until_it_expires() -> None:
    """A forced close keeps a spent department CLOSED until its ttl; then the budget opens it again."""
    f = budget_open()
    (t,) = f.set_override(Override("close", "ceo demo", "bob", T0, T0 + 100), T0, rd(spent=10.0), LIMITS)
    assert (t.to_state, t.reason) == (FuseState.CLOSED, "override")
    assert f.evaluate(T0 + 99, rd(tokens=10**6, spent=99.0), LIMITS) == []
    (t,) = f.evaluate(T0 + 100, rd(spent=99.0), LIMITS)
    assert (t.to_state, t.reason) == (FuseState.OPEN, "budget")


def test_override_auto_returns_to_the_numbers() -> None:
    """Removing an override (auto) re-evaluates at once: a spent budget reopens a force-closed fuse."""
    f = budget_open()
    f.set_override(Override("close", "x", "a", T0, None), T0, rd(spent=10.0), LIMITS)
    assert f.state is FuseState.CLOSED
    (t,) = f.set_override(None, T0 + 5, rd(spent=10.0), LIMITS)
    assert t.to_state is FuseState.OPEN


def test_override_without_ttl_never_expires() -> None:
    """An override with no ttl holds indefinitely and has no retry_after."""
    f = Fuse("eng")
    f.set_override(Override("open", "x", "a", T0, None), T0, rd(), LIMITS)
    assert f.evaluate(T0 + 10**8, rd(), LIMITS) == []
    assert f.state is FuseState.OPEN and f.retry_after(T0 + 1, T0 + 2) is None


# -- source loss --------------------------------------------------------------------------------------------


def test_no_reading_fails_closed_and_recovery_closes() -> None:
    """Without numbers (fail_closed) a limited fuse opens; the first good reading under the limits closes it."""
    f = Fuse("eng")
    (t,) = f.evaluate(T0, None, LIMITS)
    assert (t.to_state, t.reason, f.cause) == (FuseState.OPEN, "source_unavailable", OpenCause.SOURCE_UNAVAILABLE)
    (t,) = f.evaluate(T0 + 5, rd(tokens=10), LIMITS)
    assert (t.to_state, t.reason) == (FuseState.CLOSED, "source_recovered")


def test_no_reading_leaves_an_unlimited_department_closed() -> None:
    """fail_closed never blocks a department that has no limits."""
    f = Fuse("ops")
    assert f.evaluate(T0, None, FuseLimits(None, None, 300.0, 2)) == []


def test_recovery_over_the_limit_becomes_an_hourly_limit_fuse() -> None:
    """A source that comes back showing the limit reached keeps the fuse OPEN with a fresh open_for."""
    f = Fuse("eng")
    f.evaluate(T0, None, LIMITS)
    assert f.evaluate(T0 + 30, rd(tokens=1000), LIMITS) == []
    assert (f.cause, f.half_open_at) == (OpenCause.TOKEN_LIMIT, T0 + 330)


# -- persistence --------------------------------------------------------------------------------------------


def test_snapshot_round_trip_keeps_state_cause_and_override() -> None:
    """restore(snapshot()) gives back the same state, cause, timers and override (probes in flight excepted)."""
    f = budget_open()
    f.set_override(Override("open", "why", "who", T0, T0 + 9), T0, rd(spent=10.0), LIMITS)
    g = Fuse.restore("eng", f.snapshot())
    assert (g.state, g.cause, g.since, g.half_open_at, g.period, g.override, g.epoch) == (
        f.state,
        f.cause,
        f.since,
        f.half_open_at,
        f.period,
        f.override,
        f.epoch,
    )


def test_restore_rejects_an_unknown_state() -> None:
    """A snapshot with a state the code does not know is an error, not a silently closed fuse."""
    with pytest.raises(ValueError):
        Fuse.restore("eng", {"state": "melted"})


# -- property: only the edges of the machine ------------------------------------------------------------------

readings = st.one_of(
    st.none(),
    st.builds(
        Reading,
        tokens=st.integers(0, 2000),
        spent_usd=st.floats(0, 20),
        period=st.sampled_from(["2027-01", "2027-02"]),
    ),
)
ALLOWED = {
    (FuseState.CLOSED, FuseState.OPEN),
    (FuseState.OPEN, FuseState.HALF_OPEN),
    (FuseState.OPEN, FuseState.CLOSED),
    (FuseState.HALF_OPEN, FuseState.CLOSED),
    (FuseState.HALF_OPEN, FuseState.OPEN),
}


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 400), readings, st.booleans(), st.booleans()), max_size=40))
def test_random_histories_only_take_allowed_edges(steps: list[tuple[float, Reading | None, bool, bool]]) -> None:
    """Whatever the readings, probes and timing: no CLOSED→HALF_OPEN, no self-loops, a budget fuse never half-opens."""
    f = Fuse("eng", since=T0)
    now = T0
    for dt, reading, probe, settle in steps:
        now += dt
        if probe:
            f.take_probe()
        if settle:
            f.probe_done(f.epoch)
        cause_before = f.cause
        for t in f.evaluate(now, reading, LIMITS):
            assert (t.from_state, t.to_state) in ALLOWED and t.from_state is not t.to_state
            if t.to_state is FuseState.HALF_OPEN:
                assert cause_before is OpenCause.TOKEN_LIMIT
        assert f.probes_left >= 0 and f.probes_in_flight >= 0
        assert (f.cause is None) == (f.state is not FuseState.OPEN)


# -- the budget calendar ------------------------------------------------------------------------------------


def test_month_of_uses_the_configured_zone() -> None:
    """2026-11-30 15:30 UTC is already December in Tokyo (UTC+9) and still November in UTC."""
    t = datetime(2026, 11, 30, 15, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    p = month_of(t, TOKYO)
    assert p.name == "2026-12"
    assert p.start == datetime(2026, 12, 1, tzinfo=TOKYO).timestamp() == t - 30 * 60
    assert month_of(t, ZoneInfo("UTC")).name == "2026-11"


def test_month_bounds_follow_dst() -> None:
    """October 2026 in Berlin has 31 days and one extra hour (DST ends); the next month starts at local midnight."""
    p = parse_period("2026-10", BERLIN)
    assert p.end - p.start == 31 * 86400 + 3600
    assert datetime.fromtimestamp(p.end, BERLIN).replace(tzinfo=None) == datetime(2026, 11, 1)


def test_december_rolls_into_january() -> None:
    """The month after 2026-12 starts at 2027-01-01 00:00 in the zone."""
    p = parse_period("2026-12", TOKYO)
    assert p.end == datetime(2027, 1, 1, tzinfo=TOKYO).timestamp()
    assert p.start in p and p.end not in p


@pytest.mark.parametrize("bad", ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00", "abcd-ef"])
def test_parse_period_rejects_malformed_names(bad: str) -> None:
    """Periods must be YYYY-MM with a real month; the error names the expected form."""
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_period(bad, TOKYO)
