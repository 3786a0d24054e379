"""tokenfuse next to its peers: one workload, interleaved, through the fake upstream direct, tokenfuse's gateway
(enforce mode, the default), LiteLLM's proxy and Portkey's open-source gateway. Prints a markdown table.

Every target runs as its own process on loopback, in front of the same fake upstream. Throughput is wrk -t1 -c32,
latency wrk -t1 -c1 --latency; each round runs every target once for each, in an order rotated per round (this VM's
speed drifts, so a slow spell hits all of them), and the table shows medians over the rounds.

LiteLLM lives in its own venv and Portkey in its own npm folder; both are installed on first use (that needs the
package registries) and reused after. A peer that cannot be set up is reported with the reason and left out: the
rest is still measured.

    python bench/peers.py [--duration 5] [--latency-duration 4] [--rounds 2] [--skip litellm,portkey]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from _load import free_port, gateway_config, rss_mb, wait_http, write_lua, wrk

KEY = "tf-bench-key"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}
PEERS_DIR = Path("/tmp/tokenfuse-peers")
INSTALL_TIMEOUT = 900


class SetupError(Exception):
    """A peer could not be installed, started or verified."""


@dataclass
class Target:
    name: str
    version: str
    url: str
    headers: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    thr: list[float] = field(default_factory=list)  # req/s at c=32, one per round
    lat: list[float] = field(default_factory=list)  # p50 ms at c=1, one per round
    failed: str | None = None


# ---- small helpers, as in bench/gateway.py ----------------------------------------------------------------------


def wait_up(url: str, proc: subprocess.Popen[bytes], log: Path | None, timeout: float) -> None:
    """`wait_http`, failing as a `SetupError` that carries the server's last log lines."""
    try:
        wait_http(url, timeout, proc)
    except RuntimeError as e:
        raise SetupError(f"{e}{log_tail(log)}") from None


def log_tail(log: Path | None, lines: int = 8) -> str:
    if log is None or not log.exists():
        return ""
    text = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-lines:]
    return ("; last lines of " + str(log) + ":\n    " + "\n    ".join(text)) if text else ""


def lua_script(headers: dict[str, str], directory: Path) -> Path:
    return write_lua(directory / f"wrk-{secrets.token_hex(4)}.lua", BODY, headers)


