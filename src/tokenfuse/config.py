"""The tokenfuse configuration (`tokenfuse.yaml`): pydantic models and the one place config is parsed.

Every other module receives a validated `Config`; none reads YAML or the environment for settings.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "UNASSIGNED",
    "AlertingConfig",
    "Config",
    "ConfigError",
    "Department",
    "GatewayConfig",
    "MeteringConfig",
    "PolicyConfig",
    "PriceOverride",
    "PricingConfig",
    "Upstream",
    "format_duration",
    "hash_key",
    "load_config",
    "new_key",
    "parse_config",
    "parse_duration",
]

UNASSIGNED = "unassigned"
"""The department of calls no configured department owns (no key, unknown label)."""

_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_KEY_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h|d|w))+$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_HEADER_GLOB_RE = re.compile(r"^[a-z0-9_*][a-z0-9_*-]*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and the fix.

    Args:
        message: one line per problem, each ``path.to.field: what is wrong``.
        code: stable error code.
    """

    def __init__(self, message: str, code: str = "invalid_config") -> None:
        super().__init__(message)
        self.code = code


def parse_duration(value: object) -> float:
    """Parse a Prometheus-style duration (``15s``, ``5m``, ``1h30m``) or a number of seconds.

    Args:
        value: a string such as ``"5m"``, or an int/float of seconds.

    Returns:
        The duration in seconds.
    """
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 15s, 5m, 1h, or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION_RE.fullmatch(text):
                raise ValueError(
                    f"{value!r} is not a duration: use a number of seconds or a Prometheus-style "
                    "duration such as 15s, 5m, 1h"
                ) from None
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    else:
        raise ValueError("must be a duration such as 15s, 5m, 1h, or a number of seconds")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a non-negative, finite duration")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds as the shortest Prometheus duration (``3600`` → ``1h``, ``90`` → ``1m30s``)."""
    if seconds <= 0:
        return "0s"
    ms = round(seconds * 1000)
    if ms % 1000:
        return f"{ms}ms"
    rest = ms // 1000
    out = ""
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out


Duration = Annotated[float, BeforeValidator(parse_duration)]


def hash_key(key: str) -> str:
    """Return the ``sha256:<hex>`` form of a virtual key, as stored in the config."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """Return a fresh random virtual key (``tf-`` + 43 URL-safe characters)."""
    return "tf-" + secrets.token_urlsafe(32)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_label(value: str, what: str) -> str:
    if not _LABEL_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be lowercase letters, digits, '_', '-' or '.', "
            "start with a letter or digit, at most 63 characters"
        )
    return value


class Upstream(_Model):
    """An LLM API the gateway forwards to, chosen by model name."""

    name: str
    base_url: str
    api_key_env: str | None = None
    provider: str = Field(description="genai-prices provider id: openai, anthropic, google, deepseek, …")
    models: list[str] = Field(min_length=1)
    timeout: Duration = 120.0
    connect_timeout: Duration = 5.0
    proxy: str | None = Field(default=None, description="egress proxy URL; else HTTPS_PROXY / NO_PROXY")
    ca_file: str | None = Field(default=None, description="PEM bundle of extra CA certificates to trust")
    client_cert: str | None = Field(default=None, description="PEM client certificate (mutual TLS)")
    client_key: str | None = Field(default=None, description="PEM private key of client_cert")

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("timeout", "connect_timeout")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("proxy")
    @classmethod
    def _proxy(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://", "socks5://", "socks5h://")):
            raise ValueError("must be a proxy URL: http://HOST:PORT (user:password@ allowed), https:// or socks5://")
        return v

    @field_validator("ca_file", "client_cert", "client_key")
    @classmethod
    def _readable(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"{v!r} is not a readable file (a PEM file is expected)")
        return v

    @model_validator(mode="after")
    def _key_with_cert(self) -> Upstream:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key: needs client_cert (the certificate it belongs to)")
        return self

    def routes(self, model: str) -> bool:
        """True when one of this upstream's glob patterns matches ``model``."""
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The upstream key from the environment variable named by ``api_key_env``."""
        if self.api_key_env is None:
            return None
        return (os.environ if environ is None else environ).get(self.api_key_env)


class PriceOverride(_Model):
    """USD per million tokens; wins over genai-prices for this model."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)


class PricingConfig(_Model):
    overrides: dict[str, PriceOverride] = Field(default_factory=dict)


