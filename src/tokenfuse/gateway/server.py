"""Running the gateway: `GatewayServer` (start/stop/reload, used by tests, bench and demo) and `serve` (the CLI)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenfuse.config import Config, ConfigError, load_config
from tokenfuse.gateway.admin import add_admin_routes
from tokenfuse.gateway.app import Gateway, make_app
from tokenfuse.gateway.protocol import GuardedServer, Limits
from tokenfuse.logs import log_event
from tokenfuse.policies import PolicyEngine

__all__ = ["GatewayServer", "serve"]

log = logging.getLogger("tokenfuse.gateway")


class GatewayServer:
    """One gateway process: policy engine + aiohttp app + listening socket.

    Args:
        config: validated config.
        config_path: file to re-read on `reload` (SIGHUP, ``POST /admin/reload``).
        host: listen address (default: ``gateway.listen``'s host).
        port: listen port (default: ``gateway.listen``'s port; 0 picks a free one).
        registry: metrics registry (default: a fresh one).
        environ: environment for upstream keys and the admin token (default: ``os.environ``).
        enforce: run the policy engine (fuses, admission); False meters only.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        host: str | None = None,
        port: int | None = None,
        registry: CollectorRegistry | None = None,
        environ: Mapping[str, str] | None = None,
        enforce: bool = True,
    ) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path is not None else None
        self.host = host if host is not None else config.gateway.host
        self.port = port if port is not None else config.gateway.port
        self.registry = registry if registry is not None else CollectorRegistry()
        self.environ = environ
        self.enforce = enforce
        self.policy: PolicyEngine | None = None
        self.gateway: Gateway | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> GatewayServer:
        from tokenfuse.exporter.meter import Meter

        meter = Meter(self.config, self.registry)
        if self.enforce:
            self.policy = PolicyEngine(self.config, meter, group_commit=True)
            await self.policy.start()
            # Admission counts prompt tokens with tiktoken; loading its tables takes ~0.6 s, which would otherwise
            # land on the first request.
            from tokenfuse.metering.estimate import count_tokens

            await asyncio.to_thread(count_tokens, "warm-up", None)
        self.gateway = Gateway(
            self.config, registry=self.registry, policy=self.policy, meter=meter, environ=self.environ
        )
        app = make_app(self.gateway, extra_routes=lambda a: add_admin_routes(a, self))
        gw = self.config.gateway
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=gw.keepalive_timeout,
            max_line_size=gw.max_request_line_bytes,
            max_field_size=gw.max_header_bytes,
            max_headers=gw.max_headers,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        GuardedServer.adopt(
            self._runner.server, Limits(gw.header_timeout, gw.max_connections, self.gateway.count_bad_request)
        )
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}"
        log_event(log, logging.INFO, "gateway_listening", url=self.url)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.policy is not None:
            await self.policy.stop()

    async def __aenter__(self) -> GatewayServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def reload(self, config: Config | None = None) -> tuple[bool, str]:
        """Re-read the config file (or adopt ``config``); an invalid config is refused and the old one stays.

        Returns:
            ``(True, "reloaded")`` or ``(False, reason)``.
        """
        try:
            if config is None:
                if self.config_path is None:
                    return False, "no config file to reload from"
                config = load_config(self.config_path)
            problems = config.serving_problems()
            if problems:
                raise ConfigError("; ".join(problems), code="config_not_servable")
        except ConfigError as e:
            log.error(json.dumps({"event": "config_reload_refused", "path": str(self.config_path), "error": str(e)}))
            return False, str(e)
        self.config = config
        if self.gateway is not None:
            self.gateway.reconfigure(config)
        log.info(json.dumps({"event": "config_reloaded", "path": str(self.config_path)}))
        return True, "reloaded"


def serve(config_path: str, enforce: bool = True) -> None:
    """Run the gateway until SIGINT/SIGTERM; SIGHUP reloads the config.

    Args:
        config_path: the tokenfuse.yaml to serve (and re-read on SIGHUP).
        enforce: run the policy engine; False meters only.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = load_config(config_path, serving=True)

    async def main() -> None:
        server = GatewayServer(config, config_path=config_path, enforce=enforce)
        await server.start()
        print(f"tokenfuse gateway on {server.url} (metrics: {server.url}/metrics)", file=sys.stderr, flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: server.reload())
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        import uvloop
    except ImportError:  # optional: the gateway runs on the stdlib loop too, ~30% slower
        asyncio.run(main())
    else:
        uvloop.run(main())
