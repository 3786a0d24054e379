"""One behaviour matrix, both front doors: the instrumented client and the gateway process meter the same calls alike.

Each scenario (admit, refuse, stream, cut stream, no usage, upstream error) is one call made with the official openai
SDK, once through `MeteredTransport` with a policy and once through `tokenfuse serve`; the metrics each door wrote for
it must be the same.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tests.conftest import KEYS, fake_config
from tests.integration._procs import GatewayProcess

import tokenfuse
from tokenfuse.config import Config, hash_key
from tokenfuse.exporter.meter import Meter
from tokenfuse.policies import PolicyEngine
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

pytestmark = pytest.mark.integration

FROZEN_KEY = "tf-test-frozen"
USAGE = {"prompt_tokens": 100, "completion_tokens": 20}
Metrics = dict[tuple[str, ...], float]


def _config(upstream: FakeUpstream, tmp_path: Path, name: str) -> Config:
    departments = {
        "marketing": {"monthly_budget_usd": 500, "keys": [hash_key(KEYS["marketing"])]},
        "frozen": {"monthly_budget_usd": 0.000001, "keys": [hash_key(FROZEN_KEY)]},
    }
    return fake_config(upstream.url, tmp_path, departments=departments,
                       policy={"state_path": str(tmp_path / f"{name}.db"), "interval": "1s"})  # fmt: skip


def _ours(samples: Any) -> Metrics:
    """The samples a call changes, keyed so both doors' registries compare."""
    out: Metrics = {}
    for s in samples:
        lab = s.labels
        if s.name == "tokenfuse_requests_total":
            key: tuple[str, ...] = ("requests", lab["department"], lab["outcome"])
        elif s.name == "tokenfuse_tokens_total":
            key = ("tokens", lab["department"], lab["token_type"])
        elif s.name == "tokenfuse_estimated_requests_total":
            key = ("estimated", lab["department"])
        elif s.name == "tokenfuse_blocked_requests_total":
            key = ("blocked", lab["department"], lab["reason"])
        else:
            continue
        out[key] = out.get(key, 0.0) + s.value
    return out


class Door:
    """A front door: make the scenario's call, read back what was metered."""

    name = ""

    def client(self, key: str) -> openai.OpenAI:
        raise NotImplementedError

    def metrics(self) -> Metrics:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TransportDoor(Door):
    name = "transport"

    def __init__(self, upstream: FakeUpstream, tmp_path: Path) -> None:
        cfg = _config(upstream, tmp_path, "transport")
        self.upstream = upstream
        self.reg = CollectorRegistry()
        self.meter = Meter(cfg, self.reg)
        self.engine = PolicyEngine(cfg, self.meter)
        self.engine.open()

    def client(self, key: str) -> openai.OpenAI:
        dept = "frozen" if key == FROZEN_KEY else "marketing"
        t = tokenfuse.MeteredTransport(meter=self.meter, policy=self.engine, department=dept)
        return openai.OpenAI(base_url=self.upstream.url + "/v1", api_key="x", max_retries=0,
                             http_client=httpx.Client(transport=t))  # fmt: skip

    def metrics(self) -> Metrics:
        return _ours(s for fam in self.reg.collect() for s in fam.samples)

    def close(self) -> None:
        self.engine.close()


class GatewayDoor(Door):
    name = "gateway"

    def __init__(self, upstream: FakeUpstream, tmp_path: Path) -> None:
        cfg = _config(upstream, tmp_path, "gateway").model_dump(mode="json")
        self.gw = GatewayProcess(cfg, tmp_path, "gateway").start()

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.gw.url + "/v1", api_key=key, max_retries=0)

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(self.gw.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        return _ours(s for fam in text_string_to_metric_families(text) for s in fam.samples)

    def close(self) -> None:
        self.gw.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


@pytest.fixture(scope="module")
def doors(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Door]]:
    tmp = tmp_path_factory.mktemp("doors")
    made: dict[str, Door] = {"transport": TransportDoor(upstream, tmp), "gateway": GatewayDoor(upstream, tmp)}
    try:
        yield made
    finally:
        for d in made.values():
            d.close()


def _call(door: Door, scenario: str) -> None:
    msgs: Any = [{"role": "user", "content": "Tell me a short story about a fuse."}]
    if scenario == "refuse":
        with pytest.raises(openai.RateLimitError):
            door.client(FROZEN_KEY).chat.completions.create(model="gpt-4o", max_tokens=50, messages=msgs)
        return
    c = door.client(KEYS["marketing"])
    fault = {"cut_stream": "cut", "no_usage": "no_usage", "upstream_error": "http_500"}.get(scenario)
    headers = {"x-fake-usage": json.dumps(USAGE)}
    if fault:
        headers = {"x-fake-fault": fault}
    if scenario in ("stream", "cut_stream"):
        try:
            for _ in c.chat.completions.create(model="gpt-4o", max_tokens=50, messages=msgs, stream=True,
                                               stream_options={"include_usage": True}, extra_headers=headers):  # fmt: skip
                pass
        except (openai.APIError, httpx.HTTPError):
            assert scenario == "cut_stream"
        return
    if scenario == "upstream_error":
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="gpt-4o", max_tokens=50, messages=msgs, extra_headers=headers)
        return
    c.chat.completions.create(model="gpt-4o", max_tokens=50, messages=msgs, extra_headers=headers)


EXPECTED: dict[str, Metrics] = {
    "admit": {("requests", "marketing", "success"): 1, ("tokens", "marketing", "input"): 100,
              ("tokens", "marketing", "output"): 20},
    "refuse": {("requests", "frozen", "blocked"): 1, ("blocked", "frozen", "insufficient_budget"): 1},
    "stream": {("requests", "marketing", "success"): 1},
    "cut_stream": {("requests", "marketing", "success"): 1, ("estimated", "marketing"): 1},
    "no_usage": {("requests", "marketing", "success"): 1, ("estimated", "marketing"): 1},
    "upstream_error": {("requests", "marketing", "upstream_error"): 1},
}  # fmt: skip


@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_both_doors_meter_alike(doors: dict[str, Door], scenario: str) -> None:
    """The same call through either front door changes the same metrics by the same amounts."""
    deltas = {}
    for name, door in doors.items():
        before = door.metrics()
        _call(door, scenario)
        after = door.metrics()
        deltas[name] = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    t, g = deltas["transport"], deltas["gateway"]
    assert t == g, f"{scenario}: transport {t} != gateway {g}"
    for key, value in EXPECTED[scenario].items():
        assert t.get(key) == value, (scenario, key, t)
    if scenario in ("stream", "cut_stream", "no_usage"):
        assert t[("tokens", "marketing", "output")] > 0 and t[("tokens", "marketing", "input")] > 0
    if scenario in ("refuse", "upstream_error"):
        assert not any(k[0] == "tokens" for k in t)
