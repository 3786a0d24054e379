"""Upstream HTTP clients side by side: a bare aiohttp proxy (on uvloop) in front of the fake upstream, per client.

Each candidate client (aiohttp.ClientSession, pyreqwest, httpx.AsyncClient) runs in its own bare proxy process: one
route, POST /v1/chat/completions, that reads the body, forwards it over pooled keep-alive connections (connect
timeout 5 s, read timeout 120 s) and returns the answer: non-streamed read whole, streamed (``"stream": true``)
written to a ``web.StreamResponse`` chunk by chunk as it arrives. A "direct" row drives the fake upstream itself.
wrk (Debian package ``wrk``) measures throughput at c=32 and p50 latency at c=1; all targets run interleaved, in a
rotating order, every round, because this box's speed drifts by up to 2x over minutes. Prints a markdown table.

    python bench/upstream_clients.py [--rounds 2] [--duration 5] [--latency-duration 4] [--candidates aiohttp,...]

The fake upstream writes each stream in one piece by default (as in ``bench/gateway.py``); ``--chunk-delay S``
makes it write every SSE event separately, S seconds apart, to exercise chunk-by-chunk pass-through.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
from _load import WrkError, free_port, wait_http, write_lua, wrk
from aiohttp import web

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
    "max_tokens": 16,
}
MODES: dict[str, dict[str, Any]] = {"json": BODY, "stream": {**BODY, "stream": True}}
CANDIDATES = ("aiohttp", "pyreqwest", "httpx")
PATH = "/v1/chat/completions"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 120.0


# --------------------------------------------------------------------------------------------------------------------
# The bare proxies (run in their own process: ``upstream_clients.py --serve CANDIDATE --port P --upstream URL``)


class Forwarder:
    """One candidate client: forwards the request body to the upstream and relays the answer."""

    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + PATH

    async def start(self) -> None:
        """Create the client (inside the running loop)."""

    async def close(self) -> None:
        """Close the client."""

    async def whole(self, raw: bytes, headers: dict[str, str]) -> web.Response:
        raise NotImplementedError

    async def stream(self, request: web.Request, raw: bytes, headers: dict[str, str]) -> web.StreamResponse:
        raise NotImplementedError

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        auth = request.headers.get("Authorization")
        if auth is not None:
            headers["Authorization"] = auth
        try:
            streamed = orjson.loads(raw).get("stream") is True
        except (orjson.JSONDecodeError, AttributeError):
            return web.Response(status=400, text="body is not a JSON object")
        if streamed:
            return await self.stream(request, raw, headers)
        return await self.whole(raw, headers)


async def _relay_start(request: web.Request, status: int, content_type: str | None) -> web.StreamResponse:
    out = web.StreamResponse(status=status, headers={"Content-Type": content_type or "text/event-stream"})
    await out.prepare(request)  # no Content-Length: chunked transfer encoding, each write goes out as it comes
    return out


class AiohttpForwarder(Forwarder):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.session: Any = None  # aiohttp.ClientSession, created in start() (it wants a running loop)

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=75.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def whole(self, raw: bytes, headers: dict[str, str]) -> web.Response:
        async with self.session.post(self.url, data=raw, headers=headers) as r:
            body = await r.read()
            return web.Response(status=r.status, body=body, headers={"Content-Type": r.headers.get("Content-Type", "")})

    async def stream(self, request: web.Request, raw: bytes, headers: dict[str, str]) -> web.StreamResponse:
        async with self.session.post(self.url, data=raw, headers=headers) as r:
            out = await _relay_start(request, r.status, r.headers.get("Content-Type"))
            async for chunk in r.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out


class PyreqwestForwarder(Forwarder):
    """pyreqwest as the gateway uses it: tokenfuse's own `UpstreamClient` (its builder settings, its streaming)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.base = upstream.rstrip("/")
        self.client: Any = None

    async def start(self) -> None:
        from tokenfuse.config import Upstream
        from tokenfuse.gateway.upstream import UpstreamClient

        up = Upstream(name="bench", base_url=self.base, provider="openai", models=["*"],
                      timeout=READ_TIMEOUT, connect_timeout=CONNECT_TIMEOUT)  # fmt: skip
        self.client = UpstreamClient(up, {})

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def whole(self, raw: bytes, headers: dict[str, str]) -> web.Response:
        r = await self.client.send(PATH, list(headers.items()), raw, stream=False)
        try:
            body = await r.read()
        finally:
            await r.release()
        return web.Response(status=r.status, body=body, headers={"Content-Type": r.header("content-type")})

    async def stream(self, request: web.Request, raw: bytes, headers: dict[str, str]) -> web.StreamResponse:
        r = await self.client.send(PATH, list(headers.items()), raw, stream=True)
        try:
            out = await _relay_start(request, r.status, r.header("content-type") or None)
            async for chunk in r.iter_chunks():
                await out.write(chunk)
            await out.write_eof()
        finally:
            await r.release()
        return out


