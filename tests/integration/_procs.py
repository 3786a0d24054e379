"""Real Prometheus and Alertmanager for integration tests: free 127.0.0.1 ports, temp dirs, always stopped.

Use as context managers (``with start_prometheus(...) as prom:``). Calls block; from an async test that serves
the scrape target itself, run them with ``await asyncio.to_thread(...)`` so the event loop keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
import yaml

from conftest import KEYS, require_binary

__all__ = [
    "Alertmanager",
    "GatewayProcess",
    "Prometheus",
    "eventually",
    "free_port",
    "require_binary",
    "start_alertmanager",
    "start_prometheus",
]

T = TypeVar("T")
_S = TypeVar("_S", bound="_Server")

_START_ATTEMPTS = 3  # a port picked free can be taken before the process binds it
_STOP_GRACE = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], T | None], timeout: float, interval: float = 0.2, what: str = "condition") -> T:
    """Call ``check`` until it returns something truthy, and return that.

    Args:
        check: returns the awaited value, or something falsy (None, False, empty) while not there yet.
        timeout: seconds before giving up with ``AssertionError``.
        interval: seconds between calls.
        what: names the condition in the failure message.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:  # an empty list or dict means "not yet", like None and False
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class _Server:
    """A child process serving HTTP on 127.0.0.1, with its log and work dir kept for failure messages."""

    name = "server"

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self._http = httpx.Client(base_url=self.url, timeout=5.0)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's output."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self._http.get("/-/ready").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:g}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period); safe to call twice."""
        self._http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _launch(cls: type[_S], binary: str, tmp_path: Path, args: Callable[[int, Path], list[str]], timeout: float) -> _S:
    """Start ``binary`` on a free port, retrying when the port was taken meanwhile."""
    for _ in range(_START_ATTEMPTS):
        port = free_port()
        workdir = Path(tempfile.mkdtemp(prefix=f"{cls.name}-", dir=tmp_path))
        log_path = workdir / "output.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [binary, *args(port, workdir)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        server = cls(process, port, workdir, log_path)
        try:
            if server._wait_ready(timeout):
                return server
        except BaseException:
            server.stop()
            raise
        server.stop()
        if "address already in use" not in server.log_tail().lower():
            raise RuntimeError(f"{cls.name} exited with {process.returncode}:\n{server.log_tail()}")
    raise RuntimeError(f"{cls.name}: no free port after {_START_ATTEMPTS} attempts")


class Prometheus(_Server):
    """A running Prometheus; ``url`` is its HTTP API."""

    name = "prometheus"

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant query now and return the result list (``[{"metric": {...}, "value": [t, "v"]}]``).

        Args:
            expr: PromQL.
        """
        response = self._http.get("/api/v1/query", params={"query": expr})
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body.get('error', response.text)}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Alerts Prometheus holds now, pending and firing (``/api/v1/alerts``)."""
        alerts: list[dict[str, Any]] = self._http.get("/api/v1/alerts").json()["data"]["alerts"]
        return alerts

    def alertmanagers_ready(self) -> bool:
        """True once Prometheus has discovered an Alertmanager to send to (discovery runs every 5 s)."""
        data = self._http.get("/api/v1/alertmanagers").json()["data"]
        return bool(data["activeAlertmanagers"])

    def targets_up(self) -> bool:
        """True when every active scrape target has been scraped successfully."""
        active = self._http.get("/api/v1/targets").json()["data"]["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)


def start_prometheus(
    tmp_path: Path,
    scrape_targets: Sequence[str],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    alertmanager_url: str | None = None,
    job: str = "tokenfuse",
    timeout: float = 30.0,
) -> Prometheus:
    """Start ``/usr/bin/prometheus`` on a free 127.0.0.1 port with its TSDB in a temp dir under ``tmp_path``.

    Args:
        tmp_path: the test's temp dir (config, TSDB and log go in a fresh sub-directory).
        scrape_targets: ``host:port`` (or ``http://host:port``) of the /metrics endpoints to scrape.
        rule_files: rule files to load.
        scrape_interval: Prometheus duration; the scrape timeout is the same.
        evaluation_interval: rule evaluation interval.
        alertmanager_url: ``http://host:port`` of an Alertmanager to send alerts to, or None.
        job: the scrape job name (tokenfuse rules watch ``job="tokenfuse"``).
        timeout: seconds to wait for ``/-/ready``.
    """
    binary = require_binary("prometheus")
    targets = [t.split("://", 1)[-1].rstrip("/") for t in scrape_targets]
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }
    if alertmanager_url is not None:
        scheme, _, host = alertmanager_url.partition("://")
        config["alerting"] = {
            "alertmanagers": [
                {"scheme": scheme, "api_version": "v2", "static_configs": [{"targets": [host.rstrip("/")]}]}
            ]
        }

    def args(port: int, workdir: Path) -> list[str]:
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return [
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]

    return _launch(Prometheus, binary, tmp_path, args, timeout)


