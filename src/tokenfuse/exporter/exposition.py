"""Serving ``/metrics`` for SDK users of the instrumented client (the gateway serves its own)."""

from __future__ import annotations

from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

__all__ = ["start_metrics_server"]


def start_metrics_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> Any:
    """Serve Prometheus text (and OpenMetrics when asked by ``Accept``) on ``http://addr:port/metrics``.

    Args:
        port: TCP port; 0 picks a free one (read it from the returned server's ``server_port``).
        addr: listen address; loopback by default, so nothing is exposed unless asked.
        registry: what to expose (default: the global registry, where the default meter records).

    Returns:
        The ``(server, thread)`` pair of prometheus_client; call ``server.shutdown()`` to stop.
    """
    return start_http_server(port, addr=addr, registry=registry if registry is not None else REGISTRY)
