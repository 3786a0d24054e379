"""Error responses in the route's API style (`tokenfuse.exporter.admission.error_body`), with the right status."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from tokenfuse.exporter.admission import ErrorStyle, error_body

__all__ = ["ErrorStyle", "GatewayError", "error_body", "error_response"]


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
