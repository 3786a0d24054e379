"""Instrumented httpx transports: meter every LLM call an httpx-based SDK (openai, anthropic) makes.

The transport wraps another transport and observes the response bytes as the app reads them: nothing is buffered
or delayed, and a stream is metered when it ends or is closed early. Metering never raises into the app.
The same classes serve ``httpx`` and ``httpx2`` clients (the official SDKs moved to ``httpx2``, whose API is
httpx's): they derive from both packages' base classes and pick the default inner transport by the request's type.
"""

from __future__ import annotations

import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Protocol, cast

import httpx
import httpx2

from tokenfuse.exporter.labels import CallLabels
from tokenfuse.exporter.meter import CallRecord, Meter, default_meter
from tokenfuse.metering import jsonio
from tokenfuse.metering.estimate import estimate_prompt_tokens, estimate_usage, max_output_tokens
from tokenfuse.metering.extract import detect_api, extract_usage, infer_provider, request_model
from tokenfuse.metering.stream import StreamUsageParser
from tokenfuse.metering.types import API_OPERATIONS, Api, Usage

__all__ = ["AsyncMeteredTransport", "Enforcer", "MeteredTransport", "current_labels", "labels"]

log = logging.getLogger("tokenfuse.exporter")


class Enforcer(Protocol):
    """What the transports need of a policy engine (`tokenfuse.policies.PolicyEngine` is one).

    Defined here so the exporter does not import the policy layer above it.
    """

    def admit(
        self, department: str, *, input_tokens: int, max_output_tokens: int, provider: str, model: str
    ) -> Any: ...

    def settle(self, reservation: Any, record: CallRecord | None) -> None: ...

    def refusal(self, admission: Any) -> Exception: ...


_labels: ContextVar[Mapping[str, str] | None] = ContextVar("tokenfuse_labels", default=None)
_MAX_JSON_BODY = 16 * 1024 * 1024
_MAX_ROUTES = 1024
_NOT_CACHED = object()
_warned_encodings: set[str] = set()


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


def _decoder(encoding: str) -> Any:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc == "gzip":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if enc == "deflate":
        return zlib.decompressobj()
    if enc == "br":
        try:
            import brotli  # type: ignore[import-not-found]

            return brotli.Decompressor()
        except ImportError:
            pass
    if enc not in _warned_encodings:
        _warned_encodings.add(enc)
        log.warning("cannot decode content-encoding %r for metering; such calls are estimated", enc)
    return False


class _Observation:
    """One call in flight: collects the response bytes' usage and records the call exactly once."""

    __slots__ = (
        "_body",
        "_body_size",
        "_decoder",
        "_done",
        "_parser",
        "admission",
        "api",
        "error_type",
        "labels",
        "meter",
        "policy",
        "request_json",
        "request_model",
        "start",
        "status",
    )

    def __init__(
        self,
        meter: Meter,
        api: Api,
        call_labels: CallLabels,
        request_model: str | None,
        request_json: Mapping[str, Any] | None,
        start: float,
    ) -> None:
        self.meter = meter
        self.api = api
        self.labels = call_labels
        self.request_model = request_model
        self.request_json = request_json
        self.start = start
        self.status = 0
        self.error_type = ""
        self._parser: StreamUsageParser | None = None
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._decoder: Any = None
        self._done = False
        self.policy: Enforcer | None = None
        self.admission: Any = None

    def on_response(self, response: Any) -> None:
        self.status = response.status_code
        if self.status >= 400:
            return
        ctype = encoding = b""
        headers = response.headers
        # httpx's Headers keeps (raw name, lower-case name, value) triples; Headers.get decodes and scans them all
        # per lookup, and .raw builds a new list: reading the triples once is the cheapest. .raw if that changes.
        triples = getattr(headers, "_list", None)
        if type(triples) is not list or (triples and len(triples[0]) != 3):
            triples = [(raw, raw.lower(), value) for raw, value in headers.raw]
        for _, name, value in triples:
            if name == b"content-type":
                ctype = value
            elif name == b"content-encoding":
                encoding = value
        dec = _decoder(encoding.decode("latin-1")) if encoding else None
        self._decoder = dec
        if dec is False:
            return
        if ctype.find(b"text/event-stream") >= 0:  # not ``in``: see metering.stream
            self._parser = StreamUsageParser(self.api)
        else:
            self._body = []

    def attach(self, response: Any, stream_cls: type[Any]) -> Any:
        """Observe ``response``: its stream is wrapped so the bytes are seen as the app reads them."""
        self.on_response(response)
        if response.is_stream_consumed:
            # Already read (e.g. a mock transport's response): its content is decoded and complete.
            content = response.content
            if self._body is not None and len(content) <= _MAX_JSON_BODY:
                self._decoder = None
                self._body.append(content)
            else:
                self.feed(response.content, decoded=True)
            self.finish()
            return response
        response.stream = stream_cls(response.stream, self)
        return response

    def sink(self) -> Any:
        """What the stream wrappers call with each chunk: the parser's own ``feed`` when nothing needs decoding
        (one call per chunk instead of two), else `feed`."""
        parser = self._parser
        if parser is not None and not self._decoder:
            return parser.feed
        return self.feed

    def feed(self, chunk: bytes, decoded: bool = False) -> None:
        try:
            if self._decoder and not decoded:
                chunk = self._decoder.decompress(chunk)
            if self._parser is not None:
                self._parser.feed(chunk)
            elif self._body is not None:
                self._body_size += len(chunk)
                if self._body_size <= _MAX_JSON_BODY:
                    self._body.append(chunk)
                else:
                    self._body = None
        except Exception:
            log.debug("metering could not read a chunk", exc_info=True)
            self._parser = None
            self._body = None

    def finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        rec = None
        try:
            rec = self._record(error)
        except Exception:
            log.exception("metering failed; the call itself was not affected")
        if self.policy is not None and self.admission is not None:
            try:
                self.policy.settle(self.admission.reservation, rec)
            except Exception:
                log.exception("settling the reservation failed")

    def _record(self, error: BaseException | None) -> CallRecord:
        usage: Usage | None = None
        if error is not None and self.status == 0:
            outcome = "upstream_error"
            self.error_type = type(error).__name__
        elif self.status >= 500 or self.status == 429:
            outcome = "upstream_error"
            self.error_type = str(self.status)
        elif self.status >= 400:
            outcome = "client_error"
            self.error_type = str(self.status)
        else:
            outcome = "success"
            if self._parser is not None:
                usage = self._parser.result()
                if usage is None:
                    usage = estimate_usage(
                        self.api,
                        self.request_json,
                        self._parser.output_text,
                        self.request_model,
                        output_chars=self._parser.output_chars,
                    )
            elif self._body is not None:
                usage = extract_usage(self.api, b"".join(self._body))
                if usage is None:
                    usage = estimate_usage(self.api, self.request_json, "", self.request_model)
            else:
                usage = estimate_usage(self.api, self.request_json, "", self.request_model)
            if error is not None:
                self.error_type = type(error).__name__
        return self.meter.record(
            self.labels,
            usage=usage,
            outcome=outcome,
            operation=API_OPERATIONS.get(self.api, "chat"),
            request_model=self.request_model,
            duration=time.perf_counter() - self.start,
            error_type=self.error_type,
        )


