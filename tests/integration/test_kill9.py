"""``kill -9`` of a process holding open fuses and spend: after a restart the fuses are still open, spend unchanged,
and every call the dead process acknowledged as recorded is in the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tokenfuse.config import Config, parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.exporter.metrics import BREAKER_STATE
from tokenfuse.policies import PolicyEngine

pytestmark = pytest.mark.integration

CHILD = textwrap.dedent(
    """
    import json, sys, time
    from prometheus_client import CollectorRegistry
    from tokenfuse.config import parse_config
    from tokenfuse.exporter.meter import Meter
    from tokenfuse.metering.types import Usage
    from tokenfuse.policies import PolicyEngine

    cfg = parse_config(json.loads(sys.argv[1]))
    meter = Meter(cfg, CollectorRegistry())
    engine = PolicyEngine(cfg, meter)
    engine.open()

    def call(dept, tokens):
        labels = meter.labels(department=dept, project="web", environment="prod", provider="openai", model="m-1")
        adm = engine.admit(dept, input_tokens=tokens // 2, max_output_tokens=tokens - tokens // 2,
                           provider="openai", model="m-1")
        rec = meter.record(labels, usage=Usage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2),
                           outcome="success")
        engine.settle(adm.reservation, rec)

    for _ in range(5):
        call("mkt", 10_000)          # 5 x $0.10 = the whole $0.50 budget: budget fuse opens
    for _ in range(4):
        call("eng", 5_000)           # 20 000 tokens = the hourly limit: hourly fuse opens
    engine.override("ops", "open", "kill9 test", 3600, actor="test")
    status = {s["department"]: s for s in engine.fuse_status()}
    print("READY " + json.dumps(status), flush=True)
    n = 0
    while True:                      # unlimited department: keeps recording until killed
        n += 1
        call("lab", 1)
        print(f"ACK {n}", flush=True)
    """
)


def config(state: Path) -> dict[str, Any]:
    return {
        "timezone": "Europe/Berlin",
        "pricing": {"overrides": {"m-1": {"input": 10.0, "output": 10.0}}},
        "departments": {
            "eng": {"hourly_token_limit": 20_000},
            "mkt": {"monthly_budget_usd": 0.5},
            "ops": {},
            "lab": {},
        },
        "policy": {"state_path": str(state), "open_for": 3600},
    }


def test_kill9_keeps_open_fuses_spend_and_acknowledged_calls(tmp_path: Path) -> None:
    """SIGKILL after fuses opened and while calls are being recorded: restart sees the same fuses, spend and calls."""
    state = tmp_path / "state.db"
    raw = config(state)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(raw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    acked = 0
    before: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                before = json.loads(line[6:])
            elif line.startswith("ACK "):
                acked = int(line[4:])
                if acked >= 200:
                    break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # The child may have run ahead of our reading: its last words are still in the pipe.
        for line in proc.stdout.read().splitlines():
            if line.startswith("ACK "):
                acked = int(line[4:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert before, "child never reported READY"
    assert acked >= 200
    assert (before["mkt"]["state"], before["eng"]["state"], before["ops"]["state"]) == ("open", "open", "open")

    cfg: Config = parse_config(raw)
    registry = CollectorRegistry()
    engine = PolicyEngine(cfg, Meter(cfg, registry))
    engine.open()
    try:
        after = {s["department"]: s for s in engine.fuse_status()}
        assert (after["mkt"]["state"], after["mkt"]["cause"]) == ("open", "budget")
        assert after["mkt"]["spent_usd"] == before["mkt"]["spent_usd"] == pytest.approx(0.5)
        assert (after["eng"]["state"], after["eng"]["cause"]) == ("open", "token_limit")
        assert after["eng"]["tokens_window"] == before["eng"]["tokens_window"] == 20_000
        assert after["ops"]["override"]["reason"] == "kill9 test"
        assert registry.get_sample_value(BREAKER_STATE, {"department": "mkt", "state": "open"}) == 1.0
        adm = engine.admit("mkt", input_tokens=1, max_output_tokens=1, provider="openai", model="m-1")
        assert (adm.admitted, adm.reason) == (False, "fuse_open")
        lab_calls = sum(r["requests"] for r in engine.month_totals(_period(cfg)) if r["department"] == "lab")
        # ACK is printed after the commit: every acknowledged call is there, plus at most one the kill interrupted.
        assert acked <= lab_calls <= acked + 1
    finally:
        engine.close()


def _period(cfg: Config) -> str:
    return datetime.now(cfg.zone).strftime("%Y-%m")
