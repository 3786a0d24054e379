"""The admin API: fuse status and overrides, usage by project and model, config reload.

Routes exist only when the admin token's environment variable (``gateway.admin_token_env``) is set; every call
must carry ``Authorization: Bearer <token>``, compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tokenfuse.gateway.errors import error_response

if TYPE_CHECKING:
    from tokenfuse.gateway.server import GatewayServer

__all__ = ["add_admin_routes"]

log = logging.getLogger("tokenfuse.admin")
_PERIOD_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
_MAX_TTL_SECONDS = 366 * 86400  # an override longer than a year is a mistake, and a float that large is no date


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def add_admin_routes(app: web.Application, server: GatewayServer) -> bool:
    """Add /admin/* routes when the admin token is configured; returns whether it did."""
    env = server.environ if server.environ is not None else os.environ
    token = env.get(server.config.gateway.admin_token_env)
    if not token:
        return False
    expected = token.encode()

    def authorized(request: web.Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected)

    def deny() -> web.Response:
        return error_response(401, "admin routes need 'Authorization: Bearer <admin token>'", "authentication_error",
                              "invalid_admin_token")  # fmt: skip

    def bad(status: int, message: str, code: str) -> web.Response:
        if server.gateway is not None:
            server.gateway.count_bad_request()
        return error_response(status, message, "invalid_request_error", code)

    def no_policy() -> web.Response:
        return error_response(409, "the policy engine is not running (enforce disabled)", "invalid_request_error",
                              "policy_disabled")  # fmt: skip

    async def fuses(request: web.Request) -> web.Response:
        if not authorized(request):
            return deny()
        if server.policy is None:
            return no_policy()
        dept = request.match_info.get("department")
        if dept is not None and dept not in server.config.departments:
            return error_response(404, f"unknown department '{dept}'", "invalid_request_error", "unknown_department")
        return web.json_response({"fuses": server.policy.fuse_status(dept)})

    async def set_fuse(request: web.Request) -> web.Response:
        if not authorized(request):
            return deny()
        if server.policy is None:
            return no_policy()
        dept = request.match_info["department"]
        if dept not in server.config.departments:
            return error_response(404, f"unknown department '{dept}'", "invalid_request_error", "unknown_department")
        try:
            body: Any = json.loads(await request.read(), parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return bad(400, "body must be JSON (no NaN or Infinity, nested at most a few levels)", "invalid_json")
        if not isinstance(body, dict):
            return bad(400, "body must be a JSON object", "invalid_json")
        action = body.get("action")
        if action not in ("open", "close", "auto"):
            return bad(400, "'action' must be one of open, close, auto", "invalid_action")
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            return bad(400, "'reason' must be a string", "invalid_reason")
        ttl = body.get("ttl_seconds")
        if ttl is not None and (
            isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (0 < ttl <= _MAX_TTL_SECONDS)
        ):
            return bad(400, f"'ttl_seconds' must be a number of seconds > 0 and <= {_MAX_TTL_SECONDS}", "invalid_ttl")
        result = server.policy.override(dept, action, reason, float(ttl) if ttl is not None else None, actor="admin")
        log.info(json.dumps({"event": "admin_override", "department": dept, "action": action, "reason": reason,
                             "ttl_seconds": ttl, "remote": request.remote}))  # fmt: skip
        return web.json_response(result)

    async def usage(request: web.Request) -> web.Response:
        if not authorized(request):
            return deny()
        if server.policy is None:
            return no_policy()
        period = request.query.get("period", "")
        if not _PERIOD_RE.fullmatch(period):
            return bad(400, "'period' must be YYYY-MM, e.g. 2026-11", "invalid_period")
        dept = request.query.get("department")
        return web.json_response(server.policy.usage(dept, period))

    async def reload(request: web.Request) -> web.Response:
        if not authorized(request):
            return deny()
        ok, message = server.reload()
        if not ok:
            return error_response(400, f"reload refused, old config kept: {message}", "invalid_request_error",
                                  "invalid_config")  # fmt: skip
        return web.json_response({"status": "reloaded"})

    app.router.add_get("/admin/fuses", fuses)
    app.router.add_get("/admin/fuses/{department}", fuses)
    app.router.add_post("/admin/fuses/{department}", set_fuse)
    app.router.add_get("/admin/usage", usage)
    app.router.add_post("/admin/reload", reload)
    return True
