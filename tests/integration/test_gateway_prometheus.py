"""Gateways as real processes with a real Prometheus: scrape totals, two replicas sharing fuses, kill -9."""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import KEYS, fake_config
from tests.integration._procs import GatewayProcess, eventually, free_port, start_prometheus

from tokenfuse.config import hash_key
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


def test_prometheus_scrape_equals_upstream_reported(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Prometheus scraping the gateway sums tokens per department exactly as the fake upstream reported them."""
    import openai

    cfg = fake_config(upstream.url, tmp_path).model_dump(mode="json")
    gw = GatewayProcess(cfg, tmp_path, "gw").start()
    try:
        with start_prometheus(tmp_path, [f"127.0.0.1:{gw.port}"]) as prom:
            for dept, n in (("marketing", 3), ("engineering", 2), ("support", 4)):
                client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS[dept], max_retries=0)
                for i in range(n):
                    r = client.chat.completions.create(
                        model="gpt-4o-mini", max_tokens=5 + i, stream=i % 2 == 1,
                        messages=[{"role": "user", "content": "x" * (10 * i + 1)}],
                    )  # fmt: skip
                    if i % 2 == 1:
                        for _ in r:  # type: ignore[union-attr]
                            pass
            expected: dict[str, int] = {}
            # Attribute each upstream request to its department by order of sending (serial traffic).
            order = ["marketing"] * 3 + ["engineering"] * 2 + ["support"] * 4
            for dept, rec in zip(order, upstream.requests, strict=True):
                assert rec.usage is not None
                expected[dept] = expected.get(dept, 0) + rec.usage["input_tokens"] + rec.usage["output_tokens"]

            def scraped() -> dict[str, int] | None:
                got = {r["metric"]["department"]: int(float(r["value"][1]))
                       for r in prom.query("sum by (department) (tokenfuse_tokens_total)")}  # fmt: skip
                return got if got == expected else None

            eventually(scraped, 20, what=f"Prometheus totals == {expected}")
    finally:
        gw.stop()


def test_two_replicas_share_fuse_through_prometheus(upstream: FakeUpstream, tmp_path: Path) -> None:
    """Traffic split over two replicas trips both via Prometheus, half-opens, closes, and honours fail_closed."""
    prom_port = free_port()
    limit = 3000
    cfg = fake_config(
        upstream.url, tmp_path,
        departments={"marketing": {"hourly_token_limit": limit, "keys": [hash_key(KEYS["marketing"])]}},
        policy={"source": "prometheus", "prometheus_url": f"http://127.0.0.1:{prom_port}", "interval": "1s",
                "open_for": "3s", "token_window": "12s", "half_open_probes": 1, "max_staleness": "3s",
                "on_source_error": "fail_closed"},
    ).model_dump(mode="json")  # fmt: skip
    a = GatewayProcess(cfg, tmp_path, "a").start()
    b = GatewayProcess(cfg, tmp_path, "b").start()
    prom = None
    try:
        prom = _prometheus_on(tmp_path, prom_port, [a.port, b.port])
        eventually(prom.targets_up, 20, what="both replicas scraped")
        usage = {"prompt_tokens": 320, "completion_tokens": 80}  # 400 tokens a call
        sent = 0
        t_blocked = None
        for i in range(40):
            gw = a if i % 2 == 0 else b
            status, _, _ = gw.chat(usage=usage)
            if status == 429:
                t_blocked = time.monotonic()
                break
            assert status == 200
            sent += 1
            time.sleep(0.5)
        assert t_blocked is not None, "the department was never blocked"
        # Each replica alone saw about half the tokens (under the limit); only the Prometheus sum can have tripped
        # the fuse. increase() extrapolates over a short window, so the sum may read a little above the truth.
        # At 2 calls/s the sum crosses 3,000 at the 8th call, and Prometheus shows it within scrape + interval (2 s,
        # 4 more calls): each replica alone then holds at most 6 x 400 = 2,400 tokens, under the limit.
        assert -(-sent // 2) * 400 < limit
        assert sent * 400 >= 0.8 * limit

        def both_block() -> bool:
            return a.chat(usage=usage)[0] == 429 and b.chat(usage=usage)[0] == 429

        eventually(both_block, 1 + 1 + 1, interval=0.2, what="both replicas blocking within interval + scrape + 1 s")

        # The window (12 s) drains; after open_for the fuse half-opens and closes again.
        def admitted_again() -> bool:
            return a.chat(usage={"prompt_tokens": 10, "completion_tokens": 1})[0] == 200

        eventually(admitted_again, 30, interval=0.5, what="fuse closing after the window drained")
        metrics = urllib.request.urlopen(a.url + "/metrics", timeout=5).read().decode()
        assert (
            'tokenfuse_breaker_transitions_total{department="marketing",from_state="closed",to_state="open"}' in metrics
        )
        assert 'to_state="half_open"' in metrics
        # Prometheus goes away: after max_staleness, fail_closed blocks and the source is reported down.
        prom.stop()
        prom = None

        def source_down() -> bool:
            metrics = urllib.request.urlopen(b.url + "/metrics", timeout=5).read().decode()
            return 'tokenfuse_policy_source_up{source="prometheus"} 0.0' in metrics

        eventually(source_down, 1 + 2 + 1, interval=0.25, what="tokenfuse_policy_source_up 0 once queries fail")

        def failed_closed() -> bool:
            status, _, body = b.chat(usage={"prompt_tokens": 10, "completion_tokens": 1})
            return status == 429 and body["error"]["code"] == "department_fuse_open"

        # max_staleness (3 s) after the last good reading, plus an evaluation interval and a second of slack.
        eventually(failed_closed, 3 + 1 + 1, interval=0.5, what="fail_closed after max_staleness")
    finally:
        if prom is not None:
            prom.stop()
        a.stop()
        b.stop()


def _prometheus_on(tmp_path: Path, port: int, targets: list[int]) -> Any:
    """Start Prometheus on a given port (the replicas' config must name it before they start)."""
    from tests.integration import _procs

    original = _procs.free_port
    _procs.free_port = lambda: port  # type: ignore[assignment]
    try:
        return start_prometheus(tmp_path, [f"127.0.0.1:{p}" for p in targets])
    finally:
        _procs.free_port = original  # type: ignore[assignment]


def test_kill9_keeps_fuse_open_and_spend(upstream: FakeUpstream, tmp_path: Path) -> None:
    """kill -9 of a gateway with an open fuse and spent budget, then restart: still blocked, spend unchanged."""

    cfg = fake_config(upstream.url, tmp_path,
                      departments={"marketing": {"monthly_budget_usd": 0.05, "keys": [hash_key(KEYS["marketing"])]}},
                      ).model_dump(mode="json")  # fmt: skip
    gw = GatewayProcess(cfg, tmp_path, "gw").start()
    usage = {"prompt_tokens": 1000, "completion_tokens": 1000}  # $0.0125 on gpt-4o
    statuses = [gw.chat(usage=usage, max_tokens=1000)[0] for _ in range(6)]
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429, 429]

    def spent(g: GatewayProcess) -> float:
        for line in urllib.request.urlopen(g.url + "/metrics", timeout=5).read().decode().splitlines():
            if line.startswith('tokenfuse_budget_spent_usd{department="marketing"'):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no budget_spent gauge")

    before = spent(gw)
    assert before == pytest.approx(0.05, abs=1e-9)
    gw.stop(signal.SIGKILL)
    gw2 = GatewayProcess(cfg, tmp_path, "gw").start()
    try:
        status, _headers, body = gw2.chat(usage=usage, max_tokens=1000)
        assert status == 429, body
        assert spent(gw2) == pytest.approx(before, abs=1e-9)
        assert len(upstream.requests) == 4
    finally:
        gw2.stop()
