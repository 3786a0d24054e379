"""The fake upstream's aiohttp server: :class:`FakeUpstream` (faults, steering, recording, dispatch to each API
shape's JSON or SSE answer and error body, the stored Responses objects), its routes (:func:`make_app`),
:class:`FakeUpstreamThread`, :func:`serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Final

from aiohttp import web

from tokenfuse.testing._fake.anthropic import _anthropic_json, _anthropic_stream
from tokenfuse.testing._fake.common import (
    FAULT_HEADER,
    FAULTS,
    LATENCY_HEADER,
    USAGE_HEADER,
    USAGE_KEYS,
    RecordedRequest,
    _BadRequest,
    _dumps,
    _limit,
    _normalise_usage,
    _Plan,
    _plan,
    fake_prompt_tokens,
)
from tokenfuse.testing._fake.google import (
    GOOGLE,
    VERBS,
    _google_array,
    _google_error,
    _google_json,
    _google_stream,
)
from tokenfuse.testing._fake.openai_chat import (
    _chat_json,
    _chat_json_bytes,
    _completions_json,
    _embeddings_json,
    _openai_stream,
)
from tokenfuse.testing._fake.openai_responses import (
    _responses_input_items,
    _responses_json,
    _responses_stream,
    _stored,
)

_MODELS: Final[tuple[str, ...]] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "text-embedding-3-small",
    "claude-sonnet-4-6",
    "gemini-2.5-flash",
)
_SSE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
_JSON_TYPE: Final = "application/json"

# The routes that report no usage, by the name they are recorded under.
COUNT_TOKENS: Final = "anthropic.count_tokens"
RETRIEVE: Final = "openai.responses.retrieve"
INPUT_ITEMS: Final = "openai.responses.input_items"
DELETE: Final = "openai.responses.delete"

_Reply = Callable[[], tuple[int, Any]]
_Answer = Callable[[web.Request, dict[str, Any] | None], _Reply]
"""An unmetered route's answer: checks the request (raising :class:`_BadRequest`), then gives the reply to run
once no fault replaced it: (HTTP status, JSON payload)."""


def _json_payload(
    api: str, n: int, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> dict[str, Any]:
    """The non-stream answer of request number ``n`` for ``api``."""
    if api == "openai.chat":
        return _chat_json(f"chatcmpl-fake{n:010d}", created, model, plan, with_usage)
    if api == "openai.responses":
        return _responses_json(f"resp_fake{n:010d}", created, model, body, plan, with_usage)
    if api == "openai.completions":
        return _completions_json(f"cmpl-fake{n:010d}", created, model, plan, with_usage)
    if api == "openai.embeddings":
        return _embeddings_json(model, body, plan, with_usage)
    if api == GOOGLE:
        return _google_json(_google_id(n), model, plan, with_usage)
    return _anthropic_json(f"msg_fake{n:010d}", model, plan, with_usage)


def _google_id(n: int) -> str:
    return f"fakeResponse{n:010d}"


_OPENAI_ERRORS: Final[Mapping[int, tuple[str, str | None]]] = {
    400: ("invalid_request_error", "invalid_request"),
    404: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def _error_body(api: str, status: int, message: str, param: str | None = None) -> bytes:
    if api.startswith("anthropic."):
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return _dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    if api == GOOGLE:
        return _dumps(_google_error(status, message)).encode()
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", "server_error"))
    return _dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


# ---------------------------------------------------------------------------------------------------------------------
# the server


def _response_missing(rid: str) -> tuple[int, Any]:
    """404 for a Responses ``{id}`` the fake does not keep (never served, ``store: false``, deleted, forgotten)."""
    error = {"message": f"Response with id '{rid}' not found.", "type": "invalid_request_error"}
    return 404, {"error": {**error, "param": None, "code": None}}


def _json_body(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object, else :class:`_BadRequest`."""
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        raise _BadRequest("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _abort(request: web.Request) -> None:
    # abort() (not close()) so no terminating chunk is sent: the client sees a truncated body.
    if request.transport is not None:
        request.transport.abort()


class FakeUpstream:
    """A fake OpenAI-, Anthropic- and Gemini-compatible upstream on loopback.

    Metered routes (each reports usage as below), OpenAI and Anthropic with or without the ``/v1`` prefix:
    ``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/messages``,
    and Gemini's ``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent`` (also under
    ``/v1/models/...``, google-genai 3.x's default api_version). Routes that report nothing (recorded, adding
    nothing to :meth:`reported_totals`): ``GET /v1/models``; Anthropic ``POST /v1/messages/count_tokens``
    (``{"input_tokens": fake_prompt_tokens(body)}``; ``x-fake-usage`` does not apply); and the Responses objects:
    every response ``POST /v1/responses`` served (JSON or stream, not cut, unless ``store: false``; the last
    :attr:`responses_kept`) can be fetched with ``GET /v1/responses/{id}``, its input items listed with
    ``GET /v1/responses/{id}/input_items`` (``order`` desc by default, ``limit``, ``after``), and forgotten with
    ``DELETE /v1/responses/{id}``; an unknown id gets an OpenAI-style 404.

    Usage (so tests can compute the numbers):

    - input tokens = :func:`fake_prompt_tokens` of the request body;
    - output tokens = :func:`fake_completion_tokens`: ``min(limit, default_completion_tokens)``, ``limit`` being the
      first of ``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, ``generationConfig.maxOutputTokens``
      in the body. The answer has exactly that many words, one word per token; ``finish_reason`` is ``length``
      (Anthropic ``max_tokens``, Gemini ``MAX_TOKENS``) when the limit cut the natural answer short. The request's
      ``model`` is echoed back (Gemini: the path's, as ``modelVersion``).
    - header ``x-fake-usage`` (JSON object, any subset, e.g. ``{"prompt_tokens": 100, "completion_tokens": 20,
      "cached_tokens": 10, "reasoning_tokens": 5, "cache_write_tokens": 0}``; :data:`USAGE_KEYS` and the providers'
      own names are accepted) or :meth:`set_usage` replace those numbers exactly (not capped by ``max_tokens``);
      the visible answer then has ``output - reasoning`` words.
    - Each API reports only what its shape can carry: Chat and Responses report cached and reasoning tokens,
      Anthropic cache reads and writes (its wire ``input_tokens`` excludes both, as the real API's does), Gemini
      cached (``cachedContentTokenCount``, included in ``promptTokenCount``) and reasoning tokens
      (``thoughtsTokenCount``, excluded from ``candidatesTokenCount``; ``totalTokenCount`` is input + output; both
      fields only when non-zero), legacy completions input/output, embeddings input only. What was not reported
      is recorded as 0.
    - Streams: Chat and legacy completions report usage only with ``stream_options.include_usage`` (a last chunk
      with ``choices: []``; every earlier chunk then has ``"usage": null``); Responses in ``response.completed``;
      Anthropic input in ``message_start`` (with ``output_tokens`` 1) and the final counts in ``message_delta``.
      Gemini streams SSE only with ``?alt=sse`` (what the SDKs send): one ``data: {chunk}\\r\\n\\r\\n`` event per
      word, no ``event:`` lines and no end marker, every chunk with the running ``usageMetadata``
      (``candidatesTokenCount`` growing, prompt and thoughts whole), the last with ``finishReason``; without ``alt=sse`` the
      same chunks come as one JSON array (recorded as not a stream).

    Faults, by header ``x-fake-fault: NAME`` for one request, or :meth:`inject` for the next N API requests (the
    header wins and does not consume the queue):

    - ``http_500``; ``http_429`` with a ``retry-after`` header (:attr:`retry_after`); both with the provider's error body;
    - ``timeout``: sleeps :attr:`timeout_seconds`; :meth:`stop` wakes it and drops the connection, a client that
      goes away cancels it;
    - ``cut``: the body stops mid-way and the connection is dropped: no usage, no ``[DONE]`` (an Anthropic stream
      has sent ``message_start``, with its input usage, before the cut, as the real API would have; a Gemini
      stream half its chunks, and the running usage of the last one sent is what is recorded);
    - ``no_usage``: a valid answer without usage anywhere;
    - ``slow_first_chunk``: headers at once (streams), then :attr:`slow_first_chunk_seconds` before the body.

    The routes that report nothing but ``GET /v1/models`` take faults too (a DELETE under ``http_500`` deletes
    nothing); ``no_usage`` changes nothing there.

    Header ``x-fake-latency: SECONDS`` overrides ``latency`` for one request. A bad body (not a JSON object, no
    ``model``, Anthropic without ``max_tokens``, Gemini without ``contents``) or a bad ``x-fake-*`` header gets
    HTTP 400 with the provider's error shape (Google's: ``{"error": {"code", "message", "status"}}``). Every
    request's headers are recorded, so the key it carried (``authorization``, ``x-api-key``, ``x-goog-api-key``)
    can be checked.

    Args:
        host: interface to bind.
        port: TCP port; 0 picks a free one (read :attr:`url` after :meth:`start`).
        latency: seconds before each response (non-stream) or before the first chunk (stream).
        chunk_delay: seconds between SSE chunks; 0 writes a whole stream at once.
        default_completion_tokens: length of the natural answer, in tokens (words).
        record: keep every request in :attr:`requests`; turn off for long runs (totals are kept either way).
    """

    timeout_seconds: float = 3600.0
    """How long the ``timeout`` fault sleeps (longer than any client timeout)."""
    slow_first_chunk_seconds: float = 2.0
    """Pause before the first body byte under the ``slow_first_chunk`` fault."""
    retry_after: float = 1.0
    """Value of the ``retry-after`` header sent with ``http_429``."""
    responses_kept: int = 1000
    """How many served Responses objects ``GET /v1/responses/{id}`` can still find (the oldest are forgotten)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        default_completion_tokens: int = 16,
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.default_completion_tokens = default_completion_tokens
        self.record = record
        self.requests: list[RecordedRequest] = []
        self._faults: deque[str] = deque()
        self._usage_override: dict[str, int] | None = None
        self._totals = dict.fromkeys(USAGE_KEYS, 0)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._responses: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:43117``; valid after :meth:`start`."""
        if self._runner is None:
            raise RuntimeError("FakeUpstream.url: call start() (or enter the context manager) first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving; with ``port=0`` the chosen port is then in :attr:`port` and :attr:`url`."""
        if self._runner is not None:
            raise RuntimeError("FakeUpstream.start: already started")
        self._closing = asyncio.Event()
        # handler_cancellation: a client that gives up on a `timeout` fault cancels the sleeping handler.
        runner = web.AppRunner(make_app(self), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving: wake requests held by the ``timeout`` fault (their connections are dropped), close all."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def inject(self, fault: str, count: int = 1) -> None:
        """Give the next ``count`` API requests (not ``GET /v1/models``) this fault, after any already queued.

        Args:
            fault: one of :data:`FAULTS`.
            count: how many requests get it.
        """
        if fault not in FAULTS:
            raise ValueError(f"FakeUpstream.inject: unknown fault {fault!r}; use one of {sorted(FAULTS)}")
        self._faults.extend([fault] * count)

    def set_usage(self, usage: Mapping[str, int] | None) -> None:
        """Report exactly these numbers for every following request, until called with None.

        The ``x-fake-usage`` header of a request is applied on top of this.

        Args:
            usage: usage keys (:data:`USAGE_KEYS` or the aliases the header takes) to their counts.
        """
        try:
            self._usage_override = None if usage is None else _normalise_usage(usage)
        except _BadRequest as e:
            raise ValueError(e.message.replace(USAGE_HEADER, "FakeUpstream.set_usage")) from None

    def reported_totals(self) -> dict[str, int]:
        """Sum of every usage the fake reported, keyed by :data:`USAGE_KEYS`."""
        return dict(self._totals)

    def reset(self) -> None:
        """Forget recorded requests and totals, queued faults, the :meth:`set_usage` override and stored responses."""
        self.requests.clear()
        self._responses.clear()
        self._faults.clear()
        self._usage_override = None
        self._totals = dict.fromkeys(USAGE_KEYS, 0)

    # -- request handling ---------------------------------------------------------------------------------------

    def _report(self, rec: RecordedRequest, usage: dict[str, int] | None) -> None:
        if usage is None:
            return
        rec.usage = usage
        totals = self._totals
        for key in USAGE_KEYS:
            totals[key] += usage[key]

    def _steer(self, header: str | None) -> dict[str, int] | None:
        if header is None:
            return self._usage_override
        try:
            spec = json.loads(header)
        except ValueError:
            raise _BadRequest(f"{USAGE_HEADER}: not JSON: {header!r}", USAGE_HEADER) from None
        if not isinstance(spec, dict):
            raise _BadRequest(f"{USAGE_HEADER}: must be a JSON object, got {header!r}", USAGE_HEADER)
        steer = _normalise_usage(spec)
        return steer if self._usage_override is None else {**self._usage_override, **steer}

    def _fault(self, header: str | None) -> str | None:
        if header is not None:
            fault = header.strip()
            if fault not in FAULTS:
                raise _BadRequest(f"{FAULT_HEADER}: unknown fault {fault!r}; use one of {sorted(FAULTS)}", FAULT_HEADER)
            return fault
        if self._faults:
            return self._faults.popleft()
        return None

    def _latency(self, header: str | None) -> float:
        if header is None:
            return self.latency
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise _BadRequest(f"{LATENCY_HEADER}: must be a number of seconds >= 0, got {header!r}", LATENCY_HEADER)
        return value

    async def _hold(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when :meth:`stop` cut it short."""
        closing = self._closing
        if closing is None:
            await asyncio.sleep(seconds)
            return True
        try:
            await asyncio.wait_for(closing.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: the OpenAI model list."""
        if self.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append(RecordedRequest(request.method, request.path, "openai.models", headers, status=200))
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "tokenfuse-fake"} for m in _MODELS]
        return web.Response(body=_dumps({"object": "list", "data": data}).encode(), content_type=_JSON_TYPE)

    async def _handle_api(
        self, request: web.Request, api: str, path_model: str | None = None, path_stream: bool = False
    ) -> web.StreamResponse:
        """Answer one API request of shape ``api`` (see :data:`_REPORTABLE` for the shapes).

        Args:
            request: the aiohttp request.
            api: the API shape the route serves.
            path_model: the model named in the path (Gemini), instead of the body's ``model``.
            path_stream: whether the path asks for a stream (Gemini's ``streamGenerateContent``).
        """
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()} if self.record else {}
        rec = RecordedRequest(request.method, request.path, api, headers)
        try:
            body = _json_body(raw)
            rec.body = body
            if api == GOOGLE:
                model: Any = path_model
                contents = body.get("contents")
                if not isinstance(contents, list) or not contents:
                    raise _BadRequest("* GenerateContentRequest.contents: contents is not specified", "contents")
            else:
                model = body.get("model")
                if not isinstance(model, str) or not model:
                    raise _BadRequest("missing required field 'model' (a non-empty string)", "model")
            if api == "anthropic.messages" and _limit(body) is None:
                raise _BadRequest("max_tokens: Field required", "max_tokens")
            plan = _plan(api, body, self._steer(request.headers.get(USAGE_HEADER)), self.default_completion_tokens)
            latency = self._latency(request.headers.get(LATENCY_HEADER))
            fault = self._fault(request.headers.get(FAULT_HEADER))
        except _BadRequest as e:
            return self._bad_request(rec, e)
        rec.fault = fault
        if api == GOOGLE:
            # The real API streams SSE only with ?alt=sse (the SDKs' way); without it, one JSON array of chunks.
            stream = path_stream and request.query.get("alt") == "sse"
        else:
            stream = api != "openai.embeddings" and body.get("stream") is True
        rec.stream = stream
        if self.record:
            self.requests.append(rec)

        refused = await self._before_answer(request, rec, api, latency, fault)
        if refused is not None:
            return refused

        with_usage = fault != "no_usage"
        n = next(self._ids)
        created = int(time.time())
        if stream:
            return await self._send_stream(request, rec, api, body, model, plan, fault, with_usage, n, created)

        if api == "openai.chat" and with_usage:
            data = _chat_json_bytes(f"chatcmpl-fake{n:010d}", created, model, plan)
        elif api == GOOGLE and path_stream:
            data = _google_array(_google_id(n), model, plan, with_usage).encode()
        else:
            payload = _json_payload(api, n, created, model, body, plan, with_usage)
            if api == "openai.responses" and fault != "cut":
                self._keep_response(payload, body)
            data = _dumps(payload).encode()
        return await self._send_json(request, rec, data, fault, plan.usage if with_usage else None)

    def _bad_request(self, rec: RecordedRequest, e: _BadRequest) -> web.StreamResponse:
        rec.status = 400
        if self.record:
            self.requests.append(rec)
        return web.Response(status=400, body=_error_body(rec.api, 400, e.message, e.param), content_type=_JSON_TYPE)

    async def _before_answer(
        self, request: web.Request, rec: RecordedRequest, api: str, latency: float, fault: str | None
    ) -> web.StreamResponse | None:
        """Apply the latency and the faults that replace the answer (timeout, http_500, http_429); None to answer."""
        if latency > 0:
            await asyncio.sleep(latency)
        if fault == "timeout" and not await self._hold(self.timeout_seconds):
            _abort(request)
            return web.Response(status=503)
        if fault == "http_500":
            rec.status = 500
            body_500 = _error_body(api, 500, "The fake upstream was told to fail (x-fake-fault: http_500).")
            return web.Response(status=500, body=body_500, content_type=_JSON_TYPE)
        if fault == "http_429":
            rec.status = 429
            body_429 = _error_body(api, 429, "Rate limit reached (fake upstream, x-fake-fault: http_429).")
            headers_429 = {"retry-after": f"{self.retry_after:g}"}
            return web.Response(status=429, body=body_429, content_type=_JSON_TYPE, headers=headers_429)
        return None

    async def _send_json(
        self,
        request: web.Request,
        rec: RecordedRequest,
        data: bytes,
        fault: str | None,
        usage: dict[str, int] | None,
        status: int = 200,
    ) -> web.StreamResponse:
        """Send a JSON answer under the ``slow_first_chunk`` and ``cut`` faults; ``usage`` is reported unless cut."""
        if fault == "slow_first_chunk" and not await self._hold(self.slow_first_chunk_seconds):
            _abort(request)
            return web.Response(status=503)
        if fault == "cut":
            resp = web.StreamResponse(status=status, headers={"Content-Type": _JSON_TYPE})
            resp.content_length = len(data)
            with contextlib.suppress(ConnectionResetError):
                await resp.prepare(request)
                rec.status = status
                await resp.write(data[: len(data) // 2])
            _abort(request)
            return resp
        rec.status = status
        self._report(rec, usage)
        return web.Response(status=status, body=data, content_type=_JSON_TYPE)

    async def _send_stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        api: str,
        body: Mapping[str, Any],
        model: str,
        plan: _Plan,
        fault: str | None,
        with_usage: bool,
        n: int,
        created: int,
    ) -> web.StreamResponse:
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        if api == "openai.chat":
            sse = _openai_stream(True, f"chatcmpl-fake{n:010d}", created, model, plan, include_usage, with_usage)
            reported = include_usage and with_usage
        elif api == "openai.completions":
            sse = _openai_stream(False, f"cmpl-fake{n:010d}", created, model, plan, include_usage, with_usage)
            reported = include_usage and with_usage
        elif api == "openai.responses":
            sse = _responses_stream(f"resp_fake{n:010d}", created, model, body, plan, with_usage)
            reported = with_usage
        elif api == GOOGLE:
            sse = _google_stream(_google_id(n), model, plan, with_usage)
            reported = with_usage
        else:
            sse = _anthropic_stream(f"msg_fake{n:010d}", model, plan, with_usage)
            reported = with_usage

        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            rec.status = 200
            if fault == "slow_first_chunk" and not await self._hold(self.slow_first_chunk_seconds):
                _abort(request)
                return resp
            cut = fault == "cut"
            pieces = sse.pieces[: sse.cut_at] if cut else sse.pieces
            if sse.final is not None and not cut:
                self._keep_response(sse.final, body)
            # Usage is recorded just before the last bytes go out: a client that has read the whole stream (an SDK
            # stops at [DONE]) must find it recorded, even before this handler resumes.
            final = plan.usage if reported else None
            if self.chunk_delay > 0:
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(self.chunk_delay)
                    if i == len(pieces) - 1 and not cut:
                        self._report(rec, final)
                    await resp.write(piece.encode())
            else:
                if not cut:
                    self._report(rec, final)
                if pieces:
                    await resp.write("".join(pieces).encode())
            if cut:
                self._report(rec, sse.cut_usage)
                _abort(request)
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away (an app closing a stream early, a load generator stopping): what it did not
            # receive was not reported, and it is no server error worth a traceback.
            return resp
        return resp

    # -- Gemini ---------------------------------------------------------------------------------------------------

    async def _handle_google(self, request: web.Request) -> web.StreamResponse:
        """``POST /{v1beta,v1}/models/{model}:generateContent`` or ``:streamGenerateContent``."""
        model, _, verb = request.match_info["target"].partition(":")
        if model and verb in VERBS:
            return await self._handle_api(request, GOOGLE, model, verb == "streamGenerateContent")
        await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()} if self.record else {}
        rec = RecordedRequest(request.method, request.path, GOOGLE, headers, status=404)
        if self.record:
            self.requests.append(rec)
        message = f"Method not found: {request.path} (use models/MODEL:generateContent or :streamGenerateContent)."
        return web.Response(status=404, body=_error_body(GOOGLE, 404, message), content_type=_JSON_TYPE)

    # -- routes that report no usage: Anthropic count_tokens, stored Responses objects --------------------------

    async def _handle_unmetered(
        self,
        request: web.Request,
        api: str,
        answer: _Answer,
        with_body: bool,
    ) -> web.StreamResponse:
        """Answer a request that reports no usage; latency and faults apply as to any API request.

        Args:
            request: the aiohttp request.
            api: the name it is recorded under.
            answer: checks the request and its parsed body, and gives the reply, run only when no fault replaces
                it (a DELETE under ``http_500`` deletes nothing).
            with_body: whether the request has a JSON object body (with ``model``).
        """
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()} if self.record else {}
        rec = RecordedRequest(request.method, request.path, api, headers)
        body: dict[str, Any] | None = None
        try:
            if with_body:
                body = rec.body = _json_body(raw)
                model = body.get("model")
                if not isinstance(model, str) or not model:
                    raise _BadRequest("model: Field required", "model")
            latency = self._latency(request.headers.get(LATENCY_HEADER))
            fault = self._fault(request.headers.get(FAULT_HEADER))
            reply = answer(request, body)
        except _BadRequest as e:
            return self._bad_request(rec, e)
        rec.fault = fault
        if self.record:
            self.requests.append(rec)
        refused = await self._before_answer(request, rec, api, latency, fault)
        if refused is not None:
            return refused
        status, payload = reply()
        return await self._send_json(request, rec, _dumps(payload).encode(), fault, None, status)

    def _count_tokens(self, request: web.Request, body: dict[str, Any] | None) -> _Reply:
        n = fake_prompt_tokens(body or {})
        return lambda: (200, {"input_tokens": n})

    def _keep_response(self, response: dict[str, Any], body: Mapping[str, Any]) -> None:
        """Remember a served Responses object (unless the request said ``store: false``), the oldest going first."""
        if not _stored(body):
            return
        rid = response["id"]
        kept = self._responses
        kept[rid] = (response, _responses_input_items(rid, body))
        kept.move_to_end(rid)
        while len(kept) > self.responses_kept:
            kept.popitem(last=False)

    def _retrieve_response(self, request: web.Request, body: dict[str, Any] | None) -> _Reply:
        rid = request.match_info["id"]

        def reply() -> tuple[int, Any]:
            kept = self._responses.get(rid)
            return (200, kept[0]) if kept is not None else _response_missing(rid)

        return reply

    def _delete_response(self, request: web.Request, body: dict[str, Any] | None) -> _Reply:
        rid = request.match_info["id"]

        def reply() -> tuple[int, Any]:
            if self._responses.pop(rid, None) is None:
                return _response_missing(rid)
            return 200, {"id": rid, "object": "response.deleted", "deleted": True}

        return reply

    def _list_input_items(self, request: web.Request, body: dict[str, Any] | None) -> _Reply:
        """The input items of a stored response, paged like the real API: ``order`` (default ``desc``), ``after``,
        ``limit`` (1 to 100, default 20)."""
        query = request.query
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _BadRequest(f"Invalid value for 'order': {order!r}; use 'asc' or 'desc'.", "order")
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _BadRequest(f"Invalid 'limit': {query.get('limit')!r}; use an integer from 1 to 100.", "limit")
        rid = request.match_info["id"]
        after = query.get("after")

        def reply() -> tuple[int, Any]:
            kept = self._responses.get(rid)
            if kept is None:
                return _response_missing(rid)
            items = kept[1] if order == "asc" else kept[1][::-1]
            if after is not None:
                ids = [item["id"] for item in items]
                items = items[ids.index(after) + 1 :] if after in ids else []
            page = items[:limit]
            return 200, {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }

        return reply


