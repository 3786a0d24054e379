"""The gateway as a security boundary, against the real `tokenfuse serve` process and a raw-socket upstream.

Each test is one attack from issue 10: request smuggling through the target, 1xx interim responses, stray bytes on a
pooled connection, headers that must not cross, slow clients, bad input that must be a 4xx and counted.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import KEYS, fake_config
from tests.integration._procs import GatewayProcess, eventually
from tests.raw_upstream import RawRequest, RawUpstream, json_answer
from tests.sse import anthropic_events

pytestmark = pytest.mark.integration

ADMIN = "admin-secret"
CHAT = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"user":"%s"}'


def _raw_http(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as-is on a new connection (the request asks to close it) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # the gateway's own 100 Continue to an Expect: interim, skipped
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def _post(target: str, body: bytes, key: str = KEYS["marketing"], extra: str = "") -> bytes:
    return (
        f"POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1") + body


def _metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    import urllib.request

    with urllib.request.urlopen(gw.url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _gateway(raw: RawUpstream, tmp_path: Path, name: str = "gw", **sections: Any) -> GatewayProcess:
    cfg = fake_config(raw.url, tmp_path, **sections).model_dump(mode="json")
    return GatewayProcess(cfg, tmp_path, name, env={"TOKENFUSE_ADMIN_TOKEN": ADMIN}).start()


@pytest.fixture
def raw() -> Iterator[RawUpstream]:
    with RawUpstream() as up:
        yield up


@pytest.fixture
def gw(raw: RawUpstream, tmp_path: Path) -> Iterator[GatewayProcess]:
    g = _gateway(raw, tmp_path, gateway={"header_timeout": "1s", "body_timeout": "1s"})
    try:
        yield g
    finally:
        g.stop()


def test_smuggled_query_is_refused_before_the_upstream(raw: RawUpstream, gw: GatewayProcess) -> None:
    """A percent-encoded CR/LF request smuggled in the query gets 400 invalid_request_target; the upstream sees nothing."""
    smuggle = (
        "/v1/chat/completions?a%20HTTP/1.1%0d%0aHost:%20x%0d%0aContent-Length:%200%0d%0a%0d%0a"
        "GET%20/v1/files%20HTTP/1.1%0d%0aX-Ignore:%20z"
    )
    status, _, body = _raw_http(gw.port, _post(smuggle, CHAT % b"a"))
    assert status == 400, body
    assert json.loads(body)["error"]["code"] == "invalid_request_target"
    for q in ("?x=%0a", "?x=%7f", "?x=%00", "?x=a%20b"):
        status, _, body = _raw_http(gw.port, _post("/v1/chat/completions" + q, CHAT % b"a"))
        assert status == 400 and b"invalid_request_target" in body, (q, body)
    assert raw.received == [] and raw.requests == []
    assert _metric(gw, "tokenfuse_requests_total", outcome="client_error") >= 5


def test_benign_query_goes_upstream_raw(raw: RawUpstream, gw: GatewayProcess) -> None:
    """A harmless query (Azure's api-version) reaches the upstream byte for byte, still percent-encoded."""
    status, _, body = _raw_http(gw.port, _post("/v1/chat/completions?api-version=2024-10-21&x=%2Fy", CHAT % b"q"))
    assert status == 200, body
    assert [r.target for r in raw.requests] == ["/v1/chat/completions?api-version=2024-10-21&x=%2Fy"]


def test_expect_and_interim_responses(raw: RawUpstream, gw: GatewayProcess) -> None:
    """Expect: 100-continue is not forwarded; an upstream's 100 and 103 heads are skipped: each caller gets its own."""
    raw.answer = lambda req: json_answer(
        req, interim=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    )
    for i in range(20):
        who = f"caller-{i}".encode()
        status, _, body = _raw_http(
            gw.port, _post("/v1/chat/completions", CHAT % who, extra="Expect: 100-continue\r\n")
        )
        assert status == 200, body
        assert json.loads(body)["choices"][0]["message"]["content"] == f"answer for caller-{i}"
    assert len(raw.requests) == 20
    assert all(r.header("expect") is None for r in raw.requests)


def test_stray_bytes_never_reach_another_caller(raw: RawUpstream, gw: GatewayProcess) -> None:
    """An upstream sending more than its Content-Length: over 1,000 alternating calls of two departments, each caller
    gets its own answer, and the stray bytes (a whole forged response) are never read as an answer."""
    forged = json.dumps({"choices": [{"message": {"content": "answer for someone-else"}}]}).encode()
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(forged), forged)
    raw.answer = lambda req: json_answer(req, extra=stray)
    import http.client

    conns = {d: http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10) for d in ("marketing", "support")}
    wrong = 0
    for i in range(1000):
        dept = "marketing" if i % 2 == 0 else "support"
        c = conns[dept]
        who = f"{dept}-{i}"
        c.request("POST", "/v1/chat/completions", body=CHAT % who.encode(),
                  headers={"Authorization": f"Bearer {KEYS[dept]}", "Content-Type": "application/json"})  # fmt: skip
        r = c.getresponse()
        data = r.read()
        assert r.status == 200, data
        if json.loads(data)["choices"][0]["message"]["content"] != f"answer for {who}":
            wrong += 1
    for c in conns.values():
        c.close()
    assert wrong == 0
    assert len(raw.requests) == 1000


