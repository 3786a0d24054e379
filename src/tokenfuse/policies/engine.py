"""`PolicyEngine`: admission with reservations, per-department fuses, rate-source evaluation, overrides, reload.

It subscribes to the `Meter`, so the ledger sees exactly the calls the metrics count, each once. `admit` is
synchronous and O(1) under one lock, safe from threads (instrumented client) and the event loop (gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from tokenfuse.config import Config, format_duration
from tokenfuse.exporter.admission import Admission, Reservation
from tokenfuse.exporter.policy_metrics import DepartmentGauges
from tokenfuse.logs import log_event
from tokenfuse.metering.types import Usage
from tokenfuse.policies.calendar import Period, month_of, parse_period
from tokenfuse.policies.fuse import Fuse, FuseLimits, FuseState, Override, Reading, Transition
from tokenfuse.policies.ledger import Ledger
from tokenfuse.policies.sources import LocalSource, PrometheusSource, RateSource, Readings

if TYPE_CHECKING:
    from tokenfuse.exporter.meter import CallRecord, Meter

__all__ = ["Admission", "BudgetExceeded", "PolicyEngine", "Reservation"]

log = logging.getLogger("tokenfuse.policy")

_RESERVATION_TTL_FLOOR = 600.0
# Enum member lookups cost ~0.35 µs each on Python 3.11, and admit is on every request's path.
_CLOSED, _OPEN, _HALF_OPEN = FuseState.CLOSED, FuseState.OPEN, FuseState.HALF_OPEN


class BudgetExceeded(Exception):
    """A request refused because its department's fuse is open or its worst case does not fit.

    Args:
        department: the department.
        reason: ``fuse_open`` | ``insufficient_budget`` | ``token_limit``.
        retry_after: seconds until retrying can help; None when unknown.
        message: the text; a default names the department and the reason.
    """

    def __init__(self, department: str, reason: str, retry_after: float | None, message: str | None = None) -> None:
        if message is None:
            when = f"; retry after {math.ceil(retry_after)} s" if retry_after is not None else ""
            message = f"department {department!r} is blocked by tokenfuse ({reason}){when}"
        super().__init__(message)
        self.department = department
        self.reason = reason
        self.retry_after = retry_after

    @classmethod
    def from_admission(cls, admission: Admission) -> BudgetExceeded:
        """The exception for a refused `Admission`."""
        return cls(admission.department, admission.reason or "fuse_open", admission.retry_after)


class _Department:
    __slots__ = (
        "fuse",
        "gauges",
        "limits",
        "name",
        "reading",
        "reservations",
        "reserved_tokens",
        "reserved_usd",
        "since_cost",
        "since_tokens",
    )  # fmt: skip

    def __init__(self, name: str, limits: FuseLimits, fuse: Fuse) -> None:
        self.name = name
        self.limits = limits
        self.fuse = fuse
        self.reading: Reading | None = None
        self.reservations: dict[int, Reservation] = {}
        self.reserved_tokens = 0
        self.reserved_usd = 0.0
        # Own usage recorded after the last remote snapshot: Prometheus cannot have it yet.
        self.since_tokens = 0
        self.since_cost = 0.0
        self.gauges: DepartmentGauges | None = None


def _key(f: Fuse) -> tuple[Any, ...]:
    return (f.state, f.cause, f.half_open_at, f.period, f.override, f.since)


class PolicyEngine:
    """Decides, per department, whether a request may go out, and keeps the fuses.

    Args:
        config: departments (limits) and ``policy``.
        meter: the meter whose records the engine counts (it subscribes) and whose pricer prices worst cases.
        source: where usage comes from; default from ``policy.source`` (a `LocalSource` over the ledger at
            ``policy.state_path``, or a `PrometheusSource`).
        clock: UNIX time; tests pass a fake.
        group_commit: on an event loop, the rows of the calls that finish in one loop iteration commit in one
            transaction (the gateway); callers await `durable` before acknowledging a call. Default: commit each
            record before returning.
    """

    def __init__(
        self,
        config: Config,
        meter: Meter,
        *,
        source: RateSource | None = None,
        clock: Callable[[], float] = time.time,
        group_commit: bool = False,
    ) -> None:
        self.config = config
        self.meter = meter
        self._group_commit = group_commit
        self._durable: asyncio.Future[None] | None = None
        self.metrics = meter.policy_metrics
        self._clock = clock
        pol = config.policy
        if isinstance(source, LocalSource):
            self.ledger = source.ledger
        else:
            self.ledger = Ledger(pol.state_path, zone=config.zone, window_seconds=pol.token_window)
        if source is None:
            if pol.source == "prometheus" and pol.prometheus_url:
                source = PrometheusSource(
                    pol.prometheus_url, pol.token_window, config.zone, timeout=max(1.0, min(pol.interval, 10.0))
                )
            else:
                source = LocalSource(self.ledger)
        self.source: RateSource = source
        self._local = isinstance(source, LocalSource)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._depts: dict[str, _Department] = {}
        self._period: Period | None = None
        self._window_label = format_duration(pol.token_window)
        self._snapshot: Readings | None = None
        self._last_ok = 0.0
        self._source_up = True
        self._stale_mode: str | None = None
        self._opened = False
        self._warned_closed = False
        self._task: asyncio.Task[None] | None = None
        self._reservation_ttl = self._ttl(config)
        meter.subscribe(self._on_record)

    @staticmethod
    def _ttl(config: Config) -> float:
        longest = max((u.timeout for u in config.upstreams), default=0.0)
        return max(_RESERVATION_TTL_FLOOR, 2 * longest)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the ledger, restore fuse states and overrides, export the limit gauges; idempotent."""
        now = self._clock()
        with self._lock:
            if self._opened:
                return
            self.ledger.open(now)
            self._opened = True
            self._last_ok = now
            saved = self.ledger.load_fuses()
            self._sync_departments(saved, now)
            self.metrics.source_up(self.source.name, True)
            for d in self._depts.values():
                self._evaluate(d, now)

    async def start(self) -> None:
        """`open` plus the evaluation loop every ``policy.interval`` (fetches a remote source, expires timers)."""
        self.open()
        await self.evaluate()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="tokenfuse-policy")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.policy.interval)
            try:
                await self.evaluate()
            except Exception:  # the loop must outlive any one bad evaluation
                log_event(log, logging.ERROR, "policy_evaluation_failed", exc_info=True)

    async def stop(self) -> None:
        """Stop the loop, close the source's connections and the ledger."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.source.aclose()
        self.close()

    def close(self) -> None:
        """Close the ledger; later records are not counted."""
        with self._lock:
            self._opened = False
            self.ledger.close()

    # -- configuration -----------------------------------------------------------------------------------

    def _limits(self, name: str) -> FuseLimits:
        d = self.config.departments[name]
        pol = self.config.policy
        return FuseLimits(d.hourly_token_limit, d.monthly_budget_usd, pol.open_for, pol.half_open_probes)

    def _sync_departments(self, saved: dict[str, dict[str, Any]], now: float) -> None:
        m = self.metrics
        for name in list(self._depts):
            if name not in self.config.departments:
                del self._depts[name]
                m.forget(name, self._window_label)
        for name in self.config.departments:
            limits = self._limits(name)
            d = self._depts.get(name)
            if d is None:
                fuse = Fuse(name, since=now)
                snap = saved.get(name)
                if snap is not None:
                    try:
                        fuse = Fuse.restore(name, snap)
                    except (KeyError, ValueError, TypeError):
                        log.warning(json.dumps({"event": "fuse_state_unreadable", "department": name}))
                d = self._depts[name] = _Department(name, limits, fuse)
            d.limits = limits
            d.gauges = m.department(name, self._window_label)
            d.gauges.limits(limits.budget_usd, limits.token_limit)
            d.gauges.state(d.fuse.state.value)

    def reconfigure(self, config: Config) -> None:
        """Adopt a reloaded config: limits, budgets, time zone and window change; spend and fuse states stay.

        Args:
            config: the new config. ``policy.source``, ``state_path`` and ``prometheus_url`` need a restart.
        """
        now = self._clock()
        with self._lock:
            old = self.config
            for f in ("source", "state_path", "prometheus_url"):
                if getattr(old.policy, f) != getattr(config.policy, f):
                    log.warning(json.dumps({"event": "policy_reload_ignored", "field": f"policy.{f}",
                                            "detail": "takes effect after a restart"}))  # fmt: skip
            new_label = format_duration(config.policy.token_window)
            if new_label != self._window_label:
                for name in self._depts:
                    self.metrics.forget_window(name, self._window_label)
                self._window_label = new_label
            self.config = config
            self._period = None
            self._reservation_ttl = self._ttl(config)
            if isinstance(self.source, PrometheusSource):
                self.source.window_seconds = config.policy.token_window
                self.source.zone = config.zone
                if config.timezone != old.timezone or config.policy.token_window != old.policy.token_window:
                    self._snapshot = None  # its numbers describe the old month or window
            if self._opened:
                self.ledger.reconfigure(zone=config.zone, window_seconds=config.policy.token_window, now=now)
                self._sync_departments(self.ledger.load_fuses(), now)
                for d in self._depts.values():
                    self._evaluate(d, now)
            else:
                self.ledger.zone = config.zone
                self.ledger.window_seconds = config.policy.token_window

    # -- evaluation --------------------------------------------------------------------------------------

    def _period_at(self, now: float) -> Period:
        p = self._period
        if p is None or not (p.start <= now < p.end):
            p = self._period = month_of(now, self.config.zone)
        return p

    def _reading(self, d: _Department, now: float) -> Reading | None:
        period = self._period_at(now)
        local_tokens = self.ledger.window_tokens(d.name, now)
        local_spent = self.ledger.month_spent(d.name, period)
        if self._local:
            return Reading(local_tokens, local_spent, period.name)
        pol = self.config.policy
        stale = now - self._last_ok > pol.max_staleness
        if stale:
            mode = pol.on_source_error
            if self._stale_mode != mode:
                self._stale_mode = mode
                log.warning(json.dumps({"event": "policy_source_stale", "source": self.source.name,
                                        "seconds_since_ok": round(now - self._last_ok, 3), "action": mode}))  # fmt: skip
            if mode == "fail_closed":
                return None
        snap = self._snapshot
        if stale or snap is None:
            # No trustworthy remote numbers: what this replica metered itself is still certain.
            return Reading(local_tokens, local_spent, period.name)
        r = snap.reading(d.name)
        tokens = max(r.tokens + d.since_tokens, local_tokens)
        spent = local_spent if r.period != period.name else max(r.spent_usd + d.since_cost, local_spent)
        return Reading(tokens, spent, period.name)

    def _evaluate(self, d: _Department, now: float) -> None:
        reading = self._reading(d, now)
        d.reading = reading
        before = _key(d.fuse)
        transitions = d.fuse.evaluate(now, reading, d.limits)
        if _key(d.fuse) != before:
            self.ledger.save_fuse(d.name, d.fuse.snapshot(), now)
        for t in transitions:
            self._export(t, reading)
        if reading is not None and d.gauges is not None:
            d.gauges.usage(reading.tokens, reading.spent_usd)

    def _export(self, t: Transition, reading: Reading | None) -> None:
        d = self._depts.get(t.department)
        gauges = (
            d.gauges
            if d is not None and d.gauges is not None
            else self.metrics.department(t.department, self._window_label)
        )
        gauges.transition(t.from_state.value, t.to_state.value)
        log.info(
            json.dumps(
                {
                    "event": "fuse_transition",
                    "department": t.department,
                    "from": t.from_state.value,
                    "to": t.to_state.value,
                    "reason": t.reason,
                    "tokens_window": None if reading is None else reading.tokens,
                    "spent_usd": None if reading is None else round(reading.spent_usd, 6),
                    "at": t.at,
                }
            )
        )

    async def evaluate(self, now: float | None = None) -> None:
        """Refresh a remote source, expire forgotten reservations and re-evaluate every fuse.

        Args:
            now: UNIX time (default: the clock).
        """
        now = self._clock() if now is None else now
        snap: Readings | None = None
        error: str | None = None
        if not self._local:
            try:
                snap = await self.source.fetch(now, list(self.config.departments))
            except Exception as e:  # any failure of the source is a source error, never an engine crash
                error = str(e) or type(e).__name__
        with self._lock:
            if not self._opened:
                return
            if not self._local:
                self._source_result(snap, error, now)
            self._sweep(now)
            for d in self._depts.values():
                self._evaluate(d, now)

    def _source_result(self, snap: Readings | None, error: str | None, now: float) -> None:
        up = snap is not None
        if up != self._source_up:
            event: dict[str, Any] = {"event": "policy_source", "source": self.source.name, "up": up}
            if error is not None:
                event["error"] = error[:500]
            (log.info if up else log.warning)(json.dumps(event))
        self._source_up = up
        self.metrics.source_up(self.source.name, up)
        if snap is None:
            return
        self._snapshot = snap
        self._last_ok = now
        self._stale_mode = None
        for d in self._depts.values():
            d.since_tokens, d.since_cost = self.ledger.window_since(d.name, snap.at)

    def _sweep(self, now: float) -> None:
        horizon = now - self._reservation_ttl
        for d in self._depts.values():
            old = [r for r in d.reservations.values() if r.at < horizon]
            for r in old:
                log.warning(json.dumps({"event": "reservation_expired", "department": d.name, "tokens": r.tokens,
                                        "age_seconds": round(now - r.at, 1)}))  # fmt: skip
                self._release(d, r)

    # -- the meter subscription --------------------------------------------------------------------------

    def _on_record(self, rec: CallRecord) -> None:
        if rec.usage is None:
            return
        with self._lock:
            if not self._opened:
                if not self._warned_closed:
                    self._warned_closed = True
                    log.warning(json.dumps({"event": "record_not_counted", "detail": "policy engine not open"}))
                return
            if self._group_commit:
                fut = self.ledger.record_queued(rec)
                if fut is not None:
                    self._durable = fut
            else:
                self.ledger.record(rec)
            d = self._depts.get(rec.labels.department)
            if d is None:
                return
            snap = self._snapshot
            if snap is not None and rec.at > snap.at:
                d.since_tokens += rec.tokens
                d.since_cost += rec.cost_usd
            self._evaluate(d, rec.at)

    # -- admission ---------------------------------------------------------------------------------------

    def _worst_case_usd(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> float:
        worst = getattr(self.meter.pricer, "worst_case_usd", None)
        if worst is not None:
            try:
                v = float(worst(provider, model, input_tokens, output_tokens))
                if math.isfinite(v) and v >= 0:
                    return v
            except Exception:  # pricing must never break admission; fall back to the generic path
                log.debug("worst_case_usd failed for %s/%s", provider, model, exc_info=True)
        cost, _ = self.meter.price(provider, model, Usage(input_tokens=input_tokens, output_tokens=output_tokens))
        return cost

    def admit(
        self,
        department: str,
        *,
        input_tokens: int,
        max_output_tokens: int,
        provider: str,
        model: str,
        now: float | None = None,
    ) -> Admission:
        """Reserve the request's worst case, or refuse it.

        Args:
            department: bounded department label (unknown or ``unassigned`` is never blocked).
            input_tokens: prompt estimate.
            max_output_tokens: ``max_tokens`` / ``max_output_tokens`` or the configured default.
            provider: genai-prices provider id, to price the worst case.
            model: model name, to price the worst case.
            now: UNIX time (default: the clock).
        """
        now = self._clock() if now is None else now
        d = self._depts.get(department)
        if d is None:
            if not self._opened:
                raise RuntimeError("PolicyEngine.admit before open(): call open() or await start() first")
            return Admission(True, department, _CLOSED, None, None, None, None, None)
        inp, out = max(int(input_tokens), 0), max(int(max_output_tokens), 0)
        tokens = inp + out
        cost = self._worst_case_usd(provider, model, inp, out) if d.limits.budget_usd is not None else 0.0
        with self._lock:
            if not self._opened:
                raise RuntimeError("PolicyEngine.admit before open(): call open() or await start() first")
            current = self._depts.get(department)
            if current is None:  # removed by a reload since the lookup above
                return Admission(True, department, _CLOSED, None, None, None, None, None)
            d = current
            self._evaluate(d, now)
            fuse, limits, reading = d.fuse, d.limits, d.reading
            forced = fuse.override is not None and fuse.override.action == "close"
            tokens_left: float | None = None
            budget_left: float | None = None
            if reading is not None:
                if limits.token_limit is not None:
                    tokens_left = limits.token_limit - reading.tokens - d.reserved_tokens
                if limits.budget_usd is not None:
                    budget_left = limits.budget_usd - reading.spent_usd - d.reserved_usd
            probe = False
            if not forced:
                if fuse.state is _OPEN:
                    retry = fuse.retry_after(now, self._period_at(now).end)
                    if retry is None and fuse.override is None:
                        retry = self.config.policy.interval
                    return self._refuse(d, "fuse_open", retry, tokens_left, budget_left)
                if fuse.state is _HALF_OPEN:
                    if fuse.probes_left <= 0:
                        return self._refuse(d, "fuse_open", self.config.policy.interval, tokens_left, budget_left)
                    probe = True
                if budget_left is not None and cost > budget_left:
                    if budget_left + d.reserved_usd >= cost:
                        retry = self.config.policy.interval  # requests in flight hold the room
                    else:
                        retry = self._period_at(now).end - now
                    return self._refuse(d, "insufficient_budget", retry, tokens_left, budget_left)
                if tokens_left is not None and tokens > tokens_left:
                    return self._refuse(d, "token_limit", self._token_wait(d, tokens, tokens_left, now),
                                        tokens_left, budget_left)  # fmt: skip
            if not limits.limited and not forced and not probe:
                return Admission(True, department, fuse.state, None, None, None, None, None)
            epoch = None
            if probe and fuse.take_probe():
                epoch = fuse.epoch
            res = Reservation(next(self._ids), department, tokens, cost, now, epoch)
            d.reservations[res.id] = res
            d.reserved_tokens += tokens
            d.reserved_usd += cost
            return Admission(
                True,
                department,
                fuse.state,
                None,
                None,
                None if budget_left is None else max(budget_left - cost, 0.0),
                None if tokens_left is None else max(int(tokens_left - tokens), 0),
                res,
            )

    def _token_wait(self, d: _Department, tokens: int, tokens_left: float, now: float) -> float | None:
        limit = d.limits.token_limit
        if limit is not None and tokens > limit:
            return None  # this request can never fit the window: retrying the same request cannot help
        wait = self.ledger.window_wait(d.name, now, math.ceil(tokens - tokens_left)) if self._local else None
        return self.config.policy.interval if wait is None else max(wait, 1.0)

    def _refuse(
        self, d: _Department, reason: str, retry: float | None, tokens_left: float | None, budget_left: float | None
    ) -> Admission:
        return Admission(
            False,
            d.name,
            d.fuse.state,
            reason,
            retry,
            None if budget_left is None else max(budget_left, 0.0),
            None if tokens_left is None else max(int(tokens_left), 0),
            None,
        )

    def _release(self, d: _Department, r: Reservation) -> None:
        if d.reservations.pop(r.id, None) is None:
            return
        if d.reservations:
            d.reserved_tokens -= r.tokens
            d.reserved_usd -= r.cost_usd
        else:
            # Reset rather than subtract so float error cannot accumulate across reservations.
            d.reserved_tokens = 0
            d.reserved_usd = 0.0
        if r.probe_epoch is not None:
            d.fuse.probe_done(r.probe_epoch)

    @property
    def default_max_tokens(self) -> int:
        """Worst-case output reserved when a request sets no maximum (``policy.default_max_tokens``)."""
        return self.config.policy.default_max_tokens

    def prompt_reservation(self, estimate: int) -> int:
        """What admission reserves for a prompt estimated at ``estimate`` tokens: the estimate with
        ``policy.prompt_margin`` and ``policy.prompt_margin_tokens`` added, so that providers that count more than
        tiktoken (other tokenizers, framing, tool schemas) cannot take a department past its limit."""
        pol = self.config.policy
        return math.ceil(max(estimate, 0) * (1.0 + pol.prompt_margin)) + pol.prompt_margin_tokens

    def limited(self, department: str) -> bool:
        """Whether ``department`` has a token limit or a budget (only then is a prompt estimate needed)."""
        d = self._depts.get(department)
        return d is not None and d.limits.limited

    def source_health(self, now: float | None = None) -> tuple[str, bool, float | None]:
        """The rate source's name, whether it answered last time, and the age of its last good answer in seconds
        (None before the first; 0 for the local ledger, which is read in place)."""
        if self._local:
            return self.source.name, True, 0.0
        now = self._clock() if now is None else now
        return self.source.name, self._source_up, (now - self._last_ok) if self._last_ok else None

    def blocks_when_source_down(self) -> bool:
        """True while the source is down past ``max_staleness`` with ``on_source_error: fail_closed``."""
        return self._stale_mode == "fail_closed"

    def durable(self) -> asyncio.Future[None] | None:
        """A future that completes once every call recorded so far is committed (None: nothing is pending).

        Only meaningful with ``group_commit``; without it every record is committed before `settle` runs.
        """
        fut = self._durable
        return None if fut is None or fut.done() else fut

    def refusal(self, admission: Admission) -> BudgetExceeded:
        """The exception the instrumented client raises for a refused admission."""
        return BudgetExceeded.from_admission(admission)

    def settle(self, reservation: Reservation | None, record: CallRecord | None) -> None:
        """Release a reservation; idempotent.

        The real usage reaches the ledger through the meter subscription, once, whatever is passed here, so
        ``record`` only tells the engine the call finished (None: it failed or consumed nothing). Between
        `Meter.record` and this call the usage counts twice (ledger and reservation): conservative, so call it
        right after recording.

        Args:
            reservation: from `Admission.reservation`; None is a no-op.
            record: what `Meter.record` returned for the call, or None.
        """
        if reservation is None:
            return
        with self._lock:
            d = self._depts.get(reservation.department)
            if d is None:
                return
            self._release(d, reservation)
            if reservation.probe_epoch is not None and self._opened:
                self._evaluate(d, self._clock() if record is None else max(record.at, reservation.at))

    # -- admin -------------------------------------------------------------------------------------------

    def _status(self, d: _Department, now: float) -> dict[str, Any]:
        f, r, lim = d.fuse, d.reading, d.limits
        period = self._period_at(now)
        return {
            "department": d.name,
            "state": f.state.value,
            "cause": None if f.cause is None else f.cause.value,
            "since": f.since,
            "retry_after": f.retry_after(now, period.end),
            "probes_left": f.probes_left,
            "probes_in_flight": f.probes_in_flight,
            "period": period.name,
            "tokens_window": None if r is None else r.tokens,
            "token_limit": lim.token_limit,
            "window": self._window_label,
            "tokens_reserved": d.reserved_tokens,
            "spent_usd": None if r is None else r.spent_usd,
            "budget_usd": lim.budget_usd,
            "reserved_usd": d.reserved_usd,
            "reservations": len(d.reservations),
            "override": None if f.override is None else f.override.as_dict(),
            "source": self.source.name,
            "source_up": self._source_up,
        }

    def fuse_status(self, department: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """The fuses, freshly evaluated, for ``/admin/fuses``.

        Args:
            department: one department, or None for all.
            now: UNIX time (default: the clock).

        Raises:
            ValueError: ``department`` is not configured.
        """
        now = self._clock() if now is None else now
        with self._lock:
            names = list(self._depts) if department is None else [self._known(department)]
            out = []
            for name in names:
                d = self._depts[name]
                if self._opened:
                    self._evaluate(d, now)
                out.append(self._status(d, now))
            return out

    def _known(self, department: str) -> str:
        if department not in self._depts:
            raise ValueError(f"unknown department {department!r}: it must be one of departments in the config")
        return department

    def override(
        self,
        department: str,
        action: Literal["open", "close", "auto"],
        reason: str,
        ttl_seconds: float | None,
        actor: str = "admin",
        now: float | None = None,
    ) -> dict[str, Any]:
        """Force a fuse open or closed (optionally for ``ttl_seconds``), or return it to the numbers (``auto``).

        Persisted, audited in the ledger and logged. A forced close admits the department whatever it used.

        Args:
            department: a configured department.
            action: ``open`` | ``close`` | ``auto``.
            reason: why, for the audit log.
            ttl_seconds: how long it holds; None = until the next override.
            actor: who, for the audit log.
            now: UNIX time (default: the clock).

        Returns:
            The fuse's status after the change.

        Raises:
            ValueError: unknown department, action or a ttl that is not a positive number.
        """
        if action not in ("open", "close", "auto"):
            raise ValueError(f"action {action!r} must be one of open, close, auto")
        if ttl_seconds is not None and not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError("ttl_seconds must be a positive number of seconds, or None for no expiry")
        now = self._clock() if now is None else now
        with self._lock:
            d = self._depts[self._known(department)]
            if not self._opened:
                raise RuntimeError("PolicyEngine.override before open(): call open() or await start() first")
            ov = None
            if action != "auto":
                until = None if ttl_seconds is None else now + ttl_seconds
                ov = Override(action, reason, actor, now, until)
            reading = self._reading(d, now)
            d.reading = reading
            transitions = d.fuse.set_override(ov, now, reading, d.limits)
            self.ledger.save_fuse(d.name, d.fuse.snapshot(), now)
            self.ledger.audit_override(
                at=now, department=department, action=action, reason=reason, ttl_seconds=ttl_seconds, actor=actor
            )
            for t in transitions:
                self._export(t, reading)
            log.info(
                json.dumps(
                    {
                        "event": "fuse_override",
                        "department": department,
                        "action": action,
                        "reason": reason,
                        "ttl_seconds": ttl_seconds,
                        "actor": actor,
                        "until": None if ov is None else ov.until,
                        "state": d.fuse.state.value,
                        "at": now,
                    }
                )
            )
            return self._status(d, now)

    def usage(self, department: str | None, period: str) -> dict[str, Any]:
        """Tokens and cost of a month by project and by model, from the local ledger.

        Args:
            department: one department, or None for all.
            period: ``YYYY-MM`` in the configured time zone.

        Raises:
            ValueError: ``period`` is not ``YYYY-MM``.
        """
        p = parse_period(period, self.config.zone)
        out = self.ledger.usage(department, p)
        out["timezone"] = self.config.timezone
        return out

    def month_totals(self, period: str) -> list[dict[str, Any]]:
        """Per department, project, environment, provider and model sums of a month (chargeback rows).

        Args:
            period: ``YYYY-MM`` in the configured time zone.

        Raises:
            ValueError: ``period`` is not ``YYYY-MM``.
        """
        return self.ledger.month_totals(parse_period(period, self.config.zone))

    def overrides(self, department: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The override audit log, newest first.

        Args:
            department: one department, or None for all.
            limit: at most this many entries.
        """
        return self.ledger.overrides(department, limit)
