"""`MeteredCall`: the life of one metered LLM call, the same for the instrumented client and the gateway.

begin (bounded labels, then admission through a `Policy`), observe (the response head, then a whole body or stream
chunks), finish (record once, settle once). What is billed when the provider said nothing, or was cut off, is decided
here and nowhere else: the reported usage when the answer ended where its framing said; otherwise the larger of what
was reported and an estimate from everything sent and seen, flagged as estimated.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from tokenfuse.exporter.admission import Admission, Policy
from tokenfuse.exporter.labels import CallLabels
from tokenfuse.exporter.meter import CallRecord, Meter
from tokenfuse.logs import log_event
from tokenfuse.metering.estimate import estimate_prompt_tokens, estimate_usage, max_output_tokens
from tokenfuse.metering.extract import extract_usage, response_text
from tokenfuse.metering.stream import StreamUsageParser
from tokenfuse.metering.types import API_OPERATIONS, Api, Usage

__all__ = ["MAX_JSON_BODY", "MeteredCall"]

log = logging.getLogger("tokenfuse.exporter")

MAX_JSON_BODY = 16 * 1024 * 1024
"""A non-streamed body larger than this is not kept for metering (the call is estimated instead)."""

_warned_encodings: set[str] = set()


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...


class _Brotli:
    """brotli's decompressor names its method ``process``."""

    __slots__ = ("_d",)

    def __init__(self, d: Any) -> None:
        self._d = d

    def decompress(self, data: bytes) -> bytes:
        return bytes(self._d.process(data))