class HttpxForwarder(Forwarder):
    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        import httpx

        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000, keepalive_expiry=75.0),
            follow_redirects=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def whole(self, raw: bytes, headers: dict[str, str]) -> web.Response:
        assert self.client is not None
        r = await self.client.post(self.url, content=raw, headers=headers)
        return web.Response(
            status=r.status_code, body=r.content, headers={"Content-Type": r.headers.get("content-type", "")}
        )

    async def stream(self, request: web.Request, raw: bytes, headers: dict[str, str]) -> web.StreamResponse:
        assert self.client is not None
        req = self.client.build_request("POST", self.url, content=raw, headers=headers)
        r = await self.client.send(req, stream=True)
        try:
            out = await _relay_start(request, r.status_code, r.headers.get("content-type"))
            async for chunk in r.aiter_raw():
                await out.write(chunk)
            await out.write_eof()
            return out
        finally:
            await r.aclose()


FORWARDERS: dict[str, Callable[[str], Forwarder]] = {
    "aiohttp": AiohttpForwarder,
    "pyreqwest": PyreqwestForwarder,
    "httpx": HttpxForwarder,
}


def serve_proxy(candidate: str, port: int, upstream: str) -> None:
    import uvloop

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        fwd = FORWARDERS[candidate](upstream)
        await fwd.start()
        app = web.Application()
        app.router.add_post(PATH, fwd.handle)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await fwd.close()

    uvloop.run(main())


def serve_upstream(port: int, chunk_delay: float) -> None:
    """The fake upstream with a chunk delay (``tokenfuse fake-upstream`` has no such flag)."""
    from tokenfuse.testing import FakeUpstream

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with FakeUpstream(port=port, chunk_delay=chunk_delay, record=False):
            await stop.wait()

    asyncio.run(main())


# --------------------------------------------------------------------------------------------------------------------
# The driver (free_port, wait_http, _ms and the wrk parsing follow bench/gateway.py)


def _post(url: str, body: dict[str, Any]) -> tuple[int, str, str | None, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.headers.get("Transfer-Encoding"), r.read()


def self_check(url: str, direct: str) -> None:
    """The proxy answers like the upstream: same JSON shape, same SSE events, the stream chunked (not buffered)."""
    status, ctype, _, body = _post(url, MODES["json"])
    _, _, _, ref = _post(direct, MODES["json"])
    if status != 200 or "json" not in ctype or orjson.loads(body).keys() != orjson.loads(ref).keys():
        raise RuntimeError(f"non-streamed answer differs from the upstream's: {status} {ctype} {body[:200]!r}")
    status, ctype, te, body = _post(url, MODES["stream"])
    _, _, _, ref = _post(direct, MODES["stream"])
    if status != 200 or not ctype.startswith("text/event-stream") or (te or "").lower() != "chunked":
        raise RuntimeError(f"streamed answer not relayed as a chunked SSE stream: {status} {ctype} te={te}")
    if body.count(b"data: ") != ref.count(b"data: ") or not body.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"streamed answer differs from the upstream's: {body[:200]!r}...{body[-80:]!r}")


