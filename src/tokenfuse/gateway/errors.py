"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import json
from collections.abc import Mapping

from aiohttp import web

__all__ = ["GatewayError", "error_response"]


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

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.type, self.code, self.headers)


def error_response(
    status: int, message: str, type_: str, code: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """Build an OpenAI-style JSON error response."""
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})
    return web.Response(status=status, body=body.encode(), content_type="application/json", headers=headers)
