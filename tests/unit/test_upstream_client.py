"""The gateway's upstream HTTP/1.1 client against hand-written server answers: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenfuse.gateway.upstream import Endpoint, UpstreamError, UpstreamPool, UpstreamTimeout, _ChunkedDecoder

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> AsyncIterator[tuple[Endpoint, list[int]]]:
    connections: list[int] = []

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Endpoint.parse(f"http://127.0.0.1:{port}/v1"), connections
    finally:
        server.close()
        await server.wait_closed()


async def _read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


async def test_chunked_body_is_decoded_and_connection_reused() -> None:
    """A chunked answer is decoded chunk by chunk, and the kept-alive connection serves the next request."""
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            seen.append(await _read_request(r))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")  # fmt: skip
            await w.drain()

    async for ep, conns in _serve(handler):
        pool = UpstreamPool()
        for _ in range(3):
            resp = await pool.request(ep, "/v1/x", {"A": "b"}, b"{}", connect_timeout=2, read_timeout=2)
            chunks = [c async for c in resp.iter_chunks()]
            resp.release()
            assert b"".join(chunks) == b"hello, world"  # chunks that arrived together are passed on together
        assert len(conns) == 1
        assert seen[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
        assert b"Content-Length: 2\r\n" in seen[0] and seen[0].endswith(b"\r\n\r\n{}")
        await pool.close()


async def test_content_length_and_connection_close() -> None:
    """A Content-Length body is read exactly; 'Connection: close' prevents reuse."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nConnection: close\r\nX-A: b\r\n\r\nbody")
        await w.drain()

    async for ep, conns in _serve(handler):
        pool = UpstreamPool()
        for _ in range(2):
            resp = await pool.request(ep, "/v1/x", {}, b"", connect_timeout=2, read_timeout=2)
            assert resp.status == 201 and resp.header("x-a") == "b"
            assert await resp.read() == b"body"
            resp.release()
        assert len(conns) == 2
        await pool.close()


async def test_stale_keepalive_connection_is_retried_once() -> None:
    """When the server closed an idle kept-alive connection, the request goes out again on a new one."""
    served = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_request(r)
        served += 1
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        # then close: the client still holds the connection as idle

    async for ep, conns in _serve(handler):
        pool = UpstreamPool()
        first = await pool.request(ep, "/", {}, b"", connect_timeout=2, read_timeout=2)
        assert await first.read() == b"ok"
        first.release()
        await asyncio.sleep(0.05)
        second = await pool.request(ep, "/", {}, b"", connect_timeout=2, read_timeout=2)
        assert await second.read() == b"ok"
        second.release()
        assert served == 2 and len(conns) == 2
        await pool.close()


async def test_timeouts_and_unreachable_and_garbage() -> None:
    """No head in time is UpstreamTimeout; a closed port or a non-HTTP answer is UpstreamError."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        await asyncio.sleep(5)

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"SMTP ready\r\n\r\n")
        await w.drain()

    async def cut(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await _read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await w.drain()

    pool = UpstreamPool()
    async for ep, _ in _serve(silent):
        with pytest.raises(UpstreamTimeout):
            await pool.request(ep, "/", {}, b"", connect_timeout=2, read_timeout=0.3)
    async for ep, _ in _serve(garbage):
        with pytest.raises(UpstreamError, match="status line"):
            await pool.request(ep, "/", {}, b"", connect_timeout=2, read_timeout=2)
    async for ep, _ in _serve(cut):
        resp = await pool.request(ep, "/", {}, b"", connect_timeout=2, read_timeout=2)
        with pytest.raises(UpstreamError):
            await resp.read()
        resp.release()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request(Endpoint.parse("http://127.0.0.1:9/v1"), "/", {}, b"", connect_timeout=2, read_timeout=2)
    await pool.close()


def test_endpoint_parsing() -> None:
    """Base URLs become endpoints with default ports and a Host header that omits them."""
    ep = Endpoint.parse("https://api.openai.com/v1/")
    assert (ep.scheme, ep.host, ep.port, ep.base_path, ep.host_header) == (
        "https",
        "api.openai.com",
        443,
        "/v1",
        "api.openai.com",
    )
    assert Endpoint.parse("http://127.0.0.1:8081").host_header == "127.0.0.1:8081"
    with pytest.raises(ValueError):
        Endpoint.parse("ftp://x")


async def test_header_values_cannot_inject_lines() -> None:
    """A header value with CR/LF is dropped, so it cannot smuggle a second request or header."""
    got: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await _read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await w.drain()

    async for ep, _ in _serve(handler):
        pool = UpstreamPool()
        resp = await pool.request(ep, "/", {"X-Evil": "a\r\nInjected: 1", "X-Ok": "fine"}, b"", connect_timeout=2,
                                  read_timeout=2)  # fmt: skip
        assert await resp.read() == b""
        resp.release()
        await pool.close()
    assert b"Injected" not in got[0] and b"X-Ok: fine" in got[0]


@given(cuts=st.lists(st.integers(min_value=1, max_value=80), max_size=12), sizes=st.lists(
    st.integers(min_value=1, max_value=300), min_size=1, max_size=6))  # fmt: skip
def test_chunked_decoder_any_split(cuts: list[int], sizes: list[int]) -> None:
    """However the bytes are split, the decoder returns exactly the payload and stops at the terminating chunk."""
    payload = [bytes([65 + i % 26]) * n for i, n in enumerate(sizes)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payload) + b"0\r\nX-T: 1\r\n\r\n"
    d = _ChunkedDecoder()
    out, pos = [], 0
    for c in [*cuts, len(wire)]:
        if pos >= len(wire):
            break
        out.append(d.feed(wire[pos : pos + c]))
        pos += c
    assert b"".join(out) == b"".join(payload)
    assert d.done and d.rest == b""


def test_chunked_decoder_rejects_garbage() -> None:
    """A size line that is not hex is an error, not silently wrong data."""
    with pytest.raises(ValueError):
        _ChunkedDecoder().feed(b"zz\r\nhello\r\n")