_API_ROUTES: Final[tuple[tuple[str, str], ...]] = (
    ("/chat/completions", "openai.chat"),
    ("/responses", "openai.responses"),
    ("/embeddings", "openai.embeddings"),
    ("/completions", "openai.completions"),
    ("/messages", "anthropic.messages"),
)


def make_app(upstream: FakeUpstream) -> web.Application:
    """The aiohttp application serving ``upstream``'s routes: the OpenAI and Anthropic ones with and without the
    ``/v1`` prefix, Gemini's under ``/v1beta`` and ``/v1`` (``/models/{model}:generateContent``).

    Args:
        upstream: the server whose settings, fault queue and record the handlers use.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)

    def bind(api: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await upstream._handle_api(request, api)

        return handler

    def unmetered(
        api: str, answer: _Answer, with_body: bool = False
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await upstream._handle_unmetered(request, api, answer, with_body)

        return handler

    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/messages/count_tokens", unmetered(COUNT_TOKENS, upstream._count_tokens, True))
        for path, api in _API_ROUTES:
            app.router.add_post(prefix + path, bind(api))
        app.router.add_get(prefix + "/models", upstream._handle_models)
        app.router.add_get(prefix + "/responses/{id}", unmetered(RETRIEVE, upstream._retrieve_response))
        app.router.add_delete(prefix + "/responses/{id}", unmetered(DELETE, upstream._delete_response))
        app.router.add_get(prefix + "/responses/{id}/input_items", unmetered(INPUT_ITEMS, upstream._list_input_items))
    for version in ("/v1beta", "/v1"):
        app.router.add_post(version + "/models/{target}", upstream._handle_google)
    return app


class FakeUpstreamThread:
    """A :class:`FakeUpstream` running in a background thread with its own event loop, for synchronous tests.

    ``with FakeUpstreamThread() as upstream:`` gives the running :class:`FakeUpstream` (``url``, ``requests``,
    ``inject`` …); its methods that only touch plain data are safe to call from the test thread.

    Args:
        host: see :class:`FakeUpstream`.
        port: see :class:`FakeUpstream`.
        latency: see :class:`FakeUpstream`.
        chunk_delay: see :class:`FakeUpstream`.
        default_completion_tokens: see :class:`FakeUpstream`.
        record: see :class:`FakeUpstream`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        default_completion_tokens: int = 16,
        record: bool = True,
    ) -> None:
        self.upstream = FakeUpstream(
            host=host,
            port=port,
            latency=latency,
            chunk_delay=chunk_delay,
            default_completion_tokens=default_completion_tokens,
            record=record,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        """Start the loop thread and the server; returns once it accepts connections.

        Args:
            timeout: seconds to wait for the server to come up.
        """
        if self._thread is not None:
            raise RuntimeError("FakeUpstreamThread.start: already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tokenfuse-fake-upstream", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.start(), loop).result(timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        return self.upstream

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, then the loop thread.

        Args:
            timeout: seconds to wait for the server to stop.
        """
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.stop(), loop).result(timeout)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8081, latency: float = 0.0) -> None:
    """Run a fake upstream until Ctrl-C (``tokenfuse fake-upstream``); requests are counted, not recorded.

    Args:
        host: interface to bind.
        port: TCP port.
        latency: seconds before each response.
    """

    async def run() -> None:
        async with FakeUpstream(host=host, port=port, latency=latency, record=False) as upstream:
            print(f"fake upstream listening on {upstream.url} (OpenAI: {upstream.url}/v1); Ctrl-C stops", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
