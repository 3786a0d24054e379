"""The meter's own counters and histograms expose exactly what prometheus_client's Counter and Histogram do."""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from tokenfuse.exporter.collectors import FastCounter, FastHistogram
from tokenfuse.exporter.metrics import GEN_AI_DURATION_BUCKETS, GEN_AI_TOKEN_BUCKETS

LABELS = ("department", "model")
VALUES = st.sampled_from(["a", "b", 'we"ird\\ \n'])


def _pair() -> tuple[CollectorRegistry, CollectorRegistry, dict[str, object], dict[str, object]]:
    ref, fast = CollectorRegistry(), CollectorRegistry()
    lock = threading.Lock()
    r: dict[str, object] = {
        "c": Counter("x_tokens", "Tokens.", LABELS, registry=ref),
        "h": Histogram("x_usage", "Usage.", LABELS, buckets=GEN_AI_TOKEN_BUCKETS, registry=ref),
        "d": Histogram("x_duration", "Dur.", LABELS, unit="seconds", buckets=GEN_AI_DURATION_BUCKETS, registry=ref),
    }
    f: dict[str, object] = {
        "c": FastCounter("x_tokens", "Tokens.", LABELS, lock=lock, registry=fast),
        "h": FastHistogram("x_usage", "Usage.", LABELS, buckets=GEN_AI_TOKEN_BUCKETS, lock=lock, registry=fast),
        "d": FastHistogram(
            "x_duration", "Dur.", LABELS, unit="seconds", buckets=GEN_AI_DURATION_BUCKETS, lock=lock, registry=fast
        ),
    }
    return ref, fast, r, f


def _without_created(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if "_created" not in line]


def _created_series(text: bytes) -> list[str]:
    return [line.rsplit(" ", 1)[0] for line in text.decode().splitlines() if "_created{" in line]


ops = st.lists(
    st.tuples(
        st.sampled_from(["c", "h", "d", "c-locked", "h-locked"]),
        VALUES,
        VALUES,
        st.one_of(
            st.integers(0, 10**8),
            st.sampled_from([0.0, 1.0, 4.0, 0.01, 0.02, 81.92, 1e9, math.inf]),
            st.floats(0, 1e6, allow_nan=False),
        ),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_exposition_equals_prometheus_client(ops: list[tuple[str, str, str, float]]) -> None:
    """Increments and observations (public methods, or the meter's inline writes under the lock; bucket edges, +Inf,
    label escaping) expose the same text as prometheus_client's."""
    ref_reg, fast_reg, ref, fast = _pair()
    for kind, dept, model, value in ops:
        name = kind.split("-")[0]
        r = ref[name].labels(dept, model)  # type: ignore[attr-defined]
        f = fast[name].labels(dept, model)  # type: ignore[attr-defined]
        if name == "c":
            r.inc(value)
            if kind.endswith("locked"):  # as the meter writes it
                with fast[name].lock:  # type: ignore[attr-defined]
                    f.value += value
            else:
                f.inc(value)
        else:
            r.observe(value)
            if kind.endswith("locked"):  # as the meter writes it (it never observes NaN)
                with fast[name].lock:  # type: ignore[attr-defined]
                    f.counts[bisect_left(f.bounds, value)] += 1.0
                    f.sum += value
            else:
                f.observe(value)
    for gen in (generate_latest, generate_openmetrics):
        a, b = gen(ref_reg), gen(fast_reg)
        assert _without_created(b) == _without_created(a)
        assert _created_series(b) == _created_series(a)


def test_children_exist_from_labels_on_and_reject_bad_input() -> None:
    """A child shows (at 0) once labelled, as in prometheus_client; wrong label counts and negative increments fail."""
    _, fast_reg, _, fast = _pair()
    counter, hist = fast["c"], fast["h"]
    assert isinstance(counter, FastCounter) and isinstance(hist, FastHistogram)
    counter.labels("a", "m")
    hist.labels("a", "m")
    assert fast_reg.get_sample_value("x_tokens_total", {"department": "a", "model": "m"}) == 0.0
    assert fast_reg.get_sample_value("x_usage_count", {"department": "a", "model": "m"}) == 0.0
    assert counter.labels(model="m", department="a") is counter.labels("a", "m")
    with pytest.raises(ValueError, match="label values"):
        counter.labels("a")
    with pytest.raises(ValueError, match="expected the labels"):
        counter.labels(department="a")
    with pytest.raises(ValueError, match="not both"):
        counter.labels("a", model="m")
    with pytest.raises(ValueError, match="non-negative"):
        counter.labels("a", "m").inc(-1)
    with pytest.raises(ValueError, match="increasing"):
        FastHistogram("y", "Y.", (), buckets=(2, 1), lock=threading.Lock(), registry=None)


def test_name_clash_with_prometheus_client_metric_is_refused() -> None:
    """The families register like prometheus_client's: a second family with the same name is an error."""
    reg = CollectorRegistry()
    FastCounter("dup", "D.", (), lock=threading.Lock(), registry=reg)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("dup", "D.", registry=reg)


def test_concurrent_increments_are_not_lost() -> None:
    """Eight threads incrementing one child through `inc` lose no increment."""
    counter = FastCounter("t", "T.", (), lock=threading.Lock(), registry=None)
    child = counter.labels()

    def work() -> None:
        for _ in range(20_000):
            child.inc()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert child.get() == 160_000
