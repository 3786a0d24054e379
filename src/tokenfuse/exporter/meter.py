"""`Meter`: records one LLM call — labels, usage, cost, outcome — into the metrics of the contract.

It is the single write path shared by the instrumented client and the gateway; the policy engine subscribes to it
to see the same numbers. Labelled children are cached per label tuple because ``.labels()`` costs ~4 µs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from tokenfuse.config import Config, parse_config
from tokenfuse.exporter.collectors import CounterChild, HistogramChild
from tokenfuse.exporter.labels import CallLabels, LabelBounds
from tokenfuse.exporter.metrics import Metrics, semconv_provider
from tokenfuse.exporter.policy_metrics import PolicyMetrics
from tokenfuse.logs import log_event
from tokenfuse.metering.pricing import Pricer
from tokenfuse.metering.types import Usage

__all__ = ["CallRecord", "Meter", "default_meter"]

log = logging.getLogger("tokenfuse.exporter")

_MAX_CACHED = 10_000  # label combinations are bounded, but a cache must be bounded on its own terms too


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~2 µs more on every call
class CallRecord:
    """What the meter recorded for one call; listeners (the policy ledger) receive it.

    Args:
        labels: bounded labels.
        usage: billable usage, or None when the call consumed nothing (blocked, failed before usage).
        cost_usd: cost in USD (0 when unpriced).
        outcome: success | upstream_error | client_error | blocked.
        at: UNIX time of the record.
        priced: False when the model had no known price.
    """

    labels: CallLabels
    usage: Usage | None
    cost_usd: float
    outcome: str
    at: float
    priced: bool = True

    @property
    def tokens(self) -> int:
        return 0 if self.usage is None else self.usage.total_tokens


class _Series:
    """Every labelled child one (labels, operation, response model) writes to, resolved once."""

    __slots__ = ("cost", "details", "duration", "gen_input", "gen_output", "input", "output", "provider_name",
                 "requests", "response_model")  # fmt: skip

    def __init__(self, m: Metrics, labels: CallLabels, operation: str, response_model: str) -> None:
        self.response_model = response_model
        key = labels.as_tuple()
        self.input = m.tokens.labels(*key, "input")
        self.output = m.tokens.labels(*key, "output")
        self.cost = m.cost.labels(*key)
        self.requests: dict[str, CounterChild] = {}
        self.provider_name = semconv_provider(labels.provider)
        gen = (operation, self.provider_name, labels.model, response_model)
        self.gen_input = m.gen_ai_tokens.labels(*gen, "input", labels.department)
        # Embeddings produce no output tokens: no output series at all, rather than a histogram of zeros.
        self.gen_output = (
            None if operation == "embeddings" else m.gen_ai_tokens.labels(*gen, "output", labels.department)
        )
        self.duration: dict[str, HistogramChild] = {}
        self.details: tuple[CounterChild, CounterChild, CounterChild] | None = None  # made on first use


class Meter:
    """Records calls into one registry.

    Args:
        config: departments and caps for label bounding, price overrides (default: empty config).
        registry: where the metrics live (default: prometheus_client's global registry).
        pricer: the pricer to use (default: one built from ``config.pricing.overrides``).
    """

    def __init__(
        self,
        config: Config | None = None,
        registry: CollectorRegistry | None = None,
        pricer: Pricer | None = None,
    ) -> None:
        self.config = config if config is not None else parse_config({})
        self.registry = registry if registry is not None else REGISTRY
        self.metrics = Metrics(self.registry)
        self.policy_metrics = PolicyMetrics(self.metrics)
        self.bounds = LabelBounds(self.config, self._overflow)
        self.pricer = pricer if pricer is not None else Pricer(self.config.pricing.overrides)
        self._series: dict[tuple[CallLabels, str, str], _Series] = {}
        self._labels: dict[tuple[str | None, ...], CallLabels] = {}
        self._hist: dict[tuple[str, ...], Any] = {}
        self._listeners: list[Callable[[CallRecord], None]] = []
        self._lock = threading.Lock()
        self._bounds: dict[tuple[str, str], int] = {}
        self._absurd: set[tuple[str, str]] = set()

    def reconfigure(self, config: Config) -> None:
        """Adopt a new config (reload): label bounds and price overrides follow it; counters keep their values."""
        self.config = config
        self.bounds = LabelBounds(config, self._overflow)
        self._labels = {}
        self.pricer = Pricer(config.pricing.overrides)
        self._bounds = {}

    def _overflow(self, department: str) -> None:
        self.metrics.label_overflow.labels(department).inc()

    def subscribe(self, listener: Callable[[CallRecord], None]) -> None:
        """Call ``listener`` with every record, after the metrics are updated."""
        self._listeners.append(listener)

    def labels(
        self,
        *,
        department: str | None,
        project: str | None = None,
        environment: str | None = None,
        provider: str | None = None,
        model: str | None = None,
    ) -> CallLabels:
        """Bound raw label values (see `LabelBounds`); cached, as the same few combinations recur."""
        raw = (department, project, environment, provider, model)
        found = self._labels.get(raw)
        if found is None:
            found = self.bounds.labels(
                department=department, project=project, environment=environment, provider=provider, model=model
            )
            if len(self._labels) < _MAX_CACHED:
                self._labels[raw] = found
        return found

    def price(self, provider: str, model: str, usage: Usage, request_model: str | None = None) -> tuple[float, bool]:
        """Cost of ``usage`` in USD and whether the model was priced; never raises."""
        return self._price(provider, model, usage, request_model)

    def _price(self, provider: str, model: str, usage: Usage, request_model: str | None) -> tuple[float, bool]:
        try:
            cost = self.pricer.cost_usd(provider, model, usage)
            if cost is None and request_model and request_model != model:
                cost = self.pricer.cost_usd(provider, request_model, usage)
        except Exception:  # pricing must never break a call
            log_event(log, logging.ERROR, "pricing_failed", provider=provider, model=model, exc_info=True)
            return 0.0, False
        if cost is None:
            return 0.0, False
        if not math.isfinite(cost) or cost < 0:
            return 0.0, False
        return cost, True

    def record(
        self,
        labels: CallLabels,
        *,
        usage: Usage | None,
        outcome: str,
        operation: str = "chat",
        request_model: str | None = None,
        duration: float | None = None,
        error_type: str = "",
        now: float | None = None,
    ) -> CallRecord:
        """Record one call.

        Args:
            labels: bounded labels (``model`` is the model the call was billed as).
            usage: usage as reported or estimated; None records the request only.
            outcome: success | upstream_error | client_error | blocked.
            operation: OTel ``gen_ai.operation.name``.
            request_model: the model the client asked for (OTel ``gen_ai.request.model``).
            duration: seconds the operation took, for ``gen_ai_client_operation_duration_seconds``.
            error_type: OTel ``error.type`` (empty on success).
            now: UNIX time of the call (default: now).
        """
        resp_raw = (usage.model if usage is not None else None) or labels.model
        series = self._series.get((labels, operation, resp_raw))
        if series is None:
            series = self._new_series((labels, operation, resp_raw))
        req = series.requests.get(outcome)
        if req is None:
            req = series.requests[outcome] = self.metrics.requests.labels(*labels, outcome)
        d = None
        seconds = 0.0
        if duration is not None and duration >= 0 and math.isfinite(duration):
            seconds = duration
            dkey = error_type if usage is not None else "\0" + error_type  # with and without an answer
            d = series.duration.get(dkey)
            if d is None:
                d = series.duration[dkey] = self.metrics.gen_ai_duration.labels(
                    operation,
                    series.provider_name,
                    labels.model,
                    series.response_model if usage is not None else "",  # no answer: no response model
                    error_type,
                )

        cost = 0.0
        priced = True
        inp = out = 0
        if usage is not None:
            inp, out = usage.input_tokens, usage.output_tokens
            if type(inp) is not int or inp < 0:
                inp = 0
            if type(out) is not int or out < 0:
                out = 0
            if inp or out or usage.details:
                cost, priced = self._price(labels.provider, resp_raw, usage, request_model or labels.model)
                if not priced:
                    self._child(("unpriced", labels.provider, labels.model), self.metrics.unpriced, 2).inc()
            if usage.cache_read_tokens or usage.cache_write_tokens or usage.output_reasoning_tokens:
                details = series.details
                if details is None:
                    key = labels.as_tuple()
                    tok = self.metrics.token_details
                    details = series.details = (
                        tok.labels(*key, "cache_read"),
                        tok.labels(*key, "cache_write"),
                        tok.labels(*key, "reasoning"),
                    )
            if usage.estimated:
                self._child(("est", labels.department, labels.provider, labels.model), self.metrics.estimated, 3).inc()
        # One lock for every update of the call, the children's values updated in place: see
        # `tokenfuse.exporter.collectors` (prometheus_client would take seven locks).
        with self.metrics.lock:
            req.value += 1.0
            if usage is not None:
                if inp:
                    series.input.value += inp
                if out:
                    series.output.value += out
                if cost:
                    series.cost.value += cost
                det = series.details
                if det is not None:
                    for child, n in zip(
                        det,
                        (usage.cache_read_tokens, usage.cache_write_tokens, usage.output_reasoning_tokens),
                        strict=True,
                    ):
                        if type(n) is int and n > 0:
                            child.value += n
                h = series.gen_input
                h.counts[bisect_left(h.bounds, inp)] += 1.0
                h.sum += inp
                g = series.gen_output
                if g is not None:
                    g.counts[bisect_left(g.bounds, out)] += 1.0
                    g.sum += out
            if d is not None:
                d.counts[bisect_left(d.bounds, seconds)] += 1.0
                d.sum += seconds

        rec = CallRecord(labels, usage, cost, outcome, time.time() if now is None else now, priced)
        for listener in self._listeners:
            try:
                listener(rec)
            except Exception:
                log_event(log, logging.ERROR, "meter_listener_failed", exc_info=True)
        return rec

    def believable(self, provider: str, model: str, usage: Usage) -> bool:
        """Whether reported counts are possible for the model: none beyond its context window (genai-prices), else
        beyond ``metering.max_tokens_per_call``. Absurd usage is logged once per model; the caller estimates."""
        key = (provider, model)
        bound = self._bounds.get(key)
        if bound is None:
            bound = self.pricer.context_window(provider, model) or self.config.metering.max_tokens_per_call
            if len(self._bounds) < _MAX_CACHED:
                self._bounds[key] = bound
        if usage.input_tokens <= bound and usage.output_tokens <= bound:
            return True
        if key not in self._absurd and len(self._absurd) < _MAX_CACHED:
            self._absurd.add(key)
            log_event(log, logging.WARNING, "absurd_usage", provider=provider, model=model, bound=bound,
                      input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)  # fmt: skip
        return False

    def blocked(self, labels: CallLabels, reason: str) -> CallRecord:
        """Record a call the policy refused: one ``blocked`` request, and one ``tokenfuse_blocked_requests_total``."""
        rec = self.record(labels, usage=None, outcome="blocked")
        self._child(("blocked", labels.department, reason), self.metrics.blocked, 2).inc()
        return rec

    def observe_overhead(self, route: str, seconds: float) -> None:
        """Time the gateway added to a call (total minus upstream), for ``tokenfuse_gateway_overhead_seconds``."""
        self._child(("overhead", route), self.metrics.overhead, 1).observe(max(seconds, 0.0))

    def _new_series(self, skey: tuple[CallLabels, str, str]) -> _Series:
        with self._lock:
            series = self._series.get(skey)
            if series is None:
                labels, operation, resp_raw = skey
                series = _Series(self.metrics, labels, operation, self.bounds.model(labels.provider, resp_raw))
                if len(self._series) < _MAX_CACHED:
                    self._series[skey] = series
        return series

    def _child(self, key: tuple[str, ...], metric: Any, n: int) -> Any:
        c = self._hist.get(key)
        if c is None:
            c = metric.labels(*key[len(key) - n :])
            self._hist[key] = c
        return c


_default: Meter | None = None
_default_lock = threading.Lock()


def default_meter() -> Meter:
    """The process-wide meter on the global registry (created on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Meter()
    return _default
