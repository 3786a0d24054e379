"""The ``tokenfuse`` command: check config, make keys, serve the gateway, run the demo, generate artefacts.

Each sub-command is a thin shell over a library function; imports are lazy so ``tokenfuse check`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenfuse.config import Config, ConfigError, hash_key, load_config, new_key

__all__ = ["main"]


def _load(path: str | None) -> Config:
    if path is None:
        from tokenfuse.config import parse_config

        return parse_config({})
    return load_config(path)


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, serving=True)
    print(
        f"{args.config}: OK ({len(cfg.departments)} departments, {len(cfg.upstreams)} upstreams, "
        f"policy source {cfg.policy.source})"
    )
    return 0


def _cmd_keys_new(args: argparse.Namespace) -> int:
    key = new_key()
    print(f"key for {args.department} (give this to the app; it is not stored anywhere): {key}")
    print("add this line under departments." + args.department + ".keys in tokenfuse.yaml:")
    print(f'  - "{hash_key(key)}"')
    return 0


def _write_or_print(text: str, out: str | None) -> None:
    if out is None or out == "-":
        sys.stdout.write(text)
        return
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    print(f"wrote {p}", file=sys.stderr)


def _cmd_rules(args: argparse.Namespace) -> int:
    from tokenfuse.alerting.rules import render_rules

    _write_or_print(render_rules(_load(args.config)), args.output)
    return 0


def _cmd_alertmanager(args: argparse.Namespace) -> int:
    from tokenfuse.alerting.alertmanager import render_alertmanager

    _write_or_print(render_alertmanager(_load(args.config)), args.output)
    return 0


def _cmd_dashboards(args: argparse.Namespace) -> int:
    from tokenfuse.dashboards.generate import write_dashboards

    for p in write_dashboards(_load(args.config), Path(args.output)):
        print(f"wrote {p}", file=sys.stderr)
    return 0


def _cmd_fake_upstream(args: argparse.Namespace) -> int:
    from tokenfuse.testing.fake_upstream import serve

    serve(host=args.host, port=args.port, latency=args.latency)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from tokenfuse.gateway.server import serve

    serve(args.config, enforce=not args.no_enforce)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tokenfuse.demo import run_demo

    return run_demo(duration=args.duration, port=args.port)


def _cmd_report(args: argparse.Namespace) -> int:
    from tokenfuse.report import run_report

    return run_report(
        _load(args.config), month=args.month, source=args.source, fmt=args.format, by=args.by, out=sys.stdout
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenfuse", description="LLM cost control: meter, alert, fuse.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("check", _cmd_check, "validate a tokenfuse.yaml")
    sp.add_argument("--config", required=True)

    keys = sub.add_parser("keys", help="virtual keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kn = ksub.add_parser("new", help="print a fresh virtual key and the sha256 line for the config")
    kn.add_argument("--department", required=True)
    kn.set_defaults(fn=_cmd_keys_new)

    sp = add("serve", _cmd_serve, "run the metering gateway")
    sp.add_argument("--config", required=True)
    sp.add_argument("--no-enforce", action="store_true", help="meter only: no fuses, no admission control")

    sp = add("demo", _cmd_demo, "fake upstream + gateway + synthetic traffic, with a live table")
    sp.add_argument("--duration", type=float, default=None, help="stop after SECONDS (default: until Ctrl-C)")
    sp.add_argument("--port", type=int, default=0, help="gateway port (default: a free one)")

    sp = add("fake-upstream", _cmd_fake_upstream, "run the fake OpenAI/Anthropic-compatible upstream")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8081)
    sp.add_argument("--latency", type=float, default=0.0, help="seconds before each response")

    sp = add("rules", _cmd_rules, "generate Prometheus recording and alerting rules")
    sp.add_argument("--config")
    sp.add_argument("-o", "--output")

    sp = add("alertmanager", _cmd_alertmanager, "generate an Alertmanager config")
    sp.add_argument("--config")
    sp.add_argument("-o", "--output")

    sp = add("dashboards", _cmd_dashboards, "generate Grafana dashboards and provisioning files")
    sp.add_argument("--config")
    sp.add_argument("-o", "--output", default="grafana")

    sp = add("report", _cmd_report, "monthly chargeback report per department")
    sp.add_argument("--config", required=True)
    sp.add_argument("--month", required=True, help="YYYY-MM")
    sp.add_argument("--source", choices=("local", "prometheus"), default=None)
    sp.add_argument("--format", choices=("table", "csv", "json", "markdown"), default="table")
    sp.add_argument("--by", choices=("department", "project", "model"), default="department")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokenfuse`` console script."""
    args = _parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except ConfigError as e:
        print(f"tokenfuse: config error [{e.code}]:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