class Department(_Model):
    """A cost centre: who pays for the calls its keys make, and the limits on them."""

    monthly_budget_usd: float | None = Field(default=None, gt=0)
    hourly_token_limit: int | None = Field(default=None, gt=0)
    alert_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9, 1.0])
    keys: list[str] = Field(default_factory=list)
    projects: list[str] | None = Field(
        default=None, description="allowed project labels; None admits any up to metering.max_projects"
    )
    slack_channel: str | None = None

    @field_validator("alert_thresholds")
    @classmethod
    def _thresholds(cls, v: list[float]) -> list[float]:
        for t in v:
            if not (0 < t <= 2):
                raise ValueError("each threshold is a fraction of the budget: > 0 and <= 2 (0.9 = 90%)")
        if len(set(v)) != len(v):
            raise ValueError("thresholds must be distinct")
        return sorted(v)

    @field_validator("keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if not _KEY_HASH_RE.fullmatch(k):
                raise ValueError(
                    "keys are stored as 'sha256:<64 lowercase hex>', never in clear; "
                    "run `tokenfuse keys new --department NAME` to make one"
                )
        return v

    @field_validator("projects")
    @classmethod
    def _projects(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for p in v:
                _check_label(p, "project")
        return v


# SDK headers an upstream needs; globs. Credentials, hop-by-hop headers and tokenfuse's own never cross (see
# `NEVER_FORWARDED`); OpenAI-Organization / OpenAI-Project would act with the organisation's key, so are opt-in.
DEFAULT_FORWARD_HEADERS = (
    "accept",
    "user-agent",
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "idempotency-key",
    "x-stainless-*",
    "x-goog-api-client",
)
NEVER_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "content-length",
        "content-type",
        "accept-encoding",
        "authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "x-project",
        "x-environment",
        "x-department",
    }
)


class GatewayConfig(_Model):
    listen: str = "127.0.0.1:8080"
    require_key: bool = True
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    admin_token_env: str = "TOKENFUSE_ADMIN_TOKEN"
    forward_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_FORWARD_HEADERS))
    header_timeout: Duration = 10.0
    body_timeout: Duration = 60.0
    keepalive_timeout: Duration = 75.0
    max_connections: int = Field(default=4096, ge=1)
    max_request_line_bytes: int = Field(default=8190, ge=256)
    max_header_bytes: int = Field(default=8190, ge=256, description="longest header field (name + value)")
    max_headers: int = Field(default=128, ge=8)

    @field_validator("header_timeout", "body_timeout", "keepalive_timeout")
    @classmethod
    def _positive_duration(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be > 0")
        return v

    @field_validator("forward_headers")
    @classmethod
    def _forward(cls, v: list[str]) -> list[str]:
        out = []
        for h in v:
            name = h.strip().lower()
            if not _HEADER_GLOB_RE.fullmatch(name):
                raise ValueError(f"{h!r} is not a header name (letters, digits, '-', '_', with '*' as a glob)")
            if name in NEVER_FORWARDED or name.startswith(("x-tokenfuse-", "proxy-")):
                raise ValueError(
                    f"{h!r} is never forwarded: credentials, hop-by-hop and tokenfuse headers stay at the gateway"
                )
            out.append(name)
        return out

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 <= int(port) <= 65535):
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080")
        return v

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class PolicyConfig(_Model):
    source: Literal["local", "prometheus"] = "local"
    state_path: str = "tokenfuse-state.db"
    prometheus_url: str | None = None
    interval: Duration = 5.0
    max_staleness: Duration = 60.0
    on_source_error: Literal["fail_open", "fail_closed"] = "fail_open"
    open_for: Duration = 300.0
    half_open_probes: int = Field(default=3, ge=1)
    token_window: Duration = 3600.0
    default_max_tokens: int = Field(default=4096, ge=1)
    # Admission reserves ceil(estimate × (1 + prompt_margin)) + prompt_margin_tokens for the prompt: providers count
    # what tiktoken cannot see (other tokenizers, message framing, tool schemas). Chosen on the recorded payloads
    # (bench/prompt_margin.py): billed/estimate had median 1.00 and max 1.88 (17 → 32 tokens, framing).
    prompt_margin: float = Field(default=0.25, ge=0, le=10)
    prompt_margin_tokens: int = Field(default=16, ge=0)

    @model_validator(mode="after")
    def _prometheus_needs_url(self) -> PolicyConfig:
        if self.source == "prometheus" and not self.prometheus_url:
            raise ValueError("prometheus_url: required when source is 'prometheus'")
        if self.token_window <= 0:
            raise ValueError("token_window: must be > 0")
        if self.interval <= 0:
            raise ValueError("interval: must be > 0")
        return self


class MeteringConfig(_Model):
    max_label_sets_per_department: int = Field(
        default=1000, ge=10, description="distinct (project, environment, provider, model) sets per department"
    )
    max_tokens_per_call: int = Field(
        default=10_000_000, ge=1, description="usage above this (or the model's context window) is not believed"
    )
    max_departments: int = Field(
        default=100, ge=1, description="distinct department labels taken from code when no departments are configured"
    )
    max_projects: int = Field(default=50, ge=1, description="distinct project labels per department")
    max_environments: int = Field(default=10, ge=1, description="distinct environment labels per department")


