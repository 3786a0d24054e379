"""Instrumented httpx transports: meter every LLM call an httpx-based SDK (openai, anthropic) makes.

The transport is the httpx adapter of `MeteredCall`: it wraps another transport and shows the call the response
bytes as the app reads them (nothing is buffered or delayed; a stream is metered when it ends or is closed early).
A call the policy refuses is answered with a synthetic 429 every SDK raises at once as its own rate-limit error.
Metering never raises into the app.
The same classes serve ``httpx`` and ``httpx2`` clients (the official SDKs moved to ``httpx2``, whose API is
httpx's): they derive from both packages' base classes and pick the default inner transport by the request's type.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, cast

import httpx
import httpx2

from tokenfuse.exporter.admission import ErrorStyle, Policy, refusal
from tokenfuse.exporter.call import MAX_JSON_BODY, MeteredCall
from tokenfuse.exporter.meter import Meter, default_meter
from tokenfuse.logs import log_event
from tokenfuse.metering import jsonio
from tokenfuse.metering.extract import detect_api, infer_provider, request_model
from tokenfuse.metering.types import Api

__all__ = ["AsyncMeteredTransport", "MeteredTransport", "current_labels", "labels"]

log = logging.getLogger("tokenfuse.exporter")


_labels: ContextVar[Mapping[str, str] | None] = ContextVar("tokenfuse_labels", default=None)
_MAX_ROUTES = 1024
_NOT_CACHED = object()


@contextlib.contextmanager
def labels(
    *, department: str | None = None, project: str | None = None, environment: str | None = None
) -> Iterator[None]:
    """Override the labels of the calls made inside the block (contextvars: safe across threads and tasks).

    Args:
        department: bill the calls to this department.
        project: project label.
        environment: environment label.
    """
    given = {"department": department, "project": project, "environment": environment}
    merged = {**(_labels.get() or {}), **{k: v for k, v in given.items() if v is not None}}
    token = _labels.set(merged)
    try:
        yield
    finally:
        _labels.reset(token)


def current_labels() -> Mapping[str, str]:
    """The label overrides in force in this context."""
    return _labels.get() or {}


def _head(response: Any) -> tuple[bytes, bytes]:
    """(content-type, content-encoding) of an httpx response, read from its header list once."""
    ctype = encoding = b""
    # httpx's Headers keeps (raw name, lower-case name, value) triples; Headers.get decodes and scans them all
    # per lookup, and .raw builds a new list: reading the triples once is the cheapest. .raw if that changes.
    triples = getattr(response.headers, "_list", None)
    if type(triples) is not list or (triples and len(triples[0]) != 3):
        triples = [(raw, raw.lower(), value) for raw, value in response.headers.raw]
    for _, name, value in triples:
        if name == b"content-type":
            ctype = value
        elif name == b"content-encoding":
            encoding = value
    return ctype, encoding


def _attach(call: MeteredCall, response: Any, stream_cls: type[Any]) -> Any:
    """Show ``call`` the response: its stream is wrapped so the bytes are seen as the app reads them."""
    try:
        ctype, encoding = _head(response)
        call.on_head(response.status_code, ctype, encoding)
        if response.is_stream_consumed:
            # Already read (e.g. a mock transport's response): its content is decoded and complete.
            call.on_body(response.content)
            call.finish()
            return response
    except Exception:
        log_event(log, logging.ERROR, "metering_failed", stage="response_head", exc_info=True)
        call.finish("metering_error")
        return response
    response.stream = stream_cls(response.stream, call)
    return response


class _SyncObservedStream(httpx.SyncByteStream, httpx2.SyncByteStream):
    def __init__(self, inner: Any, call: MeteredCall) -> None:
        self._inner = inner
        self._call = call

    def __iter__(self) -> Iterator[bytes]:
        call = self._call
        feed = call.sink()
        try:
            for chunk in self._inner:
                feed(chunk)
                yield chunk
        except GeneratorExit:
            call.finish("client_closed")  # the app stopped reading: meter what it got
            raise
        except BaseException as e:
            call.finish(type(e).__name__)
            raise
        call.end()

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._call.finish("" if self._call.ended else "client_closed")


class _AsyncObservedStream(httpx.AsyncByteStream, httpx2.AsyncByteStream):
    def __init__(self, inner: Any, call: MeteredCall) -> None:
        self._inner = inner
        self._call = call

    async def __aiter__(self) -> AsyncIterator[bytes]:
        call = self._call
        feed = call.sink()
        try:
            async for chunk in self._inner:
                feed(chunk)
                yield chunk
        except GeneratorExit:
            call.finish("client_closed")
            raise
        except BaseException as e:
            call.finish(type(e).__name__)
            raise
        call.end()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._call.finish("" if self._call.ended else "client_closed")


class _Instrument:
    """What both transports share: decide whether a request is an LLM call, begin its `MeteredCall`, admit it."""

    def __init__(
        self,
        *,
        meter: Meter | None,
        department: str | None,
        project: str | None,
        environment: str | None,
        provider: str | None,
        policy: Policy | None,
        raise_on_block: bool,
    ) -> None:
        self._meter = meter
        self.policy = policy
        self.raise_on_block = raise_on_block
        self.department = department
        self.project = project
        self.environment = environment
        self.provider = provider
        self._routes: dict[tuple[str, str], object] = {}

    @property
    def meter(self) -> Meter:
        return self._meter if self._meter is not None else default_meter()

    def _route(self, url: Any) -> tuple[Api, str] | None:
        """(API shape, provider) of a POST to ``url``, or None if it is not a metered call; cached per host and path."""
        try:
            # The parsed URL's raw host and path: the public .host and .path decode on every access.
            ref = url._uri_reference
            key = (ref.host, ref.path)
        except AttributeError:
            key = (url.host, url.path)
        route = self._routes.get(key, _NOT_CACHED)
        if route is _NOT_CACHED:
            host = url.host
            api = detect_api(url.path, host)
            route = None if api is None else (api, self.provider or infer_provider(host, api))
            if len(self._routes) >= _MAX_ROUTES:
                self._routes.clear()  # paths come from the app; keep the cache bounded
            self._routes[key] = route
        return cast("tuple[Api, str] | None", route)

    def begin(self, request: Any) -> MeteredCall | None:
        """The call ``request`` starts, or None when it is not an LLM call (or cannot be inspected)."""
        try:
            if request.method != "POST":
                return None
            url = request.url
            route = self._route(url)
            if route is None:
                return None
            api, provider = route
            body: Mapping[str, Any] | None = None
            try:
                content = request.content
            except (httpx.RequestNotRead, httpx2.RequestNotRead):
                content = b""
            if content and len(content) <= MAX_JSON_BODY:
                try:
                    try:
                        parsed = jsonio.fast_loads(content)
                    except jsonio.DecodeError:
                        parsed = jsonio.loads(content)
                    if type(parsed) is dict:
                        body = parsed
                except ValueError:
                    body = None
            if api == "google.generate_content" or body is None:
                model = request_model(api, body if body is not None else {}, url.path)
            else:
                model = body.get("model")
                if type(model) is not str or not model:
                    model = None
            over = _labels.get()
            meter = self._meter if self._meter is not None else default_meter()
            if over:
                call_labels = meter.labels(
                    department=over.get("department", self.department),
                    project=over.get("project", self.project),
                    environment=over.get("environment", self.environment),
                    provider=provider,
                    model=model,
                )
            else:
                call_labels = meter.labels(
                    department=self.department,
                    project=self.project,
                    environment=self.environment,
                    provider=provider,
                    model=model,
                )
            return MeteredCall(meter, api, call_labels, model, body)
        except Exception:
            log_event(log, logging.ERROR, "metering_failed", stage="request", exc_info=True,
                      message="the request is forwarded unmetered")  # fmt: skip
            return None

    def refused(self, request: Any, call: MeteredCall) -> Any:
        """A response for ``request`` if its call is refused (a synthetic 429, or the policy's exception raised
        when ``raise_on_block``), else None: the call goes out."""
        admission = call.admit(self.policy)
        if admission is None or admission.admitted:
            return None
        if self.raise_on_block and self.policy is not None:
            raise self.policy.refusal(admission)
        r = refusal(admission)
        style: ErrorStyle = "anthropic" if call.api == "anthropic.messages" else "openai"
        cls = httpx2.Response if isinstance(request, httpx2.Request) else httpx.Response
        return cls(
            r.status,
            headers={**r.headers, "content-type": "application/json"},
            content=r.body(style),
            request=request,
        )


class _Metered:
    """The arguments both transports take (documented on `MeteredTransport`)."""

    def __init__(
        self,
        transport: Any = None,
        *,
        department: str | None = None,
        project: str | None = None,
        environment: str | None = None,
        provider: str | None = None,
        meter: Meter | None = None,
        policy: Policy | None = None,
        raise_on_block: bool = False,
    ) -> None:
        self._inner: Any = transport
        self._instrument = _Instrument(
            meter=meter,
            department=department,
            project=project,
            environment=environment,
            provider=provider,
            policy=policy,
            raise_on_block=raise_on_block,
        )


class MeteredTransport(_Metered, httpx.BaseTransport, httpx2.BaseTransport):
    """An httpx (or httpx2) transport that meters the LLM calls passing through it.

    Give it to ``httpx.Client(transport=...)`` or ``httpx2.Client(transport=...)``; the official ``openai`` and
    ``anthropic`` SDKs take such a client as ``http_client``.

    Args:
        transport: the transport to wrap (default: the HTTP transport of the client's package, made on first use).
        department: department the calls are billed to (override per call with `labels`).
        project: project label.
        environment: environment label.
        provider: genai-prices provider id; default: inferred from the host and API shape.
        meter: where to record (default: the process-wide meter on the global registry).
        policy: a `tokenfuse.policies.PolicyEngine` on the same meter: a call its department may not make is
            answered, before anything is sent, with a 429 (``x-should-retry: false``, ``Retry-After``, code
            ``department_fuse_open`` or ``insufficient_budget``) that each SDK raises as its own rate-limit error.
        raise_on_block: raise `tokenfuse.BudgetExceeded` for a refused call instead of answering 429.
    """

    def _transport(self, request: Any) -> Any:
        if self._inner is None:
            self._inner = httpx2.HTTPTransport() if isinstance(request, httpx2.Request) else httpx.HTTPTransport()
        return self._inner

    def handle_request(self, request: Any) -> Any:
        inner = self._inner if self._inner is not None else self._transport(request)
        ins = self._instrument
        call = ins.begin(request)
        if call is None:
            return inner.handle_request(request)
        if ins.policy is not None:
            refused = ins.refused(request, call)
            if refused is not None:
                return refused
        try:
            response = inner.handle_request(request)
        except BaseException as e:
            call.finish(type(e).__name__)
            raise
        return _attach(call, response, _SyncObservedStream)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()


class AsyncMeteredTransport(_Metered, httpx.AsyncBaseTransport, httpx2.AsyncBaseTransport):
    """The asyncio twin of `MeteredTransport` (same arguments; for ``httpx.AsyncClient`` / ``httpx2.AsyncClient``)."""

    def _transport(self, request: Any) -> Any:
        if self._inner is None:
            self._inner = (
                httpx2.AsyncHTTPTransport() if isinstance(request, httpx2.Request) else httpx.AsyncHTTPTransport()
            )
        return self._inner

    async def handle_async_request(self, request: Any) -> Any:
        inner = self._inner if self._inner is not None else self._transport(request)
        ins = self._instrument
        call = ins.begin(request)
        if call is None:
            return await inner.handle_async_request(request)
        if ins.policy is not None:
            refused = ins.refused(request, call)
            if refused is not None:
                return refused
        try:
            response = await inner.handle_async_request(request)
        except BaseException as e:
            call.finish(type(e).__name__)
            raise
        return _attach(call, response, _AsyncObservedStream)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
