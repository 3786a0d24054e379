"""A call the policy refuses, seen through each official SDK and the instrumented client: the SDK's own 429, at once,
never retried, counted once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from prometheus_client import CollectorRegistry
from tests.conftest import KEYS, fake_config

import tokenfuse
from tokenfuse.config import Config, hash_key
from tokenfuse.exporter.meter import Meter
from tokenfuse.policies import PolicyEngine
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    from tokenfuse.metering.estimate import count_tokens

    count_tokens("warm-up", None)  # tiktoken loads its tables once (~0.5 s); not part of any call's time
    with FakeUpstreamThread() as up:
        yield up


def _config(upstream: FakeUpstream, tmp_path: Path, **marketing: Any) -> Config:
    return fake_config(upstream.url, tmp_path,
                       departments={"marketing": {"keys": [hash_key(KEYS["marketing"])], **marketing}})  # fmt: skip


def _blocked(reg: CollectorRegistry) -> float:
    return sum(
        s.value
        for fam in reg.collect()
        for s in fam.samples
        if s.name == "tokenfuse_blocked_requests_total" and s.labels["department"] == "marketing"
    )


@contextlib.contextmanager
def _engine(upstream: FakeUpstream, cfg: Config) -> Iterator[tuple[PolicyEngine, Meter, CollectorRegistry]]:
    """An open policy engine on its own registry; the fake upstream's record cleared."""
    reg = CollectorRegistry()
    meter = Meter(cfg, reg)
    eng = PolicyEngine(cfg, meter)
    eng.open()
    upstream.reset()
    try:
        yield eng, meter, reg
    finally:
        eng.close()


@pytest.fixture
def engine(upstream: FakeUpstream, tmp_path: Path) -> Iterator[tuple[PolicyEngine, Meter, CollectorRegistry]]:
    # A budget far below one call's worst case: every call is refused before anything is sent.
    with _engine(upstream, _config(upstream, tmp_path, monthly_budget_usd=0.0001)) as made:
        yield made


def _transport(cls: type[Any], eng: PolicyEngine, meter: Meter) -> Any:
    return cls(meter=meter, policy=eng, department="marketing")


def _warm(call: Any, error: type[Exception]) -> None:
    """One untimed refused call first: an SDK builds its response models on first use (~0.2 s once per process);
    the bound below is on a refusal, not on the SDK's warm-up."""
    with pytest.raises(error):
        call()


async def _awarm(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        await call()


def test_openai_sync_gets_its_rate_limit_error_without_retry(
    upstream: FakeUpstream, engine: tuple[PolicyEngine, Meter, CollectorRegistry]
) -> None:
    """openai (default max_retries=2) raises RateLimitError within 100 ms; nothing is sent; blocked +1."""
    eng, meter, reg = engine
    for http in (httpx.Client, httpx2.Client):
        before = _blocked(reg)
        client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x",
                               http_client=http(transport=_transport(tokenfuse.MeteredTransport, eng, meter)))  # fmt: skip

        def create() -> Any:
            return client.chat.completions.create(model="gpt-4o", max_tokens=1000, messages=MSG)  # type: ignore[arg-type]  # noqa: B023

        _warm(create, openai.RateLimitError)
        t0 = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as e:
            create()
        assert time.perf_counter() - t0 < 0.1
        assert e.value.status_code == 429
        assert e.value.code == "insufficient_budget"
        assert e.value.response.headers["x-should-retry"] == "false"
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert upstream.requests == []
        assert _blocked(reg) == before + 2  # the warm-up and the timed call: each counted once, none retried


async def test_openai_async_gets_its_rate_limit_error_without_retry(
    upstream: FakeUpstream, engine: tuple[PolicyEngine, Meter, CollectorRegistry]
) -> None:
    """AsyncOpenAI: the same 429 at once, not retried, counted once."""
    eng, meter, reg = engine
    client = openai.AsyncOpenAI(
        base_url=upstream.url + "/v1", api_key="x",
        http_client=httpx.AsyncClient(transport=_transport(tokenfuse.AsyncMeteredTransport, eng, meter)))  # fmt: skip

    def create() -> Any:
        return client.chat.completions.create(model="gpt-4o", max_tokens=1000, messages=MSG)  # type: ignore[arg-type]

    await _awarm(create, openai.RateLimitError)
    t0 = time.perf_counter()
    with pytest.raises(openai.RateLimitError) as e:
        await create()
    assert time.perf_counter() - t0 < 0.1
    assert e.value.code == "insufficient_budget"
    assert upstream.requests == []
    assert _blocked(reg) == 2
    await client.close()


