"""The OpenAI-compatible metering gateway: proxy routes, virtual keys, admin API, health."""

from __future__ import annotations

from tokenfuse.gateway.app import Gateway, make_app
from tokenfuse.gateway.server import GatewayServer, serve

__all__ = ["Gateway", "GatewayServer", "make_app", "serve"]
