"""`tokenfuse demo`: the fake upstream, a gateway on the bundled demo config, and traffic from three departments.

It prints a live table (department, requests, tokens, cost, budget used, fuse) until ``--duration`` or Ctrl-C.
Nothing to configure: keys, upstream URLs and the state file are made at start and removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import tempfile
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import yaml
from prometheus_client import CollectorRegistry

from tokenfuse.config import Config, parse_config
from tokenfuse.exporter import metrics as m

__all__ = ["DEMO_KEYS", "demo_config", "run_demo", "snapshot"]

DEMO_KEYS = {
    "marketing": "tf-demo-marketing",
    "engineering": "tf-demo-engineering",
    "support": "tf-demo-support",
}

# What each department's synthetic users send: (route, model, prompt tokens, completion tokens, stream share).
_TRAFFIC: dict[str, list[tuple[str, str, int, int, float]]] = {
    "marketing": [
        ("/v1/chat/completions", "gpt-4.1", 1800, 400, 0.5),
        ("/v1/messages", "claude-sonnet-4-5", 1500, 300, 0.5),
    ],
    "engineering": [
        ("/v1/chat/completions", "gpt-4o-mini", 2500, 600, 0.7),
        ("/v1/responses", "gpt-4.1", 1200, 300, 0.3),
        ("/v1/embeddings", "text-embedding-3-small", 800, 0, 0.0),
    ],
    "support": [
        ("/v1/chat/completions", "deepseek-chat", 600, 150, 0.3),
        ("/v1/chat/completions", "gpt-4o-mini", 400, 120, 0.5),
    ],
}
_PROJECTS = {"marketing": ["campaign-q4", "seo"], "engineering": ["code-review", "search"], "support": ["helpdesk"]}


def demo_config(upstream_url: str, state_dir: Path, port: int = 0) -> Config:
    """The bundled demo config with the fake upstream's URL and a state file in ``state_dir``."""
    text = resources.files("tokenfuse").joinpath("demo.yaml").read_text(encoding="utf-8")
    data: dict[str, Any] = yaml.safe_load(text)
    for u in data["upstreams"]:
        u["base_url"] = upstream_url + "/v1"
    data["policy"]["state_path"] = str(state_dir / "tokenfuse-demo.db")
    data["gateway"]["listen"] = f"127.0.0.1:{port}"
    return parse_config(data)