def test_anthropic_sync_gets_its_rate_limit_error_without_retry(
    upstream: FakeUpstream, engine: tuple[PolicyEngine, Meter, CollectorRegistry]
) -> None:
    """anthropic 2.x on httpx2 raises its RateLimitError (not APIConnectionError) at once, not retried."""
    eng, meter, reg = engine
    client = anthropic.Anthropic(base_url=upstream.url, api_key="x",
                                 http_client=httpx2.Client(transport=_transport(tokenfuse.MeteredTransport, eng, meter)))  # fmt: skip

    def create() -> Any:
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=1000, messages=MSG)  # type: ignore[arg-type]

    _warm(create, anthropic.RateLimitError)
    t0 = time.perf_counter()
    with pytest.raises(anthropic.RateLimitError) as e:
        create()
    assert time.perf_counter() - t0 < 0.1
    body = e.value.body
    assert isinstance(body, dict) and body["error"]["code"] == "insufficient_budget"
    assert body["error"]["type"] == "rate_limit_error"
    assert upstream.requests == []
    assert _blocked(reg) == 2


async def test_anthropic_async_gets_its_rate_limit_error_without_retry(
    upstream: FakeUpstream, engine: tuple[PolicyEngine, Meter, CollectorRegistry]
) -> None:
    """AsyncAnthropic on httpx2: the same."""
    eng, meter, reg = engine
    client = anthropic.AsyncAnthropic(
        base_url=upstream.url, api_key="x",
        http_client=httpx2.AsyncClient(transport=_transport(tokenfuse.AsyncMeteredTransport, eng, meter)))  # fmt: skip

    def create() -> Any:
        return client.messages.create(model="claude-sonnet-4-5", max_tokens=1000, messages=MSG)  # type: ignore[arg-type]

    await _awarm(create, anthropic.RateLimitError)
    t0 = time.perf_counter()
    with pytest.raises(anthropic.RateLimitError):
        await create()
    assert time.perf_counter() - t0 < 0.1
    assert upstream.requests == []
    assert _blocked(reg) == 2
    await client.close()


def test_open_fuse_is_department_fuse_open(upstream: FakeUpstream, tmp_path: Path) -> None:
    """An operator-opened fuse is refused with code department_fuse_open."""
    with _engine(upstream, _config(upstream, tmp_path, monthly_budget_usd=100)) as (eng, meter, _reg):
        eng.override("marketing", "open", "test", None, actor="test")
        client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x",
                               http_client=httpx.Client(transport=_transport(tokenfuse.MeteredTransport, eng, meter)))  # fmt: skip
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="gpt-4o", max_tokens=10, messages=MSG)  # type: ignore[arg-type]
        assert e.value.code == "department_fuse_open"
        assert e.value.response.headers["x-tokenfuse-fuse-state"] == "open"


def test_transport_reserves_the_policy_default_max_tokens(upstream: FakeUpstream, tmp_path: Path) -> None:
    """A call without max_tokens reserves policy.default_max_tokens, not a fixed 4096: with a 400-token hourly
    limit and default_max_tokens 100 it goes out."""
    cfg = fake_config(upstream.url, tmp_path, policy={"state_path": str(tmp_path / "s.db"), "default_max_tokens": 100},
                      departments={"marketing": {"keys": [hash_key(KEYS["marketing"])], "hourly_token_limit": 400}})  # fmt: skip
    with _engine(upstream, cfg) as (eng, meter, reg):
        client = openai.OpenAI(base_url=upstream.url + "/v1", api_key="x",
                               http_client=httpx.Client(transport=_transport(tokenfuse.MeteredTransport, eng, meter)))  # fmt: skip
        client.chat.completions.create(model="gpt-4o", messages=MSG)  # type: ignore[arg-type]
        assert len(upstream.requests) == 1
        assert _blocked(reg) == 0
