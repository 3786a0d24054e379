"""Gateway overhead: the fake upstream direct vs through the gateway, at concurrency 1 and 32.

Runs the fake upstream and the gateway as separate processes (as in production) and drives them with wrk
(Debian package ``wrk``), then measures time-to-first-chunk of streams with a Python client. Prints a table.

    python bench/gateway.py [--duration 10] [--no-enforce]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from _load import free_port, gateway_config, rss_mb, wait_http, write_lua
from _load import wrk as run_wrk

KEY = "tf-bench-key"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}


def wrk(url: str, connections: int, duration: float, headers: dict[str, str], tmp: Path) -> dict[str, float]:
    return run_wrk(url, write_lua(tmp / "gateway.lua", BODY, headers), connections, duration)


async def ttfc(url: str, headers: dict[str, str], n: int) -> float:
    """Median time to first body chunk of a streamed chat completion, in ms."""
    body = {**BODY, "stream": True}
    samples = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 5):
            t0 = time.perf_counter()
            async with s.post(url, json=body, headers=headers) as r:
                await r.content.readany()
                t1 = time.perf_counter()
                await r.read()
            if i >= 5:
                samples.append((t1 - t0) * 1000)
    return statistics.median(samples)


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--no-enforce", dest="enforce", action="store_false",
                    help="meter only: no policy engine in the gateway (default: enforce, local ledger)")  # fmt: skip
    ap.add_argument("--enforce", dest="enforce", action="store_true", help=argparse.SUPPRESS)  # the old flag
    ap.add_argument("--rounds", type=int, default=3, help="alternating direct/gateway runs per setting (medians)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tokenfuse-bench-"))
    up_port, gw_port = free_port(), free_port()
    gateway_config(tmp / "tokenfuse.yaml", up_port, gw_port, KEY)
    procs = []
    try:
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tokenfuse.cli", "fake-upstream", "--port", str(up_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        gw_cmd = [sys.executable, "-m", "tokenfuse.cli", "serve", "--config", str(tmp / "tokenfuse.yaml")]
        if not args.enforce:
            gw_cmd.append("--no-enforce")
        procs.append(subprocess.Popen(gw_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{up_port}/v1/models")
        wait_http(f"http://127.0.0.1:{gw_port}/healthz")
        direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        via = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {KEY}"}
        rows = []
        peak = 0.0
        for c in (1, 32):
            wrk(direct, c, 2, {}, tmp)  # warm-up
            wrk(via, c, 2, auth, tmp)
            # This VM's speed drifts by 2x over minutes: alternate direct and gateway runs and take medians,
            # so a slow spell hits both sides.
            ds, gs = [], []
            for _ in range(args.rounds):
                ds.append(wrk(direct, c, args.duration, {}, tmp))
                gs.append(wrk(via, c, args.duration, auth, tmp))
            peak = max(peak, rss_mb(procs[1].pid)[1])
            rows.append((c, _median(ds), _median(gs)))
        t_direct = statistics.median(asyncio.run(ttfc(direct, {}, 200)) for _ in range(args.rounds))
        t_via = statistics.median(asyncio.run(ttfc(via, auth, 200)) for _ in range(args.rounds))
        rss, hwm = rss_mb(procs[1].pid)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
    mode = "enforce (local ledger)" if args.enforce else "meter only"
    print(f"\ngateway benchmark ({mode}), medians of {args.rounds} alternating {args.duration:g} s runs, wrk -t1, "
          f"{time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"{'conc':>4} | {'direct rps':>10} | {'gw rps':>8} | {'gw/direct':>9} | {'direct p50':>10} | {'gw p50':>8} | "
          f"{'added p50':>9} | {'direct p99':>10} | {'gw p99':>8}")  # fmt: skip
    for c, d, g in rows:
        print(
            f"{c:>4} | {d['rps']:>10.0f} | {g['rps']:>8.0f} | {g['rps'] / d['rps']:>8.0%} | {d['p50']:>8.2f}ms | "
            f"{g['p50']:>6.2f}ms | {g['p50'] - d['p50']:>7.2f}ms | {d['p99']:>8.2f}ms | {g['p99']:>6.2f}ms"
        )
    print(f"time to first chunk (stream, c=1, median of {args.rounds} x 200): direct {t_direct:.2f} ms, gateway {t_via:.2f} ms, "
          f"added {t_via - t_direct:.2f} ms")  # fmt: skip
    print(f"gateway RSS after load: {rss:.0f} MB (peak {max(hwm, peak):.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
