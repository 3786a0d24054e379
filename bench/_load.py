"""What the load benches share: free loopback ports, waiting for a server, wrk scripts and runs, process memory.

The benches run as scripts (``python bench/x.py``), so this module is imported by its name from bench/.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["WrkError", "free_port", "rss_mb", "wait_http", "write_lua", "wrk"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


class WrkError(RuntimeError):
    """wrk failed, saw error responses, or printed what cannot be parsed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``url`` answers; fail early when ``proc`` (the server) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:g} s")


def gateway_config(path: Path, upstream_port: int, gateway_port: int, key: str) -> Path:
    """A tokenfuse.yaml for the benches: one upstream (the fake) for ``gpt-*``, one department ``bench`` whose
    limits are never reached (so enforcement runs in full but refuses nothing), its ledger beside ``path``."""
    import yaml

    from tokenfuse.config import hash_key

    cfg: dict[str, Any] = {
        "upstreams": [
            {
                "name": "fake",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "provider": "openai",
                "models": ["gpt-*"],
            }
        ],
        "departments": {"bench": {"monthly_budget_usd": 1e9, "hourly_token_limit": 10**12, "keys": [hash_key(key)]}},
        "gateway": {"listen": f"127.0.0.1:{gateway_port}"},
        "policy": {"state_path": str(path.parent / "state.db")},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of process ``pid`` in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"VmRSS:\s+(\d+)", status)
    hwm = re.search(r"VmHWM:\s+(\d+)", status)
    return (int(rss.group(1)) / 1024 if rss else float("nan"), int(hwm.group(1)) / 1024 if hwm else float("nan"))


def write_lua(path: Path, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> Path:
    """A wrk script POSTing ``body`` as JSON with ``headers``."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(body))}"]
    for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
        lines.append(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, lua: Path, connections: int, duration: float) -> dict[str, float]:
    """One ``wrk -t1`` run: ``rps``, ``p50`` and ``p99`` (ms), ``socket_errors`` and ``timeouts`` (counts).

    Raises:
        WrkError: wrk failed, any response was not 2xx/3xx, or its output could not be read.
    """
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(lua), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = done.stdout
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode} for {url}: {done.stderr.strip() or out.strip()}")
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if errors:
        raise WrkError(f"wrk saw {errors.group(1)} error responses from {url}")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total) or int(total.group(1)) == 0:
        raise WrkError(f"cannot parse wrk output for {url}:\n{out}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    counts = [int(n) for n in sock.groups()] if sock else [0, 0, 0, 0]
    return {"rps": float(rps.group(1)), "p50": _ms(p50.group(1)), "p99": _ms(p99.group(1)),
            "socket_errors": float(sum(counts)), "timeouts": float(counts[3])}  # fmt: skip
