"""Error responses in the route's API style, with the right status.

OpenAI routes answer ``{"error": {"message", "type", "param", "code"}}``; Anthropic routes answer
``{"type": "error", "error": {"type", "message", "code"}}`` so that each SDK raises its own typed error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from aiohttp import web

__all__ = ["ErrorStyle", "GatewayError", "error_body", "error_response"]

ErrorStyle = Literal["openai", "anthropic"]

# OpenAI error types → Anthropic's (https://docs.anthropic.com/en/api/errors); unknown ones pass unchanged.
_ANTHROPIC_TYPES = {
    "budget_exceeded": "rate_limit_error",
    "api_error": "api_error",
}
_ANTHROPIC_BY_STATUS = {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


class GatewayError(Exception):
    """A request the gateway refuses; carries everything the error response needs.

    Args:
        status: HTTP status.
        message: what is wrong and how to fix it.
        type_: OpenAI error ``type`` (``invalid_request_error``, ``authentication_error``, …).
        code: stable machine-readable code.
        outcome: the ``tokenfuse_requests_total`` outcome it counts as.
        headers: extra response headers.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        outcome: str = "client_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.outcome = outcome
        self.headers = dict(headers or {})

    def response(self, style: ErrorStyle = "openai") -> web.Response:
        return error_response(self.status, self.message, self.type, self.code, self.headers, style)


def error_body(status: int, message: str, type_: str, code: str, style: ErrorStyle = "openai") -> bytes:
    """The JSON error body of ``style``."""
    if style == "anthropic":
        atype = _ANTHROPIC_BY_STATUS.get(status) or _ANTHROPIC_TYPES.get(type_, type_)
        return orjson.dumps({"type": "error", "error": {"type": atype, "message": message, "code": code}})
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str,
    headers: Mapping[str, str] | None = None,
    style: ErrorStyle = "openai",
) -> web.Response:
    """Build a JSON error response in the route's API style."""
    return web.Response(
        status=status,
        body=error_body(status, message, type_, code, style),
        content_type="application/json",
        headers=headers,
    )
