"""The gateway's client to upstream LLM APIs, on pyreqwest (Rust's reqwest and hyper): pooled, streamed, timed.

HTTP on the way out is a security boundary (the organisation's keys travel on it), so the protocol is a well-kept
library's, not ours: hyper skips 1xx interim responses, never pools a connection whose response did not end where its
framing said, and refuses header values that could split a request. Chosen by measurement against aiohttp's client
(`bench/upstream_clients.py`, README). This module adds what the gateway needs on top: one client per upstream with
its egress settings (proxy, CA bundle, client certificate), identity encoding (usage is read from the bytes), and the
two error kinds the gateway answers 502 / 504 for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import BodyDecodeError, PyreqwestError, RequestTimeoutError
from pyreqwest.proxy import ProxyBuilder
from pyreqwest.request import StreamRequest
from pyreqwest.response import Response

from tokenfuse.config import Upstream

__all__ = [
    "UpstreamBodyError",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "egress_proxy",
]

_IDLE = timedelta(seconds=30)  # servers drop idle keep-alive connections after ~60 s; reuse only younger ones


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol (the gateway answers 502)."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (the gateway answers 504)."""


class UpstreamBodyError(UpstreamError):
    """The answer's head arrived but its body broke off (cut, bad framing): the upstream did take the request."""


def _wrap(e: PyreqwestError) -> UpstreamError:
    if isinstance(e, RequestTimeoutError):
        return UpstreamTimeout(f"upstream did not answer in time ({type(e).__name__})")
    if isinstance(e, BodyDecodeError):
        return UpstreamBodyError(f"upstream broke off its answer: {type(e).__name__}: {e}")
    return UpstreamError(f"upstream failed: {type(e).__name__}: {e}")


def egress_proxy(upstream: Upstream, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The proxy URL for ``upstream`` and the no-proxy list that goes with it.

    ``upstreams[].proxy`` wins; else ``HTTPS_PROXY`` (``HTTP_PROXY`` for an ``http://`` base URL) and ``NO_PROXY``
    from the environment, upper or lower case, as curl and the SDKs read them.
    """
    if upstream.proxy:
        return upstream.proxy, None
    scheme = "https" if upstream.base_url.startswith("https:") else "http"

    def env(name: str) -> str | None:
        return environ.get(name.upper()) or environ.get(name.lower()) or None

    proxy = env(f"{scheme}_proxy") or env("all_proxy")
    return proxy, (env("no_proxy") if proxy else None)


class UpstreamResponse:
    """An upstream response whose head has arrived; read the body with `read` or `iter_chunks`, then `release`.

    Args:
        request: the streamed request whose context holds the connection.
        response: the response it gave.
    """

    __slots__ = ("_request", "_response", "headers", "status")

    def __init__(self, request: StreamRequest, response: Response) -> None:
        self._request: StreamRequest | None = request
        self._response = response
        self.status = response.status
        self.headers: list[tuple[str, str]] = list(response.headers.items())

    def header(self, name: str, default: str = "") -> str:
        """The first value of header ``name`` (case-insensitive)."""
        value = self._response.get_header(name)
        return default if value is None else value

    async def read(self) -> bytes:
        """The whole body."""
        try:
            return bytes(await self._response.bytes())
        except PyreqwestError as e:
            raise _wrap(e) from None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked transfer decoded); each read waits at most the read timeout."""
        reader = self._response.body_reader
        try:
            while (chunk := await reader.read_chunk()) is not None:
                yield bytes(chunk)
        except PyreqwestError as e:
            raise _wrap(e) from None

    async def release(self) -> None:
        """End the exchange: the library keeps the connection alive if the body was read to its framed end."""
        request, self._request = self._request, None
        if request is not None:
            await request.__aexit__(None, None, None)


class UpstreamClient:
    """Pooled keep-alive connections to one upstream, with its timeouts and egress settings.

    Args:
        upstream: the configured upstream (base URL, timeouts, ``proxy``, ``ca_file``, ``client_cert``/``client_key``).
        environ: where ``HTTPS_PROXY`` / ``NO_PROXY`` are read when the upstream names no proxy.
    """

    def __init__(self, upstream: Upstream, environ: Mapping[str, str]) -> None:
        self.base_url = upstream.base_url.rstrip("/")
        b = (
            ClientBuilder()
            .connect_timeout(timedelta(seconds=upstream.connect_timeout))
            .read_timeout(timedelta(seconds=upstream.timeout))
            .pool_idle_timeout(_IDLE)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .follow_redirects(False)
            .error_for_status(False)
            .http1_only()
            .tcp_nodelay(True)
        )
        proxy, no_proxy = egress_proxy(upstream, environ)
        if proxy:
            pb = ProxyBuilder.all(proxy)
            if no_proxy:
                pb = pb.no_proxy(no_proxy)
            b = b.proxy(pb)
        else:
            b = b.no_proxy()  # one rule, ours: reqwest would otherwise read the process environment itself
        if upstream.ca_file:
            b = b.add_root_certificate_pem(Path(upstream.ca_file).read_bytes())
        if upstream.client_cert:
            pem = Path(upstream.client_cert).read_bytes()
            if upstream.client_key:
                pem = pem.rstrip(b"\n") + b"\n" + Path(upstream.client_key).read_bytes()
            b = b.identity_pem(pem)
        self._client: Client = b.build()

    async def send(
        self, target: str, headers: Sequence[tuple[str, str]], body: bytes, *, stream: bool, method: str = "POST"
    ) -> UpstreamResponse:
        """Send ``body`` to ``base_url + target`` and wait for the response head (1xx interim heads skipped).

        Args:
            target: path after the base URL, raw query included (``/chat/completions?api-version=1``).
            headers: request headers (Host and Content-Length are the library's).
            body: the request body (empty for GET / DELETE).
            stream: the caller expects a stream: hand over the head at once instead of buffering the first 64 KiB.
            method: the HTTP method.

        Raises:
            UpstreamTimeout: no connection or no head in time.
            UpstreamError: the upstream is unreachable or broke the protocol.
        """
        builder = self._client.request(method, self.base_url + target).headers(list(headers))
        if body or method == "POST":
            builder = builder.body_bytes(body)
        if stream:
            builder = builder.streamed_read_buffer_limit(0)
        request = builder.build_streamed()
        try:
            response = await request.__aenter__()
        except PyreqwestError as e:
            raise _wrap(e) from None
        return UpstreamResponse(request, response)

    async def close(self) -> None:
        await self._client.close()
