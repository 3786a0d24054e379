"""The gateway's aiohttp application: authenticate, admit, forward (streaming included), meter, settle.

Apps change only ``base_url`` and their key. The request body is forwarded as received unless tokenfuse must edit
it (``tags`` removed, ``stream_options.include_usage`` added), so the common path does one JSON parse and no dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tokenfuse.config import NEVER_FORWARDED, UNASSIGNED, Config, GatewayConfig, Upstream
from tokenfuse.exporter.admission import refusal
from tokenfuse.exporter.call import MeteredCall
from tokenfuse.exporter.meter import Meter
from tokenfuse.gateway.errors import ErrorStyle, GatewayError, error_response
from tokenfuse.gateway.upstream import (
    UpstreamBodyError,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
    UpstreamTimeout,
)
from tokenfuse.logs import log_event
from tokenfuse.metering import jsonio
from tokenfuse.metering.extract import request_model
from tokenfuse.metering.types import Api
from tokenfuse.policies import PolicyEngine

__all__ = ["GATEWAY_KEY", "Gateway", "make_app"]

log = logging.getLogger("tokenfuse.gateway")

_GOOGLE_PROVIDERS = frozenset({"google"})
_GEMINI_VERBS = ("generateContent", "streamGenerateContent")
_STYLES: dict[str, ErrorStyle] = {"anthropic.messages": "anthropic", "google.generate_content": "google"}
ROUTES: dict[str, Api] = {
    "/v1/chat/completions": "openai.chat",
    "/v1/completions": "openai.completions",
    "/v1/embeddings": "openai.embeddings",
    "/v1/responses": "openai.responses",
    "/v1/messages": "anthropic.messages",
}

# A request target with a control byte, a space or DEL (raw or once percent-decoded) could split the upstream request
# line or smuggle a second request: refused before anything goes upstream.
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")


class _HeaderAllowList:
    """Which client headers go upstream: those matching ``gateway.forward_headers``, never a credential, a hop-by-hop
    header (or one the client's ``Connection`` names) or a tokenfuse header. Decisions cached per header name."""

    __slots__ = ("_cache", "_patterns")

    def __init__(self, patterns: list[str]) -> None:
        self._patterns = tuple(patterns)
        self._cache: dict[str, bool] = {}

    def allows(self, lname: str) -> bool:
        ok = self._cache.get(lname)
        if ok is None:
            ok = (
                lname not in NEVER_FORWARDED
                and not lname.startswith(("x-tokenfuse-", "proxy-"))
                and any(fnmatch.fnmatchcase(lname, p) for p in self._patterns)
            )
            if len(self._cache) < 4096:
                self._cache[lname] = ok
        return ok

    def select(self, headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
        named = {t.strip().lower() for c in headers.getall("connection", ()) for t in c.split(",")}
        out = []
        for k, v in headers.items():
            lk = k.lower()
            if self.allows(lk) and lk not in named:
                out.append((k, v))
        return out


# Content-Encoding passes: the body is passed on as received (the gateway asks for identity; an upstream that
# compresses anyway must say so to the client). Metering decodes its own copy.
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "upgrade",
        "trailer",
        "set-cookie",
        "server",
        "date",
    }
)
_PROJECT_HEADERS = ("x-tokenfuse-project", "x-project")
_ENV_HEADERS = ("x-tokenfuse-environment", "x-environment")
_DEPT_HEADERS = ("x-tokenfuse-department", "x-department")


