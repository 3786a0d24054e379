"""The README's Python examples run, each in its own process, against the fake upstream (and a real gateway process),
and do what the text around them says.

The examples name the addresses a user would have (``http://127.0.0.1:8080``, port 9464, ``tf-…``); the test puts
the test's own in their place and changes nothing else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.conftest import KEYS, fake_config
from tests.integration._procs import GatewayProcess, free_port

from tokenfuse.config import hash_key
from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block containing {marker!r}, found {len(found)}"
    return found[0]


def run(code: str, cwd: Path, env: dict[str, str]) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, f"README example failed:\n{code}\n--- stderr ---\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


def test_every_python_block_is_exercised() -> None:
    """Each Python block of the README is one of the examples this module runs (none is left untested)."""
    markers = ("tokenfuse.labels(department=", 'base_url="http://127.0.0.1:8080/v1"', "raise_on_block=True")
    blocks = python_blocks()
    assert len(blocks) == len(markers)
    for b in blocks:
        assert sum(m in b for m in markers) == 1, b


def test_instrumented_client_example(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The first example bills the call to 'sales' (the labels() override) with the transport's project and
    environment, and serves /metrics on the port it names."""
    upstream.reset()
    port = free_port()
    code = block("tokenfuse.labels(department=").replace("9464", str(port))
    code += f"""
import urllib.request
from prometheus_client import REGISTRY
text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
labels = dict(department="sales", project="campaign-q2", environment="production", provider="openai", model="gpt-4.1")
print(REGISTRY.get_sample_value("tokenfuse_requests_total", {{**labels, "outcome": "success"}}))
print(REGISTRY.get_sample_value("tokenfuse_tokens_total", {{**labels, "token_type": "output"}}))
print("tokenfuse_cost_usd_total" in text)
"""
    out = run(code, tmp_path, {"OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test"})
    requests, output, served = out.split()
    assert float(requests) == 1.0
    assert float(output) == upstream.reported_totals()["output_tokens"] > 0
    assert served == "True"


def test_gateway_client_example(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The gateway example's clients bill their calls to the key's department, with the X-Project and
    X-Environment headers as labels; the Anthropic client's key goes as x-api-key."""
    cfg = fake_config(upstream.url, tmp_path).model_dump(mode="json")
    gw = GatewayProcess(cfg, tmp_path, "readme-gw").start()
    try:
        code = block('base_url="http://127.0.0.1:8080/v1"').replace("http://127.0.0.1:8080", gw.url)
        code = code.replace("tf-…", KEYS["marketing"])
        code += """
client.chat.completions.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
claude.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
import urllib.request
print(urllib.request.urlopen(URL + "/metrics", timeout=5).read().decode())
""".replace("URL", repr(gw.url))
        text = run(code, tmp_path, {})
    finally:
        gw.stop()
    from prometheus_client.parser import text_string_to_metric_families

    ok = {
        (s.labels["provider"], s.labels["project"], s.labels["environment"]): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "tokenfuse_requests_total"
        and s.labels["department"] == "marketing"
        and s.labels["outcome"] == "success"
    }
    # The OpenAI client sends the project headers; the Anthropic one, as written, does not.
    assert ok == {("openai", "campaign-q2", "production"): 1.0, ("anthropic", "none", "none"): 1.0}


def test_enforcing_client_example(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The enforcing example prints the SDK's 429 code, then BudgetExceeded's fields; nothing reaches the upstream."""
    upstream.reset()
    cfg = {"departments": {"marketing": {"monthly_budget_usd": 0.01, "keys": [hash_key(KEYS["marketing"])]}},
           "policy": {"state_path": str(tmp_path / "state.db")}}  # fmt: skip
    (tmp_path / "tokenfuse.yaml").write_text(yaml.safe_dump(cfg))
    out = run(block("raise_on_block=True"), tmp_path,
              {"OPENAI_BASE_URL": upstream.url + "/v1", "OPENAI_API_KEY": "sk-test"})  # fmt: skip
    lines = out.splitlines()
    assert lines[0] == "insufficient_budget"
    dept, reason, retry = lines[1].split()
    assert (dept, reason) == ("marketing", "insufficient_budget")
    assert float(retry) > 0
    assert upstream.requests == []
    assert json.loads(json.dumps(upstream.reported_totals()))["output_tokens"] == 0
