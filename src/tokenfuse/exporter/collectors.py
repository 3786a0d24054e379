"""Counters and histograms for the per-call metrics, cheaper to update than prometheus_client's.

prometheus_client takes one lock per value: a counter increment costs ~1 µs and a histogram observation ~2.5 µs,
and one metered call updates seven of them. Here every family of a `Metrics` shares one lock; the `Meter` takes it
once per call and updates the children with the ``*_locked`` methods, plain attribute arithmetic. Scrapes take the
same lock to read a consistent snapshot.

The exposition is prometheus_client's, sample for sample: the families register in a `CollectorRegistry` and
yield the same names, types, labels, ``le`` values, ``_created`` samples and order as ``Counter`` and
``Histogram`` do (a test compares the two expositions).
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client import metrics as _pc_metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_go_float: Callable[[float], str] = floatToGoString  # how prometheus_client writes ``le`` (untyped upstream)

__all__ = ["FastCounter", "FastHistogram"]


def _use_created() -> bool:
    # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()): follow it.
    return bool(getattr(_pc_metrics, "_use_created", True))


class CounterChild:
    """One labelled counter. With the family lock held, ``value += amount`` (amount >= 0) is an increment: the meter
    writes that inline."""

    __slots__ = ("_lock", "created", "value")

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0), taking the family lock."""
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        with self._lock:
            self.value += amount

    def get(self) -> float:
        return self.value


class HistogramChild:
    """One labelled histogram: a count per bucket (not cumulative; the exposition accumulates) and the sum.

    ``observe_locked`` with the family lock held is ``counts[bisect_left(bounds, amount)] += 1; sum += amount`` for
    a number that is not NaN; the meter writes that inline.
    """

    __slots__ = ("_lock", "bounds", "counts", "created", "sum")

    def __init__(self, lock: threading.Lock, bounds: tuple[float, ...]) -> None:
        self._lock = lock
        self.bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Record one observation, taking the family lock."""
        with self._lock:
            self.observe_locked(amount)

    def observe_locked(self, amount: float) -> None:
        """Record one observation; the caller holds the family lock."""
        # prometheus_client puts a value in the first bucket whose bound is >= it (bisect_left), and NaN in none.
        if amount == amount:
            self.counts[bisect_left(self.bounds, amount)] += 1.0
        self.sum += amount


class _Family(Collector):
    _type = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        lock: threading.Lock,
        registry: CollectorRegistry | None,
        unit: str = "",
    ) -> None:
        if unit and not name.endswith("_" + unit):
            name = f"{name}_{unit}"
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._unit = unit
        self.lock = lock
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def _key(self, values: tuple[object, ...], by_name: dict[str, object]) -> tuple[str, ...]:
        # As prometheus_client: label values by position or by name, not both.
        if by_name:
            if values:
                raise ValueError(f"{self._name}: label values by position or by name, not both")
            if set(by_name) != set(self._labelnames):
                raise ValueError(f"{self._name}: expected the labels {self._labelnames}, got {tuple(by_name)}")
            values = tuple(by_name[n] for n in self._labelnames)
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected {len(self._labelnames)} label values, got {len(values)}")
        return tuple(str(v) for v in values)

    def _metric(self) -> Metric:
        return Metric(self._name, self._documentation, self._type, self._unit)

    def describe(self) -> Iterable[Metric]:
        return [self._metric()]


class FastCounter(_Family):
    """A labelled counter family (``name`` without ``_total``, as for prometheus_client's ``Counter``)."""

    _type = "counter"

    def labels(self, *values: object, **by_name: object) -> CounterChild:
        key = self._key(values, by_name)
        child = self._children.get(key)
        if child is None:
            with self.lock:
                child = self._children.setdefault(key, CounterChild(self.lock))
        assert isinstance(child, CounterChild)
        return child

    def collect(self) -> Iterable[Metric]:
        metric = self._metric()
        created = _use_created()
        with self.lock:
            rows = [(k, c.value, c.created) for k, c in self._children.items() if isinstance(c, CounterChild)]
        names = self._labelnames
        for key, value, when in rows:
            labels = dict(zip(names, key, strict=True))
            metric.add_sample(self._name + "_total", labels, value)
            if created:
                metric.add_sample(self._name + "_created", labels, when)
        return [metric]


class FastHistogram(_Family):
    """A labelled histogram family with fixed upper bounds (``+Inf`` is added)."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        lock: threading.Lock,
        registry: CollectorRegistry | None,
        unit: str = "",
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("histogram buckets must be strictly increasing")
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._les = tuple(_go_float(b) for b in bounds)
        super().__init__(name, documentation, labelnames, lock=lock, registry=registry, unit=unit)

    def labels(self, *values: object, **by_name: object) -> HistogramChild:
        key = self._key(values, by_name)
        child = self._children.get(key)
        if child is None:
            with self.lock:
                child = self._children.setdefault(key, HistogramChild(self.lock, self._bounds))
        assert isinstance(child, HistogramChild)
        return child

    def collect(self) -> Iterable[Metric]:
        metric = self._metric()
        created = _use_created()
        with self.lock:
            rows = [
                (k, list(c.counts), c.sum, c.created)
                for k, c in self._children.items()
                if isinstance(c, HistogramChild)
            ]
        names = self._labelnames
        name = self._name
        for key, counts, total, when in rows:
            labels = dict(zip(names, key, strict=True))
            acc = 0.0
            for le, n in zip(self._les, counts, strict=True):
                acc += n
                metric.add_sample(name + "_bucket", {**labels, "le": le}, acc)
            metric.add_sample(name + "_count", labels, acc)
            if self._bounds[0] >= 0:
                metric.add_sample(name + "_sum", labels, total)
            if created:
                metric.add_sample(name + "_created", labels, when)
        return [metric]