def test_stray_bytes_after_the_answer_never_reach_the_next_caller(raw: RawUpstream, gw: GatewayProcess) -> None:
    """Stray bytes that arrive after a complete answer, on the then idle pooled connection, are not the next caller's
    answer. (aiohttp's client 3.14 fails this: it hands them to the next request on that connection.)"""
    forged = json.dumps({"choices": [{"message": {"content": "answer for someone-else"}}]}).encode()
    stray = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(forged), forged)
    raw.answer = lambda req: [*json_answer(req), 0.02, stray]
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    for i in range(60):
        dept = "marketing" if i % 2 == 0 else "support"
        c.request("POST", "/v1/chat/completions", body=CHAT % f"late-{i}".encode(),
                  headers={"Authorization": f"Bearer {KEYS[dept]}", "Content-Type": "application/json"})  # fmt: skip
        r = c.getresponse()
        data = r.read()
        assert r.status == 200, data
        assert json.loads(data)["choices"][0]["message"]["content"] == f"answer for late-{i}"
        time.sleep(0.04)  # the stray bytes land while the connection idles in the pool
    c.close()
    assert len(raw.requests) == 60


def test_bad_framing_is_an_error_and_the_next_caller_is_unaffected(raw: RawUpstream, gw: GatewayProcess) -> None:
    """A body shorter than its Content-Length then EOF is a 502 for that caller only; the next call is clean."""
    calls = {"n": 0}

    def answer(req: RawRequest) -> list[bytes | float]:
        calls["n"] += 1
        if calls["n"] == 1:
            return [b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"partial":']
        return json_answer(req)

    raw.answer = answer

    def first() -> tuple[int, dict[str, str], bytes]:
        return _raw_http(gw.port, _post("/v1/chat/completions", CHAT % b"first"), timeout=10)

    t = threading.Thread(target=lambda: results.append(first()))
    results: list[tuple[int, dict[str, str], bytes]] = []
    t.start()
    eventually(lambda: raw.requests, 10, what="the first request upstream")
    time.sleep(0.3)
    # The upstream closes the connection under the partial body.
    for c in list(raw._conns):
        c.shutdown(socket.SHUT_RDWR)
    t.join(15)
    assert results and results[0][0] == 502, results
    # The upstream did take the prompt: the cut call bills the prompt estimate, flagged, as upstream_error.
    assert _metric(gw, "tokenfuse_tokens_total", department="marketing", token_type="input") > 0
    assert _metric(gw, "tokenfuse_estimated_requests_total", department="marketing") == 1
    assert _metric(gw, "tokenfuse_requests_total", department="marketing", outcome="upstream_error") == 1
    status, _, body = _raw_http(gw.port, _post("/v1/chat/completions", CHAT % b"second"))
    assert status == 200 and b"answer for second" in body


def test_headers_forwarded_only_from_the_allow_list(raw: RawUpstream, gw: GatewayProcess) -> None:
    """SDK headers on the allow-list pass; credentials, OpenAI-Organization/-Project, hop-by-hop and Connection-named
    headers do not; the upstream key replaces the client's."""
    extra = (
        "OpenAI-Organization: org-evil\r\nOpenAI-Project: proj-evil\r\nCookie: a=b\r\nX-Custom: drop-me\r\n"
        "User-Agent: OpenAI/Python 3.57\r\nX-Stainless-Lang: python\r\nConnection: close, x-stainless-lang\r\n"
        "X-Tokenfuse-Project: p1\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: Basic eA==\r\n"
    )
    status, _, body = _raw_http(gw.port, _post("/v1/chat/completions", CHAT % b"h", extra=extra))
    assert status == 200, body
    (req,) = raw.requests
    names = {k.lower() for k, _ in req.headers}
    assert req.header("authorization") == "Bearer sk-up"
    assert req.header("user-agent") == "OpenAI/Python 3.57"
    for absent in ("openai-organization", "openai-project", "cookie", "x-custom", "x-stainless-lang",
                   "x-tokenfuse-project", "te", "upgrade", "proxy-authorization", "expect"):  # fmt: skip
        assert absent not in names, absent
    assert KEYS["marketing"] not in req.raw_head.decode("latin-1")


def test_anthropic_headers_forwarded(raw: RawUpstream, gw: GatewayProcess) -> None:
    """anthropic-version and anthropic-beta reach an Anthropic upstream; the key goes as x-api-key."""
    msg = b'{"type":"message","model":"claude-sonnet-4-5","content":[],"usage":{"input_tokens":3,"output_tokens":4}}'
    raw.answer = lambda req: [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg)
    ]
    body = b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    extra = "anthropic-version: 2023-06-01\r\nanthropic-beta: prompt-caching-2024-07-31\r\n"
    status, _, out = _raw_http(gw.port, _post("/v1/messages", body, extra=extra))
    assert status == 200, out
    (req,) = raw.requests
    assert req.header("anthropic-version") == "2023-06-01"
    assert req.header("anthropic-beta") == "prompt-caching-2024-07-31"
    assert req.header("authorization") is None


