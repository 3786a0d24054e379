"""A bad config is never adopted: empty, truncated to nothing, or without departments/upstreams — on SIGHUP the
gateway keeps serving from the old one, and `tokenfuse check` says why it is refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from tests.conftest import fake_config
from tests.integration._procs import GatewayProcess, eventually

from tokenfuse.testing.fake_upstream import FakeUpstream, FakeUpstreamThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstreamThread() as up:
        yield up


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenfuse.cli", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_check_refuses_empty_and_unservable_configs(upstream: FakeUpstream, tmp_path: Path) -> None:
    """check: an empty file, one without departments, one without upstreams exit 2 and name the problem."""
    good = fake_config(upstream.url, tmp_path).model_dump(mode="json")
    cases = {
        "empty.yaml": ("# nothing here\n", "empty"),
        "nodepts.yaml": (yaml.safe_dump({**good, "departments": {}}), "departments:"),
        "noups.yaml": (yaml.safe_dump({**good, "upstreams": []}), "upstreams:"),
    }
    for name, (text, says) in cases.items():
        (tmp_path / name).write_text(text)
        r = _check(tmp_path / name)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert says in r.stderr, (name, r.stderr)
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    r = _check(tmp_path / "good.yaml")
    assert r.returncode == 0 and "OK" in r.stdout


def test_sighup_with_an_empty_config_keeps_the_old_one(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The config file emptied (or stripped of departments) then SIGHUP: refused, logged, keys still work."""
    cfg = fake_config(upstream.url, tmp_path).model_dump(mode="json")
    gw = GatewayProcess(cfg, tmp_path, "reload").start()
    try:
        assert gw.chat()[0] == 200
        good = gw.path.read_text()
        for n, bad in enumerate(("", yaml.safe_dump({**yaml.safe_load(good), "departments": {}})), start=1):
            gw.path.write_text(bad)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGHUP)
            eventually(lambda n=n: gw.log.read_text().count("config_reload_refused") >= n, 10,  # type: ignore[misc]
                       what="the reload refused")  # fmt: skip
            time.sleep(0.2)
            status, _, _ = gw.chat()
            assert status == 200  # the old departments and keys still serve
    finally:
        gw.stop()