class Alertmanager(_Server):
    """A running Alertmanager (no clustering); ``url`` is its HTTP API."""

    name = "alertmanager"

    def alerts(self, **filters: str) -> list[dict[str, Any]]:
        """Alerts it holds (``/api/v2/alerts``), each with ``status.inhibitedBy`` / ``silencedBy``.

        Args:
            filters: query parameters, e.g. ``inhibited="false"``.
        """
        alerts: list[dict[str, Any]] = self._http.get("/api/v2/alerts", params=filters).json()
        return alerts

    def post_alerts(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Send alerts as Prometheus does (``POST /api/v2/alerts``).

        Args:
            alerts: ``{"labels": {...}, "annotations": {...}}`` mappings.
        """
        self._http.post("/api/v2/alerts", json=list(alerts)).raise_for_status()


def start_alertmanager(tmp_path: Path, config_text: str, timeout: float = 30.0) -> Alertmanager:
    """Start ``/usr/bin/prometheus-alertmanager`` on a free 127.0.0.1 port, without gossip, storage in a temp dir.

    Args:
        tmp_path: the test's temp dir (config, storage and log go in a fresh sub-directory).
        config_text: the alertmanager.yml content.
        timeout: seconds to wait for ``/-/ready``.
    """
    binary = require_binary("prometheus-alertmanager")

    def args(port: int, workdir: Path) -> list[str]:
        config_path = workdir / "alertmanager.yml"
        config_path.write_text(config_text, encoding="utf-8")
        return [
            f"--config.file={config_path}",
            f"--storage.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ]

    return _launch(Alertmanager, binary, tmp_path, args, timeout)


class GatewayProcess:
    """`tokenfuse serve` in a subprocess on a free port."""

    def __init__(self, config: dict[str, Any], tmp_path: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.port = free_port()
        config = json.loads(json.dumps(config))
        config["gateway"]["listen"] = f"127.0.0.1:{self.port}"
        config["policy"]["state_path"] = str(tmp_path / f"{name}.db")  # one ledger per replica
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = tmp_path / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tokenfuse.cli", "serve", "--config", str(self.path)],
                stdout=log, stderr=log, env={**os.environ, "TOKENFUSE_TEST_UPSTREAM_KEY": "sk-up", **self.env},
            )  # fmt: skip
        eventually(self._healthy, 30, what=f"gateway {self.url} healthy\n{self.log.read_text()[-2000:]}")
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                return True
        except (OSError, urllib.error.URLError):
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def chat(
        self, dept: str = "marketing", usage: dict[str, int] | None = None, max_tokens: int = 10
    ) -> tuple[int, dict[str, str], dict[str, Any]]:
        body = json.dumps({"model": "gpt-4o", "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()  # fmt: skip
        headers = {"Authorization": f"Bearer {KEYS[dept]}", "Content-Type": "application/json"}
        if usage is not None:
            headers["x-fake-usage"] = json.dumps(usage)
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, dict(r.headers), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), json.loads(e.read())