def test_duplicate_credentials_and_deep_json(raw: RawUpstream, gw: GatewayProcess) -> None:
    """Two Authorization or x-api-key headers are 400; 5,000-level JSON is 400 in the route's style; all counted."""
    before = _metric(gw, "tokenfuse_requests_total", outcome="client_error")
    dup = _post("/v1/chat/completions", CHAT % b"d", extra=f"Authorization: Bearer {KEYS['support']}\r\n")
    status, _, body = _raw_http(gw.port, dup)
    assert status == 400 and json.loads(body)["error"]["code"] == "duplicate_credentials"
    dup = _post("/v1/messages", CHAT % b"d", extra="x-api-key: a\r\nx-api-key: b\r\n")
    status, _, body = _raw_http(gw.port, dup)
    assert status == 400 and json.loads(body)["type"] == "error", body
    deep = b'{"model":"gpt-4o","messages":' + b"[" * 5000 + b"]" * 5000 + b"}"
    status, _, body = _raw_http(gw.port, _post("/v1/chat/completions", deep))
    assert status == 400 and json.loads(body)["error"]["code"] == "invalid_json"
    status, _, body = _raw_http(gw.port, _post("/v1/messages", deep))
    assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error"
    assert raw.requests == []
    assert _metric(gw, "tokenfuse_requests_total", outcome="client_error") == before + 4


def test_admin_rejects_nan_and_infinity(raw: RawUpstream, gw: GatewayProcess) -> None:
    """ttl_seconds NaN / Infinity / 1e308 and deep JSON in an admin body are 400, never 500."""
    for body in (b'{"action":"open","ttl_seconds":NaN}', b'{"action":"open","ttl_seconds":Infinity}',
                 b'{"action":"open","ttl_seconds":1e308}', b"[" * 5000 + b"]" * 5000):  # fmt: skip
        status, _, out = _raw_http(gw.port, _post("/admin/fuses/marketing", body, key=ADMIN))
        assert status == 400, (body[:40], out)
    status, _, out = _raw_http(
        gw.port, _post("/admin/fuses/marketing", b'{"action":"open","ttl_seconds":60}', key=ADMIN)
    )
    assert status == 200, out


def test_malformed_requests_are_one_log_line(raw: RawUpstream, gw: GatewayProcess) -> None:
    """A request the parser refuses gets a JSON 400 and one log line, no traceback; counted as client_error."""
    before = _metric(gw, "tokenfuse_requests_total", outcome="client_error")
    for data in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
                 b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n"):  # fmt: skip
        status, _, body = _raw_http(gw.port, data)
        assert status in (400, 431), body
        assert json.loads(body)["error"]["code"] == "bad_http_request"
    log = gw.log.read_text()
    assert "Traceback" not in log
    assert log.count('"event": "bad_http_request"') == 3
    assert _metric(gw, "tokenfuse_requests_total", outcome="client_error") == before + 3