def _prompt(tokens: int) -> str:
    # The fake upstream bills characters // 4; single letters make tiktoken's estimate (what admission reserves)
    # come out above that, as a real prompt's estimate is close to its real count.
    return ("a b c d e f g h " * (tokens // 4 + 1))[: tokens * 4]


def _body(route: str, model: str, prompt: int, completion: int, stream: bool) -> dict[str, Any]:
    text = _prompt(prompt)
    if route == "/v1/embeddings":
        return {"model": model, "input": [text]}
    if route == "/v1/responses":
        return {"model": model, "input": text, "max_output_tokens": completion, "stream": stream}
    return {
        "model": model,
        "max_tokens": completion,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
    }


async def _department_traffic(
    session: aiohttp.ClientSession, base: str, dept: str, stop: asyncio.Event, rng: random.Random
) -> None:
    key = DEMO_KEYS[dept]
    while not stop.is_set():
        route, model, prompt, completion, stream_share = rng.choice(_TRAFFIC[dept])
        stream = rng.random() < stream_share
        prompt = prompt + rng.randint(0, prompt // 4)
        headers = {
            "Authorization": f"Bearer {key}",
            "x-api-key": key,
            "X-Project": rng.choice(_PROJECTS[dept]),
            "X-Environment": "production",
            "x-fake-usage": json.dumps({"completion_tokens": completion}),
        }
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.post(
                base + route, json=_body(route, model, prompt, completion, stream), headers=headers
            ) as r:
                await r.read()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.uniform(0.15, 0.5))


def snapshot(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """Per-department totals read back from the gateway's metrics (what the table shows)."""
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for family in registry.collect():
        for s in family.samples:
            dept = s.labels.get("department")
            if dept is None:
                continue
            row = rows[dept]
            if s.name == m.REQUESTS_TOTAL:
                row["requests"] += s.value
                if s.labels.get("outcome") == "blocked":
                    row["blocked"] += s.value
            elif s.name == m.TOKENS_TOTAL:
                row["tokens"] += s.value
            elif s.name == m.COST_USD_TOTAL:
                row["cost"] += s.value
            elif s.name == m.BUDGET_LIMIT_USD:
                row["budget"] = s.value
            elif s.name == m.BUDGET_SPENT_USD:
                row["spent"] = s.value
            elif s.name == m.BREAKER_STATE and s.value == 1:
                row["state:" + s.labels.get("state", "")] = 1
    return rows


def _table(rows: dict[str, dict[str, float]]) -> str:
    head = (
        f"{'department':<12} {'requests':>9} {'blocked':>8} {'tokens':>11} {'cost USD':>10} "
        f"{'budget used':>12} {'fuse':>10}"
    )
    lines = [head, "-" * len(head)]
    for dept in sorted(rows):
        r = rows[dept]
        budget = r.get("budget", 0.0)
        used = f"{100 * r.get('spent', r.get('cost', 0.0)) / budget:.1f}%" if budget else "-"
        state = next((k.split(":", 1)[1] for k in r if k.startswith("state:")), "-")
        lines.append(
            f"{dept:<12} {int(r.get('requests', 0)):>9} {int(r.get('blocked', 0)):>8} {int(r.get('tokens', 0)):>11} "
            f"{r.get('cost', 0.0):>10.4f} {used:>12} {state:>10}"
        )
    return "\n".join(lines)


async def _run(duration: float | None, port: int, out: TextIO) -> int:
    from tokenfuse.gateway.server import GatewayServer
    from tokenfuse.testing.fake_upstream import FakeUpstream

    tty = out.isatty()
    with tempfile.TemporaryDirectory(prefix="tokenfuse-demo-") as tmp:
        async with FakeUpstream(latency=0.05) as upstream:
            config = demo_config(upstream.url, Path(tmp), port)
            registry = CollectorRegistry()
            async with GatewayServer(config, registry=registry) as gw:
                print(
                    f"tokenfuse demo: gateway {gw.url}  metrics {gw.url}/metrics  fake upstream {upstream.url}",
                    file=out,
                )
                print("keys: " + ", ".join(f"{d}={k}" for d, k in DEMO_KEYS.items()), file=out)
                print("Ctrl-C stops." if duration is None else f"running for {duration:g} s", file=out, flush=True)
                stop = asyncio.Event()
                loop = asyncio.get_running_loop()
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(signal.SIGINT, stop.set)
                    loop.add_signal_handler(signal.SIGTERM, stop.set)
                rng = random.Random(7)
                async with aiohttp.ClientSession() as session:
                    workers = [
                        asyncio.create_task(
                            _department_traffic(session, gw.url, dept, stop, random.Random(rng.random()))
                        )
                        for dept in DEMO_KEYS
                        for _ in range(2)
                    ]
                    t_end = None if duration is None else loop.time() + duration
                    last_print = 0.0
                    while not stop.is_set():
                        now = loop.time()
                        if t_end is not None and now >= t_end:
                            break
                        if tty or now - last_print >= 5.0:
                            table = _table(snapshot(registry))
                            print(
                                ("\x1b[H\x1b[2J" if tty else "") + table + ("\n" if not tty else ""),
                                file=out,
                                flush=True,
                            )
                            last_print = now
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=1.0)
                    stop.set()
                    await asyncio.gather(*workers, return_exceptions=True)
                print("\nfinal:\n" + _table(snapshot(registry)), file=out, flush=True)
    return 0


def run_demo(duration: float | None = None, port: int = 0, out: TextIO | None = None) -> int:
    """Run the demo until ``duration`` seconds have passed or Ctrl-C.

    Args:
        duration: seconds to run (None: until interrupted).
        port: gateway port (0: a free one).
        out: where the table goes (default: stdout).
    """
    try:
        return asyncio.run(_run(duration, port, out if out is not None else sys.stdout))
    except KeyboardInterrupt:
        return 0