def probe(t: Target) -> None:
    """One request through the target: it must answer 200 with a usage object."""
    req = urllib.request.Request(
        t.url, data=json.dumps(BODY).encode(), headers={"Content-Type": "application/json", **t.headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        raise SetupError(f"probe request got HTTP {e.code}: {e.read()[:300]!r}") from e
    except OSError as e:
        raise SetupError(f"probe request failed: {e}") from e
    try:
        usage = json.loads(raw).get("usage")
    except (ValueError, AttributeError):
        usage = None
    if status != 200 or not isinstance(usage, dict):
        raise SetupError(f"probe request got HTTP {status} without a usage object: {raw[:300]!r}")


def start(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    # Its own session, so stop() can end the process and any children it spawned, and nothing else.
    with log.open("wb") as f:
        return subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def run_quiet(cmd: list[str], what: str, timeout: float = INSTALL_TIMEOUT, cwd: Path | None = None) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    except FileNotFoundError as e:
        raise SetupError(f"{what}: {cmd[0]} not found") from e
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"{what}: no answer within {timeout:g} s (network closed?)") from e
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines()
        key = [ln for ln in lines if re.search(r"^ERROR|npm error (code|errno|network|request to)|E[A-Z]{4,}", ln)]
        tail = "\n    ".join((key or lines)[-6:])
        raise SetupError(f"{what} failed (exit {res.returncode}):\n    {tail}")
    return res.stdout


# ---- the peers ---------------------------------------------------------------------------------------------------


def ensure_litellm(venv: Path) -> Path:
    exe = venv / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing LiteLLM into {venv} (python -m venv + pip install 'litellm[proxy]') ...", file=sys.stderr)
    run_quiet([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    run_quiet([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "litellm[proxy]"],
              "pip install 'litellm[proxy]'")  # fmt: skip
    if not exe.exists():
        raise SetupError(f"pip install 'litellm[proxy]' left no {exe}")
    return exe


def litellm_version(venv: Path) -> str:
    out = run_quiet([str(venv / "bin" / "python"), "-m", "pip", "show", "litellm"], "pip show litellm", timeout=60)
    m = re.search(r"^Version:\s*(\S+)", out, re.M)
    return m.group(1) if m else "?"


def setup_litellm(venv: Path, up_port: int, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> Target:
    exe = ensure_litellm(venv)
    version = litellm_version(venv)
    port = free_port()
    master_key = "sk-" + secrets.token_hex(32)  # it refuses to start without one; no database, so only this key works
    cfg = {
        "model_list": [
            {
                "model_name": BODY["model"],
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": f"http://127.0.0.1:{up_port}/v1",
                    "api_key": "sk-fake",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": master_key},
    }
    (tmp / "litellm.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY", "REDIS_URL")}
    env.update(
        {
            "LITELLM_TELEMETRY": "False",
            "LITELLM_TELEMETRY_DISABLED": "true",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # else it fetches the price map from GitHub at start
            "LITELLM_LOG": "ERROR",  # their production advice; also drops the per-request access log
            "LITELLM_DONT_SHOW_FEEDBACK_BOX": "true",
        }
    )
    log = tmp / "litellm.log"
    cmd = [str(exe), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1", "--port", str(port),
           "--num_workers", "1"]  # fmt: skip
    proc = start(cmd, log, env=env, cwd=tmp)
    procs.append(proc)
    wait_up(f"http://127.0.0.1:{port}/health/liveliness", proc, log, timeout=90)
    return Target("LiteLLM proxy", version, f"http://127.0.0.1:{port}/v1/chat/completions",
                  {"Authorization": f"Bearer {master_key}"}, proc)  # fmt: skip


def ensure_portkey(directory: Path) -> Path:
    pkg = directory / "node_modules" / "@portkey-ai" / "gateway"
    if (pkg / "build" / "start-server.js").exists():
        return pkg
    if shutil.which("npm") is None:
        raise SetupError("npm is not installed")
    print(f"installing Portkey into {directory} (npm install @portkey-ai/gateway) ...", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "package.json").exists():  # so npm installs here, not into a parent folder's project
        (directory / "package.json").write_text('{"name": "tokenfuse-peers-portkey", "private": true}\n')
    run_quiet(["npm", "install", "--no-audit", "--no-fund", "@portkey-ai/gateway"], "npm install @portkey-ai/gateway",
              cwd=directory)  # fmt: skip
    if not (pkg / "build" / "start-server.js").exists():
        raise SetupError(f"npm install left no {pkg / 'build' / 'start-server.js'}")
    return pkg


def setup_portkey(directory: Path, up_port: int, tmp: Path, procs: list[subprocess.Popen[bytes]]) -> Target:
    if shutil.which("node") is None:
        raise SetupError("node is not installed")
    pkg = ensure_portkey(directory)
    version = json.loads((pkg / "package.json").read_text()).get("version", "?")
    port = free_port()
    log = tmp / "portkey.log"
    # It reads only --port=N (a separate "--port N" is ignored and it listens on 8787); --headless: no UI, no log stream.
    proc = start(["node", str(pkg / "build" / "start-server.js"), f"--port={port}", "--headless"], log, cwd=directory)
    procs.append(proc)
    wait_up(f"http://127.0.0.1:{port}/", proc, log, timeout=30)
    headers = {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": f"http://127.0.0.1:{up_port}/v1",
        "Authorization": "Bearer sk-fake",
    }
    return Target("Portkey gateway (OSS)", version, f"http://127.0.0.1:{port}/v1/chat/completions", headers, proc)


# ---- versions ----------------------------------------------------------------------------------------------------


def tool_version(cmd: list[str], pattern: str) -> str:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    m = re.search(pattern, res.stdout + res.stderr)
    return m.group(1) if m else "?"


def tokenfuse_version() -> str:
    try:
        version = importlib.metadata.version("tokenfuse")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return version
    return f"{version} ({rev}{'+dirty' if dirty else ''})" if rev else version


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        if m:
            return m.group(1).strip()
    return "?"


# ---- main --------------------------------------------------------------------------------------------------------


def measure_round(targets: list[Target], order: list[Target], lua: dict[str, Path], args: argparse.Namespace) -> None:
    phases: list[tuple[int, float, Callable[[Target, dict[str, float]], None]]] = [
        (32, args.duration, lambda t, r: t.thr.append(r["rps"])),
        (1, args.latency_duration, lambda t, r: t.lat.append(r["p50"])),
    ]
    for conns, duration, record in phases:
        for t in order:
            if t.failed:
                continue
            try:
                r = wrk(t.url, lua[t.name], conns, duration)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                t.failed = f"failed during measurement at c={conns}: {e}"
                print(f"  {t.name}: {t.failed}", file=sys.stderr)
                continue
            record(t, r)
            extra = f", {r['timeouts']:.0f} timeouts" if r["timeouts"] else ""
            print(f"  c={conns:<2} {t.name:<22} {r['rps']:>9.0f} req/s  p50 {r['p50']:.2f} ms{extra}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds of each c=32 throughput run (default 5)")
    ap.add_argument("--latency-duration", type=float, default=4.0, help="seconds of each c=1 latency run (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each target once per round and setting (medians)")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of c=32 warm-up per target (default 2)")
    ap.add_argument("--litellm-venv", type=Path, default=PEERS_DIR / "litellm-venv",
                    help="venv holding litellm[proxy]; created if missing (default %(default)s)")  # fmt: skip
    ap.add_argument("--portkey-dir", type=Path, default=PEERS_DIR / "portkey",
                    help="npm folder holding @portkey-ai/gateway; installed if missing (default %(default)s)")  # fmt: skip
    ap.add_argument("--skip", default="", help="comma-separated peers to leave out: litellm, portkey")
    args = ap.parse_args()
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - {"litellm", "portkey"}:
        ap.error(f"--skip: unknown peer(s) {', '.join(sorted(unknown))}")
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="tokenfuse-peers-"))
    up_port, gw_port = free_port(), free_port()
    gateway_config(tmp / "tokenfuse.yaml", up_port, gw_port, KEY)

    procs: list[subprocess.Popen[bytes]] = []
    targets: list[Target] = []
    problems: list[str] = []
    started = time.monotonic()
    try:
        up = start(
            [sys.executable, "-m", "tokenfuse.cli", "fake-upstream", "--port", str(up_port)], tmp / "upstream.log"
        )
        procs.append(up)
        gw = start([sys.executable, "-m", "tokenfuse.cli", "serve", "--config", str(tmp / "tokenfuse.yaml")],
                   tmp / "tokenfuse.log")  # fmt: skip
        procs.append(gw)
        wait_up(f"http://127.0.0.1:{up_port}/v1/models", up, tmp / "upstream.log", timeout=20)
        wait_up(f"http://127.0.0.1:{gw_port}/healthz", gw, tmp / "tokenfuse.log", timeout=20)
        targets.append(Target("direct (fake upstream)", "-", f"http://127.0.0.1:{up_port}/v1/chat/completions", {}, up))
        targets.append(Target("tokenfuse (enforce)", tokenfuse_version(), f"http://127.0.0.1:{gw_port}/v1/chat/completions",
                              {"Authorization": f"Bearer {KEY}"}, gw))  # fmt: skip
        for t in targets:
            probe(t)  # direct and tokenfuse must work: a SetupError here ends the bench

        peers: list[tuple[str, str, Callable[[], Target]]] = [
            ("litellm", "LiteLLM proxy", lambda: setup_litellm(args.litellm_venv, up_port, tmp, procs)),
            ("portkey", "Portkey gateway", lambda: setup_portkey(args.portkey_dir, up_port, tmp, procs)),
        ]
        for key, label, setup in peers:
            if key in skip:
                problems.append(f"{label}: skipped (--skip {key})")
                continue
            try:
                t = setup()
                probe(t)
            except SetupError as e:
                problems.append(f"{label}: not measured, setup failed: {e}")
                print(f"!! {problems[-1]}", file=sys.stderr)
                continue
            targets.append(t)
            print(f"{label} {t.version}: up, probe request OK", file=sys.stderr)

        lua = {t.name: lua_script(t.headers, tmp) for t in targets}
        print(f"warm-up, {args.warmup:g} s each at c=32", file=sys.stderr)
        for t in targets:
            try:
                wrk(t.url, lua[t.name], 32, args.warmup)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                t.failed = f"failed during warm-up: {e}"
                print(f"  {t.name}: {t.failed}", file=sys.stderr)
        for rnd in range(args.rounds):
            k = rnd % len(targets)
            order = targets[k:] + targets[:k]
            print(f"round {rnd + 1}/{args.rounds}: {' -> '.join(t.name for t in order)}", file=sys.stderr)
            measure_round(targets, order, lua, args)
        rss = {t.name: rss_mb(t.proc.pid)[0] for t in targets if t.proc is not None and t.proc.poll() is None}
    except SetupError as e:
        print(f"setup failed: {e}\n(logs kept in {tmp})", file=sys.stderr)
        return 1
    finally:
        stop(procs)
    elapsed = time.monotonic() - started

    for t in targets:
        if t.failed:
            problems.append(f"{t.name}: {t.failed}")
    direct = targets[0]
    if direct.failed or not direct.thr or not direct.lat:
        print(f"direct measurement failed: {direct.failed}", file=sys.stderr)
        return 1
    d_rps, d_p50 = statistics.median(direct.thr), statistics.median(direct.lat)

    print()
    print(f"## tokenfuse vs peers, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print()
    print(f"- machine: nproc {len(os.sched_getaffinity(0))}, {cpu_model()}, "
          f"Python {sys.version.split()[0]}")  # fmt: skip
    litellm = next((t.version for t in targets if t.name.startswith("LiteLLM")), "not measured")
    portkey = next((t.version for t in targets if t.name.startswith("Portkey")), "not measured")
    node = tool_version(["node", "--version"], r"v?([\d.]+)")
    wrk_v = tool_version(["wrk", "-v"], r"wrk\s+(\S+)")
    print(f"- versions: tokenfuse {targets[1].version}; litellm {litellm}; @portkey-ai/gateway {portkey}; "
          f"node {node}; wrk {wrk_v}")  # fmt: skip
    print(f"- workload: non-streamed chat completion, {BODY['max_tokens']}-token answer from the fake upstream; "
          f"req/s: wrk -t1 -c32, {args.duration:g} s; p50: wrk -t1 -c1, {args.latency_duration:g} s; "
          f"medians of {args.rounds} rounds, target order rotated per round; {elapsed:.0f} s in all, setup included")  # fmt: skip
    print("- each target is one process: tokenfuse `serve`, LiteLLM `--num_workers 1` (no database), "
          "Portkey `node build/start-server.js --headless`")  # fmt: skip
    print()
    print("| target | version | req/s (c=32) | vs direct | p50 (c=1) | added p50 vs direct | RSS after |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for t in targets:
        if not t.thr or not t.lat:
            continue
        rps, p50 = statistics.median(t.thr), statistics.median(t.lat)
        added = "-" if t is direct else f"{p50 - d_p50:+.2f} ms"
        ratio = "-" if t is direct else f"{rps / d_rps:.1%}"
        mem = f"{rss[t.name]:.0f} MB" if t.name in rss else "?"
        print(f"| {t.name} | {t.version} | {rps:.0f} | {ratio} | {p50:.2f} ms | {added} | {mem} |")
    if problems:
        print()
        for p in problems:
            print(f"- NOTE {p}")
    print()
    print("per-round req/s (c=32): " + "; ".join(f"{t.name} " + ", ".join(f"{x:.0f}" for x in t.thr) for t in targets))
    print("per-round p50 ms (c=1): " + "; ".join(f"{t.name} " + ", ".join(f"{x:.2f}" for x in t.lat) for t in targets))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
