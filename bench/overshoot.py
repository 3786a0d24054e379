"""Overshoot: how many tokens a department gets beyond its hourly limit under concurrency, and what the engine costs.

1. ``source: local`` — 200 concurrent requests at a department with room for 20 worst cases, from threads (the
   instrumented client) and from asyncio tasks (the gateway), against a fuse-only baseline without reservations.
2. ``source: prometheus`` — a virtual-time simulation of N replicas whose engines see each other only through a
   Prometheus that scrapes every S seconds (and is queried every ``policy.interval``): overshoot by S and N.
3. Costs: the ledger's committed insert per record (SQLite WAL, synchronous=NORMAL) and admit + settle.

    python bench/overshoot.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from tokenfuse.config import Config, parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.metering.types import Usage
from tokenfuse.policies import Ledger, PolicyEngine, Readings, month_of

LIMIT = 20_000
WORST = 1_000  # every request: 500 prompt tokens + max_tokens 500
MODEL = "m-1"


def config(state_path: str, limit: int = LIMIT, **policy: Any) -> Config:
    return parse_config(
        {
            "pricing": {"overrides": {MODEL: {"input": 1.0, "output": 1.0}}},
            "departments": {"eng": {"hourly_token_limit": limit}},
            "policy": {"state_path": state_path, **policy},
        }
    )


class Replica:
    """One process: a meter and a policy engine (with its own ledger)."""

    def __init__(self, cfg: Config, source: Any = None, clock: Any = time.time) -> None:
        self.meter = Meter(cfg, CollectorRegistry())
        self.engine = PolicyEngine(cfg, self.meter, source=source, clock=clock)
        self.engine.open()
        self.labels = self.meter.labels(department="eng", project="bench", provider="openai", model=MODEL)
        self.used = 0

    def admit(self, worst: int = WORST, now: float | None = None) -> Any:
        return self.engine.admit(
            "eng",
            input_tokens=worst // 2,
            max_output_tokens=worst - worst // 2,
            provider="openai",
            model=MODEL,
            now=now,
        )

    def finish(self, adm: Any, tokens: int, now: float | None = None) -> None:
        rec = self.meter.record(
            self.labels, usage=Usage(input_tokens=tokens // 2, output_tokens=tokens - tokens // 2), outcome="success",
            now=now,
        )  # fmt: skip
        self.used += tokens
        self.engine.settle(adm.reservation, rec)


# -- 1. local source ----------------------------------------------------------------------------------------


def local_threads(tmp: Path, n: int, fuse_only: bool) -> tuple[int, int]:
    r = Replica(config(str(tmp / f"threads-{fuse_only}.db")))
    barrier = threading.Barrier(n)
    admitted = [0]
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        # Fuse-only: what a breaker without reservations does (it only looks at usage already recorded).
        adm = r.admit(0 if fuse_only else WORST)
        if not adm.admitted:
            return
        time.sleep(0.005 + 0.02 * random.random())  # the upstream call
        r.finish(adm, WORST)
        with lock:
            admitted[0] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r.engine.close()
    return admitted[0], r.used


async def local_asyncio(tmp: Path, n: int, fuse_only: bool) -> tuple[int, int]:
    r = Replica(config(str(tmp / f"async-{fuse_only}.db")))

    async def request() -> bool:
        adm = r.admit(0 if fuse_only else WORST)
        if not adm.admitted:
            return False
        await asyncio.sleep(0.005 + 0.02 * random.random())
        r.finish(adm, WORST)
        return True

    ok = await asyncio.gather(*(request() for _ in range(n)))
    r.engine.close()
    return sum(ok), r.used


async def local_undercount(tmp: Path, n: int, margin: float | None) -> tuple[int, int]:
    """200 asyncio tasks through `MeteredCall` (what both front doors run) whose upstream bills 20% more prompt
    tokens than tiktoken estimates, each answer as long as max_tokens allows: ``margin`` None is the default
    ``policy.prompt_margin``, 0 reserves the bare estimate."""
    from tokenfuse.exporter.call import MeteredCall
    from tokenfuse.metering.estimate import estimate_prompt_tokens

    extra = {} if margin is None else {"prompt_margin": margin, "prompt_margin_tokens": 0}
    r = Replica(config(str(tmp / f"under-{margin}.db"), **extra))
    body = {"model": MODEL, "max_tokens": 500, "messages": [{"role": "user", "content": "tokens " * 400}]}
    billed_input = round(estimate_prompt_tokens("openai.chat", body, MODEL) * 1.2)

    async def request() -> bool:
        call = MeteredCall(r.meter, "openai.chat", r.labels, MODEL, body)
        adm = call.admit(r.engine)
        if adm is None or not adm.admitted:
            return False
        await asyncio.sleep(0.005 + 0.02 * random.random())
        call.on_head(200, b"application/json")
        call.on_body(b'{"usage": {"prompt_tokens": %d, "completion_tokens": 500}}' % billed_input)
        rec = call.finish()
        r.used += rec.tokens if rec is not None else 0
        return True

    ok = await asyncio.gather(*(request() for _ in range(n)))
    r.engine.close()
    return sum(ok), r.used


def part_local(tmp: Path) -> None:
    print(f"\n## source: local — 200 concurrent requests, worst case {WORST} tokens, room for {LIMIT // WORST}\n")
    print("| client | admission | admitted | tokens used | limit | tokens beyond the limit |")
    print("|---|---|---:|---:|---:|---:|")
    for name, fuse_only in (("reservations", False), ("fuse only (baseline)", True)):
        a, used = local_threads(tmp, 200, fuse_only)
        print(f"| 200 threads | {name} | {a} | {used} | {LIMIT} | {max(used - LIMIT, 0)} |")
        a, used = asyncio.run(local_asyncio(tmp, 200, fuse_only))
        print(f"| 200 asyncio tasks | {name} | {a} | {used} | {LIMIT} | {max(used - LIMIT, 0)} |")
    for name, margin in (("reservations, default policy.prompt_margin", None), ("reservations, prompt_margin 0", 0.0)):
        a, used = asyncio.run(local_undercount(tmp, 200, margin))
        print(f"| 200 asyncio tasks, upstream counts 20% more prompt tokens than tiktoken | {name} | {a} | {used} | "
              f"{LIMIT} | {max(used - LIMIT, 0)} |")  # fmt: skip


# -- 2. prometheus source, simulated -------------------------------------------------------------------------


class ScrapedPrometheus:
    """The sum over replicas of each one's token counter as of its last scrape (what increase() would report)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.scraped = [0] * len(replicas)

    def scrape(self) -> None:
        self.scraped = [r.used for r in self.replicas]

    def source(self) -> Any:
        prom = self

        class Source:
            name = "prometheus"

            async def fetch(self, now: float, departments: Sequence[str]) -> Readings:
                return Readings(at=now, period=month_of(now, _UTC).name, tokens={"eng": sum(prom.scraped)},
                                spent_usd={})  # fmt: skip

            async def aclose(self) -> None:
                return None

        return Source()