class SlackConfig(_Model):
    api_url_file: str
    channel: str = "#llm-costs"


class WebhookConfig(_Model):
    url: str | None = None
    url_file: str | None = None

    @model_validator(mode="after")
    def _one(self) -> WebhookConfig:
        if (self.url is None) == (self.url_file is None):
            raise ValueError("give exactly one of url, url_file")
        return self


class AlertingConfig(_Model):
    slack: SlackConfig | None = None
    discord: WebhookConfig | None = None
    webhook: WebhookConfig | None = None
    dashboard_url: str = "http://localhost:3000/d/tokenfuse-overview"
    runbook_url: str = "https://github.com/tokenfuse/tokenfuse/blob/main/docs/runbook.md"
    group_wait: Duration = 30.0
    group_interval: Duration = 300.0
    repeat_interval: Duration = 14400.0


class Config(_Model):
    """A validated tokenfuse.yaml."""

    timezone: str = "UTC"
    upstreams: list[Upstream] = Field(default_factory=list)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    departments: dict[str, Department] = Field(default_factory=dict)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    alerting: AlertingConfig = Field(default_factory=AlertingConfig)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name such as UTC or Europe/Berlin") from None
        return v

    @field_validator("departments")
    @classmethod
    def _departments(cls, v: dict[str, Department]) -> dict[str, Department]:
        for name in v:
            _check_label(name, "department")
            if name in (UNASSIGNED, "other"):
                raise ValueError(f"{name!r} is reserved; choose another department name")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Config:
        seen: dict[str, str] = {}
        for dept, d in self.departments.items():
            for k in d.keys:
                if k in seen and seen[k] != dept:
                    raise ValueError(f"departments.{dept}.keys: key {k[:19]}… is also a key of {seen[k]}")
                seen[k] = dept
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstreams: names must be unique")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def key_index(self) -> dict[str, str]:
        """Map ``sha256:<hex>`` → department name."""
        return {k: name for name, d in self.departments.items() for k in d.keys}

    def serving_problems(self) -> list[str]:
        """Why a gateway must not serve from this config (empty when it may): without upstreams nothing can be
        forwarded; without departments, or with keys required but none configured, every call gets 401."""
        out = []
        if not self.upstreams:
            out.append("upstreams: a gateway needs at least one upstream to forward to")
        if not self.departments:
            out.append("departments: a gateway needs at least one department (keys say who pays)")
        elif self.gateway.require_key and not any(d.keys for d in self.departments.values()):
            out.append("departments.*.keys: no department has a key, and gateway.require_key is true: every call "
                       "would get 401 (add keys with `tokenfuse keys new --department NAME`)")  # fmt: skip
        return out

    def route(self, model: str, providers: frozenset[str] | None = None) -> Upstream | None:
        """The first upstream whose model patterns match ``model`` (and whose provider is in ``providers``, when
        given: Gemini's native API goes only to a Google upstream), or None."""
        for u in self.upstreams:
            if u.routes(model) and (providers is None or u.provider in providers):
                return u
        return None


_MESSAGES = {
    "extra_forbidden": "unknown key (check the spelling; unknown keys are an error)",
    "missing": "required",
}


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        typ = e["type"]
        ctx = e.get("ctx") or {}
        if typ == "greater_than":
            msg = f"must be > {ctx.get('gt')}"
        elif typ == "greater_than_equal":
            msg = f"must be >= {ctx.get('ge')}"
        elif typ in _MESSAGES:
            msg = _MESSAGES[typ]
        else:
            msg = str(e["msg"]).removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any] | None) -> Config:
    """Validate a parsed YAML mapping.

    Raises:
        ConfigError: with one ``field.path: problem`` line per problem.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError("(top level): the config must be a YAML mapping")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None


def load_config(path: str | os.PathLike[str], *, serving: bool = False) -> Config:
    """Read (once) and validate a tokenfuse.yaml file.

    Args:
        path: the file.
        serving: also refuse a config a gateway cannot serve from (`Config.serving_problems`).

    Raises:
        ConfigError: the file is missing, empty, not YAML, or not a valid config.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}", code="config_unreadable") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}", code="config_not_yaml") from None
    if data is None:
        # An empty file is never meant: on a reload it would drop every key and limit.
        raise ConfigError(f"{p}: the config file is empty (nothing but whitespace or comments)", code="config_empty")
    config = parse_config(data)
    if serving:
        problems = config.serving_problems()
        if problems:
            raise ConfigError("\n".join(f"{p}: {x}" for x in problems), code="config_not_servable")
    return config