def _first_header(headers: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for n in names:
        v = headers.get(n)
        if v:
            return v
    return None


class _UsageChunkFilter:
    """Drops the usage-only chunk tokenfuse asked for on the client's behalf from an OpenAI chat stream.

    Only used when the client did not ask for usage itself; events are split on blank lines, everything else
    passes through unchanged and in order.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk
        cut = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if cut < 0:
            self._buf = data
            return b""
        end = cut + (4 if data.startswith(b"\r\n\r\n", cut) else 2)
        head, self._buf = data[:end], data[end:]
        # .find(), not ``in``: on bytes ``in`` raises and clears a TypeError first (see metering.stream).
        if head.find(b'"usage"') < 0 or head.replace(b" ", b"").find(b'"choices":[]') < 0:
            return head
        out = []
        for event in head.replace(b"\r\n", b"\n").split(b"\n\n"):
            if not event:
                continue
            compact = event.replace(b" ", b"")
            if compact.find(b'"choices":[]') >= 0 and compact.find(b'"usage":{') >= 0:
                continue
            out.append(event + b"\n\n")
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return rest


class Gateway:
    """The state one gateway process serves from.

    Args:
        config: validated config.
        registry: metrics registry exposed on /metrics (default: a fresh one).
        policy: a started `tokenfuse.policies.PolicyEngine`, or None to meter without enforcing.
        meter: the meter (default: one on ``registry``).
        environ: where upstream keys are read (default: the process environment).
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: CollectorRegistry | None = None,
        policy: PolicyEngine | None = None,
        meter: Meter | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.meter = meter if meter is not None else Meter(config, self.registry)
        self.policy = policy
        self._environ = environ
        # Built in startup (inside the event loop): upstream name -> (its config, its client). Clients replaced by a
        # reload may still carry calls in flight; they are closed at shutdown.
        self._clients: dict[str, tuple[Upstream, UpstreamClient]] | None = None
        self._retired: list[UpstreamClient] = []
        self.ready = False
        self._apply(config)

    def _apply(self, config: Config) -> None:
        self.config = config
        self.keys = config.key_index()
        self._key_cache: dict[str, str | None] = {}
        self._upstream_keys = {u.name: u.api_key(self._environ) for u in config.upstreams}
        self._route_cache: dict[str, Upstream | None] = {}
        self._responses_upstream: dict[str, Upstream] = {}
        self._forwarded = _HeaderAllowList(config.gateway.forward_headers)
        if self._clients is not None:
            self._build_clients()

    def _build_clients(self) -> None:
        """One pooled client per upstream; an unchanged upstream keeps its client (and its warm connections)."""
        env = self._environ if self._environ is not None else os.environ
        old = self._clients or {}
        new: dict[str, tuple[Upstream, UpstreamClient]] = {}
        for u in self.config.upstreams:
            kept = old.get(u.name)
            new[u.name] = kept if kept is not None and kept[0] == u else (u, UpstreamClient(u, env))
        self._retired.extend(c for name, (u, c) in old.items() if new.get(name, (None, None))[1] is not c)
        self._clients = new

    def reconfigure(self, config: Config) -> None:
        """Adopt a new config without dropping connections or state."""
        self._apply(config)
        self.meter.reconfigure(config)
        if self.policy is not None:
            self.policy.reconfigure(config)

    async def startup(self, app: web.Application) -> None:
        self._clients = {}
        self._build_clients()
        self.ready = True

    async def cleanup(self, app: web.Application) -> None:
        self.ready = False
        clients = [c for _u, c in (self._clients or {}).values()] + self._retired
        self._clients, self._retired = None, []
        for c in clients:
            await c.close()

    # -- who pays -------------------------------------------------------------------------------------------

    def _department(self, request: web.Request, query_key: bool = False) -> str:
        """The department whose virtual key the request carries (``query_key``: Gemini's ``?key=`` too)."""
        h = request.headers
        for name in ("authorization", "x-api-key", "api-key", "x-goog-api-key"):
            if len(h.getall(name, ())) > 1:
                raise GatewayError(
                    400,
                    f"The request carries more than one '{name}' header: send exactly one key.",
                    "invalid_request_error",
                    "duplicate_credentials",
                )
        auth = h.get("authorization")
        key: str | None = None
        if auth:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                key = value.strip()
        if key is None:
            key = h.get("x-api-key") or h.get("api-key") or h.get("x-goog-api-key")
        if not key and query_key:
            keys = request.query.getall("key", ())
            if len(keys) > 1:
                raise GatewayError(400, "The request carries more than one 'key' parameter: send exactly one key.",
                                   "invalid_request_error", "duplicate_credentials")  # fmt: skip
            key = keys[0] if keys else None
        if not key:
            if self.config.gateway.require_key:
                raise GatewayError(
                    401,
                    "Missing API key: send your tokenfuse virtual key as 'Authorization: Bearer <key>' "
                    "(or 'x-api-key' for Anthropic clients).",
                    "authentication_error",
                    "missing_api_key",
                )
            return UNASSIGNED
        dept = self._key_cache.get(key)
        if dept is None:
            dept = self.keys.get("sha256:" + hashlib.sha256(key.encode()).hexdigest())
            if dept is None:
                raise GatewayError(
                    401,
                    "Invalid API key: this is not a tokenfuse virtual key of any department "
                    "(create one with `tokenfuse keys new --department NAME`).",
                    "authentication_error",
                    "invalid_api_key",
                )
            if len(self._key_cache) < 10000:
                self._key_cache[key] = dept
        return dept

    def _route(self, model: str, api: Api) -> Upstream:
        native = api == "google.generate_content"
        key = ("google:" if native else "") + model
        up = self._route_cache.get(key, False)
        if up is False:
            up = self.config.route(model, _GOOGLE_PROVIDERS if native else None)
            if len(self._route_cache) < 10000:
                self._route_cache[key] = up
        if up is None:
            raise GatewayError(
                404,
                f"The model '{model}' is not routed by this gateway: no upstream's models pattern matches it.",
                "invalid_request_error",
                "model_not_found",
            )
        assert isinstance(up, Upstream)
        return up

    # -- the proxy ------------------------------------------------------------------------------------------

    async def handle_llm(self, request: web.Request) -> web.StreamResponse:
        """The OpenAI and Anthropic routes (`ROUTES`): the model is in the body."""
        return await self._serve(request, ROUTES[request.path], None, False)

    async def handle_gemini(self, request: web.Request) -> web.StreamResponse:
        """Gemini's native ``/v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``."""
        model, _, verb = request.match_info["target"].partition(":")
        if not model or verb not in _GEMINI_VERBS:
            return error_response(404, f"Unknown route {request.method} {request.path}: use models/MODEL:"
                                  "generateContent or :streamGenerateContent.", "invalid_request_error",
                                  "unknown_route", None, "google")  # fmt: skip
        return await self._serve(request, "google.generate_content", model, verb == "streamGenerateContent")

    async def _serve(
        self, request: web.Request, api: Api, path_model: str | None, path_stream: bool
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        style = _STYLES.get(api, "openai")
        dept = UNASSIGNED
        model: str | None = path_model
        try:
            target = _upstream_target(request, native=path_model is not None)
            dept = self._department(request, query_key=path_model is not None)
            raw, body = await _json_object(request, self.config.gateway)
            if path_model is None:
                model = request_model(api, body, request.path)
                if not model or not isinstance(body.get("model"), str):
                    raise GatewayError(
                        400, "The request body has no 'model' (a string).", "invalid_request_error", "missing_model"
                    )
            assert model is not None
            project, environment, edited = self._tags(request, body, dept)
            upstream = self._route(model, api)
            stream = path_stream or body.get("stream") is True
            inject_usage = False
            if stream and api in ("openai.chat", "openai.completions"):
                so = body.get("stream_options")
                if not (isinstance(so, dict) and so.get("include_usage") is True):
                    body["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
                    inject_usage = True
                    edited = True
            if edited:
                raw = jsonio.dumps(body)
        except GatewayError as e:
            self._count_refused(dept, None, None, model, e.outcome)
            return e.response(style)

        if api == "openai.responses":
            self._responses_upstream[dept] = upstream
        labels = self.meter.labels(
            department=dept, project=project, environment=environment, provider=upstream.provider, model=model
        )
        call = MeteredCall(self.meter, api, labels, model, body, start=t0)
        admission = call.admit(self.policy)
        if admission is not None and not admission.admitted:
            r = refusal(admission)
            return web.Response(status=r.status, body=r.body(style), content_type="application/json", headers=r.headers)
        try:
            return await self._forward(request, call, raw, target, upstream, stream, inject_usage, style)
        except BaseException as e:
            call.finish(type(e).__name__)  # e.g. the client went away while the upstream was thinking
            raise

    def _tags(self, request: web.Request, body: dict[str, Any], dept: str) -> tuple[str | None, str | None, bool]:
        h = request.headers
        project = _first_header(h, _PROJECT_HEADERS)
        environment = _first_header(h, _ENV_HEADERS)
        claimed = _first_header(h, _DEPT_HEADERS)
        edited = False
        tags = body.get("tags")
        if "tags" in body:
            del body["tags"]
            edited = True
            if tags is not None and not isinstance(tags, dict):
                raise GatewayError(
                    400,
                    '\'tags\' must be an object such as {"project": "...", "environment": "..."}.',
                    "invalid_request_error",
                    "invalid_tags",
                )
            if isinstance(tags, dict):
                for k, v in tags.items():
                    if k not in ("department", "project", "environment") or not isinstance(v, str):
                        raise GatewayError(
                            400,
                            f"'tags.{k}' is not allowed: tags take string values for department, project, environment.",
                            "invalid_request_error",
                            "invalid_tags",
                        )
                project = tags.get("project", project)
                environment = tags.get("environment", environment)
                claimed = tags.get("department", claimed)
        if claimed is not None and claimed != dept:
            raise GatewayError(
                403,
                f"This key belongs to department '{dept}'; a header or tag cannot bill the call to '{claimed}'.",
                "permission_error",
                "department_mismatch",
            )
        return project, environment, edited

    def _success_headers(self, call: MeteredCall) -> dict[str, str]:
        h = {"x-tokenfuse-department": call.labels.department}
        admission = call.admission
        if admission is not None:
            if admission.budget_remaining_usd is not None:
                h["x-tokenfuse-budget-remaining-usd"] = f"{max(admission.budget_remaining_usd, 0.0):.6f}"
            if admission.tokens_remaining is not None:
                h["x-tokenfuse-tokens-remaining-1h"] = str(max(int(admission.tokens_remaining), 0))
        return h

    def _upstream_request(
        self, request: web.Request, upstream: Upstream
    ) -> tuple[UpstreamClient, list[tuple[str, str]]]:
        assert self._clients is not None
        headers = self._forwarded.select(request.headers)
        key = self._upstream_keys.get(upstream.name)
        if key:
            if upstream.provider == "anthropic":
                headers.append(("x-api-key", key))
            elif upstream.provider in _GOOGLE_PROVIDERS:
                headers.append(("x-goog-api-key", key))
            else:
                headers.append(("authorization", "Bearer " + key))
        headers.append(("content-type", "application/json"))
        headers.append(("accept-encoding", "identity"))
        return self._clients[upstream.name][1], headers

    async def _forward(
        self,
        request: web.Request,
        call: MeteredCall,
        raw: bytes,
        target: str,
        upstream: Upstream,
        stream: bool,
        inject_usage: bool,
        style: ErrorStyle,
    ) -> web.StreamResponse:
        client, headers = self._upstream_request(request, upstream)
        t_up = time.perf_counter()
        try:
            up = await client.send(target, headers, raw, stream=stream)
        except UpstreamError as e:
            if isinstance(e, UpstreamBodyError):
                call.on_cut_answer()
            return self._upstream_failed(call, upstream, e, style)
        try:
            ctype = up.header("content-type")
            call.on_head(up.status, ctype.encode("latin-1"), up.header("content-encoding").encode("latin-1"))
            resp_headers = {k: v for k, v in up.headers if k.lower() not in _DROP_RESPONSE}
            resp_headers.update(self._success_headers(call))
            if "text/event-stream" in ctype and up.status < 400:
                return await self._stream(request, call, up, resp_headers, inject_usage, t_up)
            try:
                data = await up.read()
            except UpstreamError as e:
                return self._upstream_failed(call, upstream, e, style)
            t_back = time.perf_counter()
        finally:
            await up.release()
        call.feed(data)
        call.end()
        call.finish()
        await self._durable()
        resp = web.Response(status=up.status, body=data, headers=resp_headers)
        self.meter.observe_overhead("json", time.perf_counter() - call.start - (t_back - t_up))
        return resp

    async def _stream(
        self,
        request: web.Request,
        call: MeteredCall,
        up: UpstreamResponse,
        resp_headers: dict[str, str],
        inject_usage: bool,
        t_up: float,
    ) -> web.StreamResponse:
        feed = call.sink()
        filt = _UsageChunkFilter() if inject_usage else None
        resp = web.StreamResponse(status=up.status, headers=resp_headers)
        client_gone = False
        upstream_failed = False
        self.meter.observe_overhead("stream", t_up - call.start)
        try:
            await resp.prepare(request)
            async for chunk in up.iter_chunks():
                feed(chunk)
                out = filt.feed(chunk) if filt is not None else chunk
                if out:
                    try:
                        await resp.write(out)
                    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                        client_gone = True
                        break
            else:
                call.end()
            if filt is not None and not client_gone:
                rest = filt.flush()
                if rest:
                    await resp.write(rest)
        except UpstreamError:
            upstream_failed = True
        except (ConnectionResetError, asyncio.CancelledError):
            client_gone = True
            raise
        finally:
            call.finish("client_closed" if client_gone else ("stream_cut" if upstream_failed else ""))
        if upstream_failed and request.transport is not None:
            # The upstream cut the stream: cut the client's too, so it cannot mistake a partial answer for a whole one.
            request.transport.close()
        elif not client_gone:
            await self._durable()
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                await resp.write_eof()
        return resp

    async def _durable(self) -> None:
        """Wait until the ledger has committed this call, so an acknowledged call's spend survives kill -9."""
        if self.policy is not None:
            fut = self.policy.durable()
            if fut is not None:
                await fut

    def _upstream_failed(
        self, call: MeteredCall, upstream: Upstream, error: UpstreamError, style: ErrorStyle
    ) -> web.Response:
        call.finish(_upstream_status(error)[1])
        return _upstream_error_response(upstream, error, call.labels.department, style)

    # -- pass-through routes: authenticated, forwarded to the department's upstream, never billed -------------

    async def handle_count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's ``POST /v1/messages/count_tokens``: routed by the body's model."""
        dept = UNASSIGNED
        try:
            target = _upstream_target(request)
            dept = self._department(request)
            raw, body = await _json_object(request, self.config.gateway)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise GatewayError(400, "The request body has no 'model' (a string).", "invalid_request_error",
                                   "missing_model")  # fmt: skip
            upstream = self._route(model, "anthropic.messages")
        except GatewayError as e:
            self._count_refused(dept, None, None, None, e.outcome)
            return e.response("anthropic")
        return await self._passthrough(request, upstream, target, raw, dept, "anthropic")

    async def handle_response_object(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``GET`` / ``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``: to the
        upstream this department's Responses calls went to (else the first OpenAI-style upstream)."""
        dept = UNASSIGNED
        try:
            target = _upstream_target(request)
            dept = self._department(request)
            upstream = self._responses_upstream.get(dept) or next(
                (u for u in self.config.upstreams if u.provider not in ("anthropic", *_GOOGLE_PROVIDERS)), None
            )
            if upstream is None:
                raise GatewayError(404, "No upstream serves the OpenAI Responses API in this gateway's config.",
                                   "invalid_request_error", "model_not_found")  # fmt: skip
        except GatewayError as e:
            self._count_refused(dept, None, None, None, e.outcome)
            return e.response()
        return await self._passthrough(request, upstream, target, b"", dept, "openai")

    async def _passthrough(
        self, request: web.Request, upstream: Upstream, target: str, raw: bytes, dept: str, style: ErrorStyle
    ) -> web.StreamResponse:
        client, headers = self._upstream_request(request, upstream)
        extra = {"x-tokenfuse-department": dept}
        try:
            up = await client.send(target, headers, raw, stream=False, method=request.method)
            try:
                data = await up.read()
            finally:
                await up.release()
        except UpstreamError as e:
            return _upstream_error_response(upstream, e, dept, style)
        resp_headers = {k: v for k, v in up.headers if k.lower() not in _DROP_RESPONSE}
        resp_headers.update(extra)
        return web.Response(status=up.status, body=data, headers=resp_headers)

    def count_bad_request(self) -> None:
        """Count a request refused before it reached a route (malformed HTTP, an admin body that is not valid)."""
        self._count_refused(UNASSIGNED, None, None, None, "client_error")

    def _count_refused(
        self, dept: str, project: str | None, environment: str | None, model: str | None, outcome: str
    ) -> None:
        try:
            labels = self.meter.labels(department=dept, project=project, environment=environment, model=model)
            self.meter.record(labels, usage=None, outcome=outcome)
        except Exception:
            log_event(log, logging.ERROR, "count_refused_failed", exc_info=True)

    # -- the other routes -----------------------------------------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        data = []
        for u in self.config.upstreams:
            for pattern in u.models:
                data.append({"id": pattern, "object": "model", "owned_by": u.name, "created": 0})
        return web.json_response({"object": "list", "data": data})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def handle_healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_readyz(self, request: web.Request) -> web.Response:
        """503 while not started, or while the policy source is down with ``on_source_error: fail_closed``."""
        ok = self.ready
        detail: dict[str, object] = {"status": "ready" if ok else "starting"}
        if self.policy is not None:
            name, up, age = self.policy.source_health()
            detail["policy_source"] = {
                "name": name,
                "up": up,
                "last_ok_age_seconds": None if age is None else round(age, 3),
            }
            if ok and self.policy.blocks_when_source_down():
                ok = False
                detail["status"] = "policy_source_down"
        return web.json_response(detail, status=200 if ok else 503)

    async def handle_not_found(self, request: web.Request) -> web.Response:
        return error_response(
            404, f"Unknown route {request.method} {request.path}.", "invalid_request_error", "unknown_route"
        )


def _upstream_status(error: UpstreamError) -> tuple[int, str]:
    """504 ``upstream_timeout`` when the upstream was too slow, else 502 ``upstream_unreachable``."""
    return (504, "upstream_timeout") if isinstance(error, UpstreamTimeout) else (502, "upstream_unreachable")


def _upstream_error_response(
    upstream: Upstream, error: UpstreamError, department: str, style: ErrorStyle
) -> web.Response:
    status, code = _upstream_status(error)
    return error_response(status, f"upstream '{upstream.name}': {error}", "api_error", code,
                          {"x-tokenfuse-department": department}, style)  # fmt: skip


def _upstream_target(request: web.Request, native: bool = False) -> str:
    """The path after ``/v1`` (``native``: the whole path, for an upstream whose base URL is the API root, as
    Gemini's is) plus the raw (undecoded) query without a ``key`` parameter, or 400 ``invalid_request_target``."""
    raw_path = request.raw_path
    _, sep, raw_query = raw_path.partition("?")
    # aiohttp's query_string is percent-decoded: check it too, so that %0d%0a cannot become a CR LF anywhere later.
    if _BAD_TARGET.search(raw_path) or _BAD_TARGET.search(request.query_string) or _BAD_TARGET.search(request.path):
        raise GatewayError(
            400,
            "The request target contains a control character, a space or DEL (raw or percent-encoded); "
            "such a target is refused.",
            "invalid_request_error",
            "invalid_request_target",
        )
    path = request.path
    target = path if native else (path[3:] if path.startswith("/v1/") else path)
    if native and raw_query:
        # Gemini's ?key= carries the client's virtual key: it never goes upstream (the upstream key is a header).
        # Compared decoded, as aiohttp reads it for authentication: %6Bey= is a key too.
        raw_query = "&".join(p for p in raw_query.split("&") if p and unquote_plus(p.partition("=")[0]) != "key")
    return target + "?" + raw_query if sep and raw_query else target


async def _json_object(request: web.Request, gw: GatewayConfig) -> tuple[bytes, dict[str, Any]]:
    """The request body as received and as a JSON object, or the 4xx that says why not."""
    if request.content_length is not None and request.content_length > gw.max_body_bytes:
        raise _too_large(gw.max_body_bytes)
    raw = await _read_body(request, gw.max_body_bytes, gw.body_timeout)
    try:
        body = jsonio.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(
            400, "The request body is not valid JSON.", "invalid_request_error", "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", "invalid_request_error", "invalid_json")
    return raw, body


async def _read_body(request: web.Request, limit: int, within_s: float) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(within_s):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                parts.append(chunk)
    except TimeoutError:
        raise GatewayError(
            408,
            f"The request body did not arrive within gateway.body_timeout ({within_s:g} s).",
            "invalid_request_error",
            "body_timeout",
            headers={"connection": "close"},
        ) from None
    except (aiohttp.ClientPayloadError, ValueError, ConnectionError) as e:
        raise GatewayError(400, f"could not read the request body: {e}", "invalid_request_error", "bad_body") from None
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"The request body is larger than gateway.max_body_bytes ({limit} bytes).",
        "invalid_request_error",
        "request_too_large",
    )


GATEWAY_KEY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def make_app(gateway: Gateway, extra_routes: Callable[[web.Application], object] | None = None) -> web.Application:
    """Build the aiohttp application around ``gateway``.

    Args:
        gateway: the state to serve from.
        extra_routes: adds more routes (the admin API) before the catch-all 404.
    """
    app = web.Application(client_max_size=gateway.config.gateway.max_body_bytes + 1024)
    for path in ROUTES:
        app.router.add_post(path, gateway.handle_llm)
    for version in ("v1beta", "v1"):
        app.router.add_post(f"/{version}/models/{{target}}", gateway.handle_gemini)
    app.router.add_post("/v1/messages/count_tokens", gateway.handle_count_tokens)
    for tail in ("/v1/responses/{id}", "/v1/responses/{id}/input_items"):
        app.router.add_get(tail, gateway.handle_response_object)
    app.router.add_delete("/v1/responses/{id}", gateway.handle_response_object)
    app.router.add_get("/v1/models", gateway.handle_models)
    app.router.add_get("/metrics", gateway.handle_metrics)
    app.router.add_get("/healthz", gateway.handle_healthz)
    app.router.add_get("/readyz", gateway.handle_readyz)
    if extra_routes is not None:
        extra_routes(app)
    app.router.add_route("*", "/{tail:.*}", gateway.handle_not_found)
    app.on_startup.append(gateway.startup)
    app.on_cleanup.append(gateway.cleanup)
    app[GATEWAY_KEY] = gateway
    return app