_UTC = parse_config({}).zone


async def simulate(replicas_n: int, scrape: float, interval: float, rate: float, latency: float, seed: int) -> int:
    """Virtual time: requests arrive at ``rate``/s spread over the replicas; returns tokens beyond the limit."""
    rng = random.Random(seed)
    t0 = 1_800_000_000.0
    clock = [t0]
    cfg = config(":memory:", source="prometheus", prometheus_url="http://sim.invalid", interval=interval,
                 max_staleness=3600)  # fmt: skip
    replicas: list[Replica] = []
    prom = ScrapedPrometheus(replicas)
    for _ in range(replicas_n):
        replicas.append(Replica(cfg, source=prom.source(), clock=lambda: clock[0]))
    events: list[tuple[float, int, str, Any]] = []
    seq = 0

    def push(t: float, kind: str, data: Any = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, data))

    horizon = t0 + 300.0
    t = t0
    while t < horizon:
        t += rng.expovariate(rate)
        push(t, "arrive", rng.randrange(replicas_n))
    k = 0
    while t0 + k * scrape < horizon:
        push(t0 + k * scrape + scrape * 0.5, "scrape")
        k += 1
    for i in range(replicas_n):
        phase = rng.random() * interval
        k = 0
        while t0 + phase + k * interval < horizon:
            push(t0 + phase + k * interval, "evaluate", i)
            k += 1
    for r in replicas:
        await r.engine.evaluate(t0)
    while events:
        now, _, kind, data = heapq.heappop(events)
        clock[0] = now
        if kind == "scrape":
            prom.scrape()
        elif kind == "evaluate":
            await replicas[data].engine.evaluate(now)
        elif kind == "arrive":
            adm = replicas[data].admit(now=now)
            if adm.admitted:
                push(now + latency, "finish", (data, adm))
        elif kind == "finish":
            i, adm = data
            replicas[i].finish(adm, WORST, now=now)
    for r in replicas:
        r.engine.close()
    return max(sum(r.used for r in replicas) - LIMIT, 0)


