"""The gateway's listening side hardened: a head deadline, a connection cap, one log line per malformed request.

aiohttp parses HTTP; this module only bounds what a client may hold. A client that has not sent a whole request head
within ``gateway.header_timeout`` (slowloris), or that arrives beyond ``gateway.max_connections``, is disconnected;
a request aiohttp's parser refuses gets a JSON 400, one structured log line and a count, not a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from tokenfuse.exporter.admission import error_body

__all__ = ["GuardedServer", "Limits"]

log = logging.getLogger("tokenfuse.gateway")


class Limits:
    """What one client connection may hold.

    Args:
        header_timeout: seconds to a whole request head, from connecting (first request) or from a head's first byte.
        max_connections: open client connections; more are closed at once.
        on_bad_request: called once per malformed request (it counts it).
    """

    __slots__ = ("header_timeout", "max_connections", "on_bad_request")

    def __init__(self, header_timeout: float, max_connections: int, on_bad_request: Callable[[], None]) -> None:
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.on_bad_request = on_bad_request


class _GuardedHandler(RequestHandler):
    __slots__ = ("_head_deadline", "_limits")

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._limits.max_connections:
            log.warning(json.dumps({"event": "connection_refused", "reason": "max_connections",
                                    "max_connections": self._limits.max_connections}))  # fmt: skip
            self.force_close()
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self._loop.call_later(self._limits.header_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self.transport is not None and not self._messages and self._current_request is None:
            log.info(json.dumps({"event": "header_timeout", "header_timeout_s": self._limits.header_timeout}))
            self.force_close()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
        elif not self._messages and self._current_request is None:
            self._arm()  # bytes of a new head are arriving: it must be whole within header_timeout

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        # A request the parser refused: cheap for anyone to send, so no traceback, one line, counted.
        log.info(json.dumps({"event": "bad_http_request", "status": status, "remote": request.remote,
                             "error": (message or str(exc or ""))[:200]}))  # fmt: skip
        self._limits.on_bad_request()
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot answer the malformed request")
        text = "The HTTP request is malformed: " + (message or (type(exc).__name__ if exc else "bad request"))
        resp = web.Response(
            status=status,
            body=error_body(status, text, "invalid_request_error", "bad_http_request"),
            content_type="application/json",
        )
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's low-level server with `_GuardedHandler` connections; see `adopt`."""

    limits: Limits

    @classmethod
    def adopt(cls, server: web.Server, limits: Limits) -> GuardedServer:
        """Turn the server an `aiohttp.web.AppRunner` built into a guarded one, in place.

        aiohttp builds its ``Server`` inside ``AppRunner.setup``; changing the class of that instance keeps every
        setting it was built with (handler arguments, access log) and changes only which protocol it makes.
        """
        server.__class__ = cls
        guarded: GuardedServer = server  # type: ignore[assignment]
        guarded.limits = limits
        return guarded

    def __call__(self) -> RequestHandler:
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)
