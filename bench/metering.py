"""Metering cost: time `MeteredTransport` adds per call (non-streamed) and per streamed chunk, and tiktoken throughput.

Both sides of each pair use the same in-memory httpx transport with a recorded-shape OpenAI response, so the
difference is tokenfuse's own work (request inspection, usage extraction, pricing, counters). Three non-streamed
shapes: the response already in memory (httpx.MockTransport's usual), the body streamed the way httpx's network
transport hands it over with the headers api.openai.com sends, and that body gzip-encoded (which tokenfuse must
decode a second time: httpx decodes for the app, tokenfuse for itself). Prints a table.

    python bench/metering.py [--calls 5000] [--chunks 2000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from collections.abc import Callable, Iterator

import httpx
from prometheus_client import CollectorRegistry

import tokenfuse
from tokenfuse.config import parse_config
from tokenfuse.exporter.meter import Meter
from tokenfuse.metering.estimate import count_tokens

REQUEST = {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is the capital of France?"}]}
RESPONSE = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 14,
            "completion_tokens": 30,
            "total_tokens": 44,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        },
    }
).encode()
CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18",'
    b'"service_tier":"default","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" word"},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
)
USAGE_CHUNK = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18",'
    b'"choices":[],"usage":{"prompt_tokens":78,"completion_tokens":9,"total_tokens":87}}\n\ndata: [DONE]\n\n'
)


# The headers of a non-streamed chat completion from api.openai.com (values made up, names and count as sent).
NETWORK_HEADERS = [
    ("date", "Sat, 28 Nov 2026 05:00:00 GMT"),
    ("content-type", "application/json"),
    ("transfer-encoding", "chunked"),
    ("connection", "keep-alive"),
    ("access-control-expose-headers", "X-Request-ID"),
    ("openai-organization", "org-abc"),
    ("openai-processing-ms", "412"),
    ("openai-project", "proj_abc"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999985"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("x-request-id", "req_0123456789abcdef"),
    ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
    ("cf-cache-status", "DYNAMIC"),
    ("set-cookie", "__cf_bm=abc; path=/; HttpOnly; Secure"),
    ("x-content-type-options", "nosniff"),
    ("server", "cloudflare"),
    ("cf-ray", "8e0123456789abcd-FRA"),
    ("alt-svc", 'h3=":443"; ma=86400'),
]


class _Body(httpx.SyncByteStream):
    """A body handed over as httpx's network transport does: a stream the client reads, then closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data

    def close(self) -> None:
        pass


class _Chunks(httpx.SyncByteStream):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.n):
            yield CHUNK
        yield USAGE_CHUNK


def _best(fn: Callable[[], None], n: int, rounds: int = 7) -> float:
    """Best-of-rounds mean seconds per call (robust to a busy machine)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def _paired(a: Callable[[], None], b: Callable[[], None], n: int, rounds: int = 15) -> tuple[float, float, float]:
    """Rounds of ``a`` and ``b`` interleaved (a b, b a, a b, …), so a slow spell of this VM hits both alike.

    Returns:
        (best mean of a, best mean of b, median of the per-round differences b - a), in seconds per call.
    """
    ta: list[float] = []
    tb: list[float] = []
    for i in range(rounds):
        if i % 2:
            tb.append(_best(b, n, rounds=1))
            ta.append(_best(a, n, rounds=1))
        else:
            ta.append(_best(a, n, rounds=1))
            tb.append(_best(b, n, rounds=1))
    return min(ta), min(tb), statistics.median(y - x for x, y in zip(ta, tb, strict=True))


def _poster(client: httpx.Client, url: str, body: bytes) -> Callable[[], None]:
    def post() -> None:
        client.post(url, content=body).read()

    return post


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--chunks", type=int, default=2000)
    args = ap.parse_args()
    meter = Meter(parse_config({"departments": {"marketing": {}}}), CollectorRegistry())

    def json_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=RESPONSE, headers={"content-type": "application/json"})

    def network_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Body(RESPONSE), headers=NETWORK_HEADERS)

    gzipped = gzip.compress(RESPONSE)

    def gzip_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Body(gzipped), headers=[*NETWORK_HEADERS, ("content-encoding", "gzip")])

    def sse_handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_Chunks(args.chunks), headers={"content-type": "text/event-stream"})

    url = "https://api.openai.com/v1/chat/completions"
    body = json.dumps(REQUEST).encode()
    non_streamed: list[tuple[str, float, float, float]] = []
    for label, handler in (
        ("in-memory response", json_handler),
        ("network-shaped body, 23 headers", network_handler),
        ("network-shaped body, gzip", gzip_handler),
    ):
        plain = httpx.Client(transport=httpx.MockTransport(handler))
        metered = httpx.Client(
            transport=tokenfuse.MeteredTransport(httpx.MockTransport(handler), meter=meter, department="marketing")
        )
        non_streamed.append(
            (
                label,
                *_paired(_poster(plain, url, body), _poster(metered, url, body), args.calls // 5),
            )
        )

    def stream(client: httpx.Client) -> None:
        with client.stream("POST", url, content=body) as r:
            for _ in r.iter_raw():
                pass

    splain = httpx.Client(transport=httpx.MockTransport(sse_handler))
    smetered = httpx.Client(transport=tokenfuse.MeteredTransport(httpx.MockTransport(sse_handler), meter=meter,
                                                                 department="marketing"))  # fmt: skip
    _, _, s_added = _paired(lambda: stream(splain), lambda: stream(smetered), 3)
    per_chunk = s_added / (args.chunks + 1)

    one_line = "What is the capital of France? Answer in one word, please."
    long_text = ("The quick brown fox jumps over the lazy dog. " * 2000)[:65536]
    count_tokens(one_line, "gpt-4o")
    t_short = _best(lambda: count_tokens(one_line, "gpt-4o") and None, 2000)
    t_long = _best(lambda: count_tokens(long_text, "gpt-4o") and None, 5, rounds=3)
    w = 58
    print(f"\nmetering benchmark, {time.strftime('%Y-%m-%d')}: 15 interleaved rounds per pair, median difference")
    print(f"{'what':<{w}} | {'plain':>10} | {'metered':>10} | {'added':>10} | target")
    print(f"{'-' * w}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 10}-+-------")
    for i, (label, t_plain, t_metered, t_added) in enumerate(non_streamed):
        target = "≤ 50 µs" if i == 0 else ""
        print(
            f"{'non-streamed call, ' + label:<{w}} | {t_plain * 1e6:>7.1f} µs | {t_metered * 1e6:>7.1f} µs "
            f"| {t_added * 1e6:>7.1f} µs | {target}"
        )
    print(f"{'streamed chunk (' + str(args.chunks) + '-chunk stream), added per chunk':<{w}} | {'':>10} | {'':>10} "
          f"| {per_chunk * 1e6:>7.2f} µs | ≤ 5 µs")  # fmt: skip
    print(f"{'tiktoken estimate, one-line prompt':<{w}} | {'':>10} | {'':>10} | {t_short * 1e6:>7.1f} µs |")
    print(
        f"{'tiktoken estimate, 64 KiB text':<{w}} | {'':>10} | {'':>10} | {len(long_text) / t_long / 1e6:>5.2f} MB/s |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