def _decoder(encoding: str) -> _Decoder | bool | None:
    """A decompressor for ``Content-Encoding``; None for identity; False when it cannot be decoded here."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc == "gzip":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if enc == "deflate":
        return zlib.decompressobj()
    try:
        if enc == "br":
            import brotli  # type: ignore[import-not-found,import-untyped,unused-ignore]

            return _Brotli(brotli.Decompressor())
        if enc == "zstd":
            import zstandard  # type: ignore[import-not-found,import-untyped,unused-ignore]

            return zstandard.ZstdDecompressor().decompressobj()  # type: ignore[no-any-return,unused-ignore]
    except ImportError:
        pass
    if enc not in _warned_encodings:
        _warned_encodings.add(enc)
        log_event(log, logging.WARNING, "undecodable_content_encoding", encoding=enc,
                  message=f"cannot decode content-encoding {enc!r} for metering; such calls are estimated")  # fmt: skip
    return False


class MeteredCall:
    """One call in flight.

    Args:
        meter: where the call is recorded.
        api: the API shape.
        labels: bounded labels (``model`` is the model asked for).
        request_model: the model the client asked for, if known.
        request_json: the parsed request body, for estimates and admission.
        start: `time.perf_counter` at the start of the call (default: now).
    """

    __slots__ = (
        "_body",
        "_body_size",
        "_decoder",
        "_done",
        "_ended",
        "_parser",
        "_policy",
        "admission",
        "api",
        "labels",
        "meter",
        "request_json",
        "request_model",
        "start",
        "status",
    )

    def __init__(
        self,
        meter: Meter,
        api: Api,
        labels: CallLabels,
        request_model: str | None,
        request_json: Mapping[str, Any] | None,
        start: float | None = None,
    ) -> None:
        self.meter = meter
        self.api: Api = api
        self.labels = labels
        self.request_model = request_model
        self.request_json = request_json
        self.start = time.perf_counter() if start is None else start
        self.status = 0
        self.admission: Admission | None = None
        self._policy: Policy | None = None
        self._parser: StreamUsageParser | None = None
        self._body: list[bytes] | None = None
        self._body_size = 0
        self._decoder: _Decoder | bool | None = None
        self._done = False
        self._ended = False

    # -- begin ---------------------------------------------------------------------------------------------

    def admit(self, policy: Policy | None) -> Admission | None:
        """Reserve the call's worst case (prompt estimate + its output maximum, else the policy's default).

        Returns:
            The admission; None without a policy, or when the check itself failed (the call then goes out
            unenforced, and that is logged). A refusal is recorded here, once, as ``blocked``; `finish` then
            records nothing more.
        """
        if policy is None:
            return None
        try:
            body = self.request_json or {}
            dept = self.labels.department
            prompt = (
                policy.prompt_reservation(estimate_prompt_tokens(self.api, body, self.request_model))
                if policy.limited(dept)
                else 0
            )
            admission = policy.admit(
                dept,
                input_tokens=prompt,
                max_output_tokens=max_output_tokens(self.api, body, policy.default_max_tokens),
                provider=self.labels.provider,
                model=self.labels.model,
            )
        except Exception:
            log_event(log, logging.ERROR, "policy_check_failed", exc_info=True,
                      message="the call goes out unenforced")  # fmt: skip
            return None
        if admission.admitted:
            self._policy = policy
            self.admission = admission
        else:
            self._done = True
            self.meter.blocked(self.labels, admission.reason or "fuse_open")
        return admission

    # -- observe -------------------------------------------------------------------------------------------

    def on_head(self, status: int, content_type: bytes, content_encoding: bytes = b"") -> None:
        """The response head arrived: a stream (``text/event-stream``) is parsed as it comes, a body is kept."""
        self.status = status
        if status >= 400:
            return
        dec = _decoder(content_encoding.decode("latin-1")) if content_encoding else None
        self._decoder = dec
        if dec is False:
            return
        if content_type.find(b"text/event-stream") >= 0:  # not ``in``: see metering.stream
            self._parser = StreamUsageParser(self.api)
        else:
            self._body = []

    def on_cut_answer(self) -> None:
        """An answer's head arrived but its body broke off before the front door saw the head (a library that
        buffers the start of a body): bill it as a cut body, the prompt estimate, not as no answer at all."""
        if self.status == 0:
            self.on_head(200, b"")

    def on_body(self, data: bytes) -> None:
        """The whole body, already decoded (a response read before it reached the observer)."""
        self._decoder = None
        if self._body is not None and len(data) <= MAX_JSON_BODY:
            self._body.append(data)
        else:
            self.feed(data)
        self._ended = True

    def sink(self) -> Callable[[bytes], None]:
        """What a front door calls with each raw chunk: the stream parser's own ``feed`` when nothing needs
        decoding (one call per chunk instead of two), else `feed`."""
        parser = self._parser
        if parser is not None and not self._decoder:
            return parser.feed
        return self.feed

    def feed(self, chunk: bytes) -> None:
        """The next raw (possibly encoded) bytes of the body."""
        try:
            dec = self._decoder
            if dec:
                assert not isinstance(dec, bool)
                chunk = dec.decompress(chunk)
            if self._parser is not None:
                self._parser.feed(chunk)
            elif self._body is not None:
                self._body_size += len(chunk)
                if self._body_size <= MAX_JSON_BODY:
                    self._body.append(chunk)
                else:
                    self._body = None
        except Exception:
            log.debug("metering could not read a chunk", exc_info=True)
            self._parser = None
            self._body = None

    @property
    def ended(self) -> bool:
        """Whether the body was seen to its framed end."""
        return self._ended

    def end(self) -> None:
        """The body ended where its framing said: what it reported is final."""
        self._ended = True

    # -- finish --------------------------------------------------------------------------------------------

    def finish(self, error_type: str = "") -> CallRecord | None:
        """Record the call and settle its reservation, once; later calls do nothing. Never raises.

        Args:
            error_type: why the call did not complete normally (``upstream_timeout``, ``client_closed``, an
                exception's name, …); empty when it did.

        Returns:
            The record, or None when the call was already finished (or refused) or recording failed.
        """
        if self._done:
            return None
        self._done = True
        rec = None
        try:
            rec = self._record(error_type)
        except Exception:
            log_event(log, logging.ERROR, "metering_failed", stage="record", exc_info=True,
                      message="the call itself was not affected")  # fmt: skip
        policy, admission = self._policy, self.admission
        if policy is not None and admission is not None:
            try:
                policy.settle(admission.reservation, rec)
            except Exception:
                log_event(log, logging.ERROR, "settle_failed", exc_info=True)
        return rec

    def _record(self, error_type: str) -> CallRecord:
        status = self.status
        usage: Usage | None = None
        if status == 0:
            outcome = "upstream_error"  # no answer at all: nothing is known to have been processed
            error_type = error_type or "no_response"
        elif status >= 400:
            outcome = "upstream_error" if status >= 500 or status == 429 else "client_error"
            error_type = error_type or str(status)
        else:
            usage = self._usage()
            # A stream that started is the app's answer even when cut; a body cut short is no answer.
            outcome = "success" if self._ended or self._parser is not None else "upstream_error"
        return self.meter.record(
            self.labels,
            usage=usage,
            outcome=outcome,
            operation=API_OPERATIONS.get(self.api, "chat"),
            request_model=self.request_model,
            duration=time.perf_counter() - self.start,
            error_type=error_type,
        )

    def _usage(self) -> Usage:
        """What to bill for a 2xx answer (see the module docstring)."""
        reported: Usage | None = None
        final = False
        text = ""
        chars: int | None = None
        data: bytes | None = None
        parser = self._parser
        if parser is not None:
            reported = parser.result()
            final = reported is not None and (self._ended or parser.usage_final)
            text, chars = parser.output_text, parser.output_chars
        elif self._body is not None and self._ended:
            data = b"".join(self._body)
            reported = extract_usage(self.api, data)
            final = reported is not None
        if reported is not None and not self.meter.believable(
            self.labels.provider, reported.model or self.labels.model, reported
        ):
            reported, final = None, False  # e.g. prompt_tokens: 2^53 - 1: estimated instead, and flagged
        if reported is None and data is not None:
            text = response_text(self.api, data)
        if reported is not None and final:
            return reported
        est = estimate_usage(self.api, self.request_json, text, self.request_model, output_chars=chars)
        if reported is None:
            return est
        # Cut off after partial usage (Anthropic's message_start says output_tokens: 1): bill the larger.
        return reported._replace(
            input_tokens=max(reported.input_tokens, est.input_tokens),
            output_tokens=max(reported.output_tokens, est.output_tokens),
            estimated=True,
        )