def test_slow_head_and_slow_body_are_cut(raw: RawUpstream, gw: GatewayProcess) -> None:
    """A head not complete within header_timeout is disconnected; a body slower than body_timeout gets 408."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the gateway
        assert time.monotonic() - t0 < 5
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(_post("/v1/chat/completions", b"x" * 100)[:-90])
        out = s.recv(65536)
        assert out.startswith(b"HTTP/1.1 408"), out
    assert raw.requests == []


ALPHABET = st.characters(min_codepoint=0, max_codepoint=0x7F)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    query=st.text(ALPHABET, max_size=40),
    encoded=st.booleans(),
    header=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
)
def test_upstream_never_sees_a_split_request(
    raw: RawUpstream, gw: GatewayProcess, query: str, encoded: bool, header: str
) -> None:
    """Whatever target and header values a client sends, the upstream receives at most one request per call, whose
    target has no CR, LF or space and whose header lines are exactly those forwarded."""
    raw.requests.clear()
    for conn in raw.received:
        conn.clear()
    q = urllib.parse.quote(query, safe="") if encoded else query
    data = _post("/v1/chat/completions?" + q, CHAT % b"p", extra=f"User-Agent: {header}\r\n").replace(b"\x00", b"")
    _raw_http(gw.port, data)
    assert len(raw.requests) <= 1
    for r in raw.requests:
        assert not any(c in r.target for c in "\r\n \t"), r.target
        assert r.method == "POST" and r.version == "HTTP/1.1"
        assert r.body.startswith(b'{"model":"gpt-4o"')
    wire = b"".join(bytes(c) for c in raw.received)
    assert wire.count(b"HTTP/1.1\r\n") == len(raw.requests)
    assert raw.garbage == []


def test_upstream_reached_through_the_configured_proxy(raw: RawUpstream, tmp_path: Path) -> None:
    """With upstreams[].proxy set, every upstream call goes through that forward proxy; billing is unchanged."""
    from tests.forward_proxy import ForwardProxy

    with ForwardProxy() as proxy:
        cfg = fake_config(raw.url, tmp_path).model_dump(mode="json")
        for u in cfg["upstreams"]:
            u["proxy"] = proxy.url
        g = GatewayProcess(cfg, tmp_path, "gw-proxy").start()
        try:
            for i in range(3):
                status, _, body = _raw_http(g.port, _post("/v1/chat/completions", CHAT % f"p{i}".encode()))
                assert status == 200 and f"answer for p{i}".encode() in body, body
            assert _metric(g, "tokenfuse_tokens_total", department="marketing", token_type="output") == 15
        finally:
            g.stop()
        assert len(proxy.seen) >= 1
        assert all(s == f"POST {raw.url}/v1/chat/completions" for s in proxy.seen), proxy.seen
        assert len(raw.requests) == 3


def test_upstream_proxy_from_the_environment(raw: RawUpstream, tmp_path: Path) -> None:
    """Without upstreams[].proxy, HTTP(S)_PROXY from the environment is used, and NO_PROXY exempts a host."""
    from tests.forward_proxy import ForwardProxy

    with ForwardProxy() as proxy:
        cfg = fake_config(raw.url, tmp_path).model_dump(mode="json")
        # NO_PROXY naming another host: through the proxy; naming the upstream's: direct.
        for name, no_proxy, via_proxy in (("gw-env", "example.invalid", 1), ("gw-noproxy", "127.0.0.1", 0)):
            before = len(proxy.seen)
            g = GatewayProcess(cfg, tmp_path, name, env={"HTTP_PROXY": proxy.url, "NO_PROXY": no_proxy}).start()
            try:
                status, _, body = _raw_http(g.port, _post("/v1/chat/completions", CHAT % name.encode()))
                assert status == 200, body
            finally:
                g.stop()
            assert proxy.seen[before:] == [f"POST {raw.url}/v1/chat/completions"] * via_proxy, (name, proxy.seen)
        assert len(raw.requests) == 2


def test_cut_anthropic_stream_through_the_gateway_bills_the_text(raw: RawUpstream, gw: GatewayProcess) -> None:
    """message_start (output_tokens 1), 300 text deltas, then the upstream drops the connection: the gateway bills
    at least 90% of the tiktoken count of the text streamed, flagged as estimated."""
    from tokenfuse.metering.estimate import count_tokens

    words = [f"word{i} " for i in range(300)]
    events = anthropic_events(words, final=False)
    payload = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)

    def answer(req: RawRequest) -> list[bytes | float]:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        for c in list(raw._conns):
            threading.Timer(0.5, lambda c=c: c.shutdown(socket.SHUT_RDWR)).start()  # then the connection drops
        return [head + payload]

    raw.answer = answer
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1000, "stream": True,
                       "messages": [{"role": "user", "content": "Write 300 words."}]}).encode()  # fmt: skip
    _raw_http(gw.port, _post("/v1/messages", body), timeout=10)
    out = eventually(lambda: _metric(gw, "tokenfuse_tokens_total", department="marketing", token_type="output"), 10,
                     what="the cut stream metered")  # fmt: skip
    assert out >= 0.9 * count_tokens("".join(words), "claude-sonnet-4-5")
    assert _metric(gw, "tokenfuse_estimated_requests_total", department="marketing") == 1


def test_compressed_answer_passes_intact_and_is_metered(raw: RawUpstream, gw: GatewayProcess) -> None:
    """An upstream that gzips its answer although asked for identity: the client gets the bytes with their
    Content-Encoding (and can read them), and the gateway meters the decoded usage exactly."""
    import gzip

    def answer(req: RawRequest) -> list[bytes | float]:
        assert req.header("accept-encoding") == "identity"
        body = gzip.compress(json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": [],
                                         "usage": {"prompt_tokens": 11, "completion_tokens": 22}}).encode())  # fmt: skip
        return [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)]  # fmt: skip

    raw.answer = answer
    status, headers, body = _raw_http(gw.port, _post("/v1/chat/completions", CHAT % b"z"))
    assert status == 200 and headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(body))["usage"]["completion_tokens"] == 22
    assert _metric(gw, "tokenfuse_tokens_total", department="marketing", token_type="output") == 22
    assert _metric(gw, "tokenfuse_estimated_requests_total", department="marketing") == 0


def test_connections_beyond_the_cap_are_closed(raw: RawUpstream, tmp_path: Path) -> None:
    """gateway.max_connections 2: a third client connection is closed at once, the two others still work."""
    g = _gateway(raw, tmp_path, "gw-cap", gateway={"max_connections": 2})
    try:
        held = [socket.create_connection(("127.0.0.1", g.port), timeout=5) for _ in range(2)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", g.port), timeout=5) as third:
            third.sendall(_post("/v1/chat/completions", CHAT % b"3"))
            try:
                data = third.recv(100)
            except ConnectionResetError:
                data = b""
            assert data == b""  # closed without an answer
        held[0].sendall(_post("/v1/chat/completions", CHAT % b"1"))
        assert held[0].recv(100).startswith(b"HTTP/1.1 200")
        for s in held:
            s.close()
        assert "connection_refused" in g.log.read_text()
    finally:
        g.stop()


def test_gemini_query_key_never_reaches_the_upstream(raw: RawUpstream, tmp_path: Path) -> None:
    """The virtual key in Gemini's ?key= (also spelled %6Bey=) authenticates and is removed from the target the
    upstream receives; other parameters pass raw; the upstream key goes as x-goog-api-key."""
    cfg = fake_config(raw.url, tmp_path).model_dump(mode="json")
    cfg["upstreams"].insert(0, {"name": "g", "base_url": raw.url, "provider": "google", "models": ["gemini-*"],
                                "api_key_env": "TOKENFUSE_TEST_UPSTREAM_KEY"})  # fmt: skip
    g = GatewayProcess(cfg, tmp_path, "gw-gemini").start()
    body = b'{"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}'
    try:
        for q in (f"key={KEYS['marketing']}&alt=json", f"alt=json&%6Bey={KEYS['marketing']}"):
            head = (f"POST /v1beta/models/gemini-2.5-flash:generateContent?{q} HTTP/1.1\r\nHost: gw\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")  # fmt: skip
            status, _, out = _raw_http(g.port, head.encode() + body)
            assert status == 200, out
    finally:
        g.stop()
    assert [r.target for r in raw.requests] == ["/v1beta/models/gemini-2.5-flash:generateContent?alt=json"] * 2
    assert all(r.header("x-goog-api-key") == "sk-up" for r in raw.requests)
    assert KEYS["marketing"] not in b"".join(bytes(c) for c in raw.received).decode("latin-1")