def part_prometheus(quick: bool) -> None:
    rate, latency, interval = 5.0, 2.0, 5.0
    seeds = range(3 if quick else 10)
    print(
        f"\n## source: prometheus (simulated) — {rate:g} req/s spread over the replicas, {WORST} tokens each, "
        f"{latency:g} s upstream latency, policy.interval {interval:g} s, limit {LIMIT}\n"
    )
    print("Tokens beyond the limit, mean (max) over", len(seeds), "runs:\n")
    scrapes = (1.0, 5.0, 15.0, 30.0, 60.0)
    print("| replicas | " + " | ".join(f"scrape {s:g} s" for s in scrapes) + " |")
    print("|---:|" + "---:|" * len(scrapes))
    for n in (1, 2, 4):
        cells = []
        for s in scrapes:
            runs = [asyncio.run(simulate(n, s, interval, rate, latency, seed)) for seed in seeds]
            cells.append(f"{statistics.mean(runs):.0f} ({max(runs)})")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print(
        "\nOne replica never overshoots (its own usage is exact and local). With N replicas each sees the others only"
        "\nthrough Prometheus, so the overshoot is about (N-1)/N x request rate x (scrape lag + policy.interval +"
        "\nupstream latency) x tokens per request, and at most (N-1) x the limit (each replica stops at its own view)."
    )


# -- 3. costs -----------------------------------------------------------------------------------------------


def part_costs(tmp: Path, quick: bool) -> None:
    n = 2_000 if quick else 10_000
    lg = Ledger(tmp / "cost.db", zone=_UTC, window_seconds=3600)
    lg.open(time.time())
    t = time.perf_counter()
    for i in range(n):
        lg.add(at=time.time(), department="eng", input_tokens=100 + i % 7, output_tokens=50, cost_usd=1e-4,
               project="p", environment="prod", provider="openai", model=MODEL)  # fmt: skip
    per_record = (time.perf_counter() - t) / n
    lg.close()

    r = Replica(config(str(tmp / "cycle.db"), limit=10**12))
    t = time.perf_counter()
    for _ in range(n):
        r.admit()
    per_admit = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        r.finish(r.admit(), WORST)
    per_cycle = (time.perf_counter() - t) / n
    r.engine.close()
    print(f"\n## costs on this machine ({n} iterations)\n")
    print("| what | µs |")
    print("|---|---:|")
    print(f"| ledger: one call inserted and committed (WAL, synchronous=NORMAL) | {per_record * 1e6:.1f} |")
    print(f"| engine.admit (reservation, local source) | {per_admit * 1e6:.1f} |")
    print(f"| admit + meter.record (ledger commit, fuse evaluation) + settle | {per_cycle * 1e6:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer simulation runs and iterations")
    args = ap.parse_args()
    random.seed(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        part_local(tmp)
        part_prometheus(args.quick)
        part_costs(tmp, args.quick)


if __name__ == "__main__":
    main()