def versions() -> str:
    libs = ", ".join(
        f"{p} {importlib.metadata.version(p)}"
        for p in ("aiohttp", "pyreqwest", "httpx", "httpcore", "uvloop", "orjson")
    )
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n", 1)[0].split(" [")[0]
    return f"Python {platform.python_version()}, {libs}, {wrk_v}, {os.cpu_count()} CPUs"


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the processes this script started (by their Popen handle, i.e. PID); kill any that linger."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (medians over rounds)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run (c=32)")
    ap.add_argument("--latency-duration", type=float, default=4.0, help="seconds per latency run (c=1)")
    ap.add_argument(
        "--candidates", default=",".join(CANDIDATES), help=f"comma-separated subset of {','.join(CANDIDATES)}"
    )
    ap.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between the fake upstream's SSE events")
    ap.add_argument("--serve", choices=CANDIDATES, help=argparse.SUPPRESS)
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_proxy(args.serve, args.port, args.upstream)
        return 0
    if args.serve_upstream:
        serve_upstream(args.port, args.chunk_delay)
        return 0

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = set(candidates) - set(CANDIDATES)
    if unknown or args.rounds < 1:
        ap.error(f"unknown candidates {sorted(unknown)}" if unknown else "--rounds must be at least 1")
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="tokenfuse-upstream-clients-"))
    luas = {mode: write_lua(tmp / f"{mode}.lua", body) for mode, body in MODES.items()}
    procs: list[subprocess.Popen[bytes]] = []
    logs: dict[str, IO[bytes]] = {}
    notes: list[str] = []
    started = time.monotonic()
    up_port = free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    targets: dict[str, str] = {"direct": upstream + PATH}
    # results[target][mode][conc] = one dict per round
    results: dict[str, dict[str, dict[int, list[dict[str, float]]]]] = {}
    rounds_done = 0
    try:
        if args.chunk_delay > 0:
            up_cmd = [
                sys.executable,
                __file__,
                "--serve-upstream",
                "--port",
                str(up_port),
                "--chunk-delay",
                str(args.chunk_delay),
            ]
        else:  # as bench/gateway.py starts it
            up_cmd = [sys.executable, "-m", "tokenfuse.cli", "fake-upstream", "--port", str(up_port)]
        upstream_proc = subprocess.Popen(up_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(upstream_proc)
        wait_http(f"{upstream}/v1/models", proc=upstream_proc)

        proxies: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
        for name in candidates:
            port = free_port()
            logs[name] = (tmp / f"{name}.log").open("w+b")
            cmd = [sys.executable, __file__, "--serve", name, "--port", str(port), "--upstream", upstream]
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[name])
            procs.append(p)
            proxies[name] = (p, f"http://127.0.0.1:{port}")
        for name, (p, base) in proxies.items():
            try:
                wait_http(f"{base}/healthz", proc=p)
                self_check(base + PATH, targets["direct"])
            except Exception as e:
                logs[name].flush()
                tail = Path(logs[name].name).read_text(errors="replace").strip().splitlines()[-3:]
                notes.append(
                    f"{name}: failed to start or self-check: {e}" + (f" (stderr: {' | '.join(tail)})" if tail else "")
                )
                continue
            targets[name] = base + PATH

        print(f"targets: {', '.join(targets)}; warming up", file=sys.stderr, flush=True)
        failed: set[str] = set()

        def run(target: str, mode: str, conc: int, duration: float) -> dict[str, float] | None:
            try:
                result = wrk(targets[target], luas[mode], conc, duration)
                if result["socket_errors"]:
                    raise WrkError(f"wrk saw {result['socket_errors']:.0f} socket errors from {targets[target]}")
                return result
            except (WrkError, subprocess.TimeoutExpired) as e:
                notes.append(f"{target} {mode} c={conc}: {e}")
                failed.add(target)
                return None

        for target in list(targets):
            for mode in MODES:
                run(target, mode, 32, 1)
        order = [t for t in targets if t not in failed]
        for r in range(args.rounds):
            # Rotate the order every round, so no target always runs right after the same neighbour.
            rot = order[r % len(order) :] + order[: r % len(order)]
            for mode in MODES:
                for conc, duration in ((32, args.duration), (1, args.latency_duration)):
                    for target in rot:
                        if target in failed:
                            continue
                        res = run(target, mode, conc, duration)
                        if res is not None:
                            results.setdefault(target, {}).setdefault(mode, {}).setdefault(conc, []).append(res)
            rounds_done += 1
            print(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        for name, (p, _) in proxies.items():
            if p.poll() is not None:
                notes.append(f"{name}: proxy process exited with code {p.returncode} during the run")
    finally:
        stop_all(procs)
        for f in logs.values():
            f.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n## upstream clients as a bare proxy (aiohttp server on uvloop), {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(versions())
    stream_note = (
        f"SSE events {args.chunk_delay:g} s apart" if args.chunk_delay > 0 else "each stream written in one piece"
    )
    print(f"fake upstream: tokenfuse.testing, {stream_note}; 16-token chat completions; wrk -t1, -c32 {args.duration:g} s "
          f"(req/s) and -c1 {args.latency_duration:g} s (p50); medians of {rounds_done} interleaved rounds; ratio and "
          f"added p50 paired per round against direct\n")  # fmt: skip
    print("| candidate | mode | req/s c=32 | ratio to direct | p50 c=1 | added p50 vs direct |")
    print("|---|---|--:|--:|--:|--:|")
    direct = results.get("direct", {})
    for target in ["direct", *candidates]:
        for mode in MODES:
            runs = results.get(target, {}).get(mode, {})
            tp, lat = runs.get(32, []), runs.get(1, [])
            if not tp and not lat:
                print(f"| {target} | {mode} | failed | | | |")
                continue
            d_tp, d_lat = direct.get(mode, {}).get(32, []), direct.get(mode, {}).get(1, [])
            rps = f"{statistics.median(x['rps'] for x in tp):,.0f}" if tp else "-"
            p50 = f"{statistics.median(x['p50'] for x in lat):.3f} ms" if lat else "-"
            if target == "direct":
                ratio, added = "1.00", "-"
            else:
                n, m = min(len(tp), len(d_tp)), min(len(lat), len(d_lat))
                ratio = f"{statistics.median(tp[i]['rps'] / d_tp[i]['rps'] for i in range(n)):.2f}" if n else "-"
                added = f"{statistics.median(lat[i]['p50'] - d_lat[i]['p50'] for i in range(m)):+.3f} ms" if m else "-"
            print(f"| {target} | {mode} | {rps} | {ratio} | {p50} | {added} |")
    print("\nper-round req/s at c=32: " + "; ".join(
        f"{t} {m}: " + "/".join(f"{x['rps']:.0f}" for x in results.get(t, {}).get(m, {}).get(32, []))
        for t in targets for m in MODES
    ))  # fmt: skip
    for note in notes:
        print(f"note: {note}")
    print(f"total time {time.monotonic() - started:.0f} s")
    return 1 if notes else 0


if __name__ == "__main__":
    raise SystemExit(main())