class _SyncObservedStream(httpx.SyncByteStream, httpx2.SyncByteStream):
    def __init__(self, inner: Any, obs: _Observation) -> None:
        self._inner = inner
        self._obs = obs

    def __iter__(self) -> Iterator[bytes]:
        obs = self._obs
        feed = obs.sink()
        try:
            for chunk in self._inner:
                feed(chunk)
                yield chunk
        except GeneratorExit:
            obs.finish()  # the app stopped reading: meter what it got
            raise
        except BaseException as e:
            obs.finish(e)
            raise

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._obs.finish()


class _AsyncObservedStream(httpx.AsyncByteStream, httpx2.AsyncByteStream):
    def __init__(self, inner: Any, obs: _Observation) -> None:
        self._inner = inner
        self._obs = obs

    async def __aiter__(self) -> AsyncIterator[bytes]:
        obs = self._obs
        feed = obs.sink()
        try:
            async for chunk in self._inner:
                feed(chunk)
                yield chunk
        except GeneratorExit:
            obs.finish()
            raise
        except BaseException as e:
            obs.finish(e)
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._inner, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._obs.finish()


class _Instrument:
    """What both transports share: decide whether a request is an LLM call and open its observation."""

    def __init__(
        self,
        *,
        meter: Meter | None,
        department: str | None,
        project: str | None,
        environment: str | None,
        provider: str | None,
        policy: Enforcer | None = None,
    ) -> None:
        self._meter = meter
        self.policy = policy
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

    def observe(self, request: Any) -> _Observation | None:
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
            if content and len(content) <= _MAX_JSON_BODY:
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
            obs = _Observation(meter, api, call_labels, model, body, time.perf_counter())
        except Exception:
            log.exception("metering could not inspect a request; it is forwarded unmetered")
            return None
        if self.policy is not None:
            self._enforce(obs, self.policy)
        return obs

    def _enforce(self, obs: _Observation, policy: Enforcer) -> None:
        """Reserve the call's worst case, or count it as blocked and raise the policy's refusal."""
        try:
            body = obs.request_json or {}
            prompt = estimate_prompt_tokens(obs.api, body, obs.request_model)
            out = 0 if obs.api == "openai.embeddings" else max_output_tokens(obs.api, body, 4096)
            admission = policy.admit(
                obs.labels.department,
                input_tokens=prompt,
                max_output_tokens=out,
                provider=obs.labels.provider,
                model=obs.labels.model,
            )
        except Exception:
            log.exception("policy check failed; the call goes out unenforced")
            return
        if admission.admitted:
            obs.policy = policy
            obs.admission = admission
            return
        obs.meter.record(obs.labels, usage=None, outcome="blocked")
        obs.meter.metrics.blocked.labels(obs.labels.department, admission.reason or "fuse_open").inc()
        raise policy.refusal(admission)


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
        policy: Enforcer | None = None,
    ) -> None:
        self._inner: Any = transport
        self._instrument = _Instrument(
            meter=meter,
            department=department,
            project=project,
            environment=environment,
            provider=provider,
            policy=policy,
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
        policy: a `tokenfuse.policies.PolicyEngine` on the same meter: calls its department may not make raise
            `tokenfuse.BudgetExceeded` before anything is sent.
    """

    def _transport(self, request: Any) -> Any:
        if self._inner is None:
            self._inner = httpx2.HTTPTransport() if isinstance(request, httpx2.Request) else httpx.HTTPTransport()
        return self._inner

    def handle_request(self, request: Any) -> Any:
        inner = self._inner if self._inner is not None else self._transport(request)
        obs = self._instrument.observe(request)
        if obs is None:
            return inner.handle_request(request)
        try:
            response = inner.handle_request(request)
        except BaseException as e:
            obs.finish(e)
            raise
        return obs.attach(response, _SyncObservedStream)

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
        obs = self._instrument.observe(request)
        if obs is None:
            return await inner.handle_async_request(request)
        try:
            response = await inner.handle_async_request(request)
        except BaseException as e:
            obs.finish(e)
            raise
        return obs.attach(response, _AsyncObservedStream)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
