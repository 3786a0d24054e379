"""The metric contract: every metric name, label and bucket tokenfuse exports, in one place.

Generators (alert rules, dashboards) and tests import the names from here; nothing else spells one.
`Metrics` builds the collectors into a given registry so that tests never share the global one.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenfuse.exporter.collectors import FastCounter, FastHistogram

__all__ = [
    "BLOCKED_REQUESTS_TOTAL",
    "BLOCK_REASONS",
    "BREAKER_STATE",
    "BREAKER_STATES",
    "BREAKER_TRANSITIONS_TOTAL",
    "BUDGET_LIMIT_USD",
    "BUDGET_SPENT_USD",
    "COST_USD_TOTAL",
    "ESTIMATED_REQUESTS_TOTAL",
    "GATEWAY_OVERHEAD_SECONDS",
    "GEN_AI_DURATION_BUCKETS",
    "GEN_AI_OPERATION_DURATION",
    "GEN_AI_TOKEN_BUCKETS",
    "GEN_AI_TOKEN_USAGE",
    "LABEL_OVERFLOW_TOTAL",
    "METRIC_NAMES",
    "OUTCOMES",
    "POLICY_SOURCE_UP",
    "REQUESTS_TOTAL",
    "TOKENS_TOTAL",
    "TOKENS_USED_WINDOW",
    "TOKEN_DETAILS",
    "TOKEN_DETAILS_TOTAL",
    "TOKEN_LIMIT",
    "UNPRICED_REQUESTS_TOTAL",
    "USAGE_LABELS",
    "Metrics",
    "semconv_provider",
]

# Exposed names (what PromQL sees). Counters carry the ``_total`` suffix here; prometheus_client adds it.
TOKENS_TOTAL = "tokenfuse_tokens_total"
TOKEN_DETAILS_TOTAL = "tokenfuse_token_details_total"
LABEL_OVERFLOW_TOTAL = "tokenfuse_label_overflow_total"
COST_USD_TOTAL = "tokenfuse_cost_usd_total"
REQUESTS_TOTAL = "tokenfuse_requests_total"
BLOCKED_REQUESTS_TOTAL = "tokenfuse_blocked_requests_total"
ESTIMATED_REQUESTS_TOTAL = "tokenfuse_estimated_requests_total"
UNPRICED_REQUESTS_TOTAL = "tokenfuse_unpriced_requests_total"
BUDGET_LIMIT_USD = "tokenfuse_budget_limit_usd"
TOKEN_LIMIT = "tokenfuse_token_limit"
BUDGET_SPENT_USD = "tokenfuse_budget_spent_usd"
TOKENS_USED_WINDOW = "tokenfuse_tokens_used_window"
BREAKER_STATE = "tokenfuse_breaker_state"
BREAKER_TRANSITIONS_TOTAL = "tokenfuse_breaker_transitions_total"
POLICY_SOURCE_UP = "tokenfuse_policy_source_up"
GATEWAY_OVERHEAD_SECONDS = "tokenfuse_gateway_overhead_seconds"
GEN_AI_TOKEN_USAGE = "gen_ai_client_token_usage"
GEN_AI_OPERATION_DURATION = "gen_ai_client_operation_duration_seconds"

USAGE_LABELS = ("department", "project", "environment", "provider", "model")
OUTCOMES = ("success", "upstream_error", "client_error", "blocked")
BREAKER_STATES = ("closed", "open", "half_open")
BLOCK_REASONS = ("fuse_open", "insufficient_budget", "token_limit")
TOKEN_DETAILS = ("cache_read", "cache_write", "reasoning")
"""``detail`` values of `TOKEN_DETAILS_TOTAL`: parts of input (cache) and output (reasoning), not added to them."""

GEN_AI_TOKEN_ATTRS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "gen_ai_token_type",
    "department",
)
GEN_AI_DURATION_ATTRS = (
    "gen_ai_operation_name",
    "gen_ai_provider_name",
    "gen_ai_request_model",
    "gen_ai_response_model",
    "error_type",
)
# Bucket boundaries recommended by the OpenTelemetry GenAI semantic conventions.
GEN_AI_TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip
GEN_AI_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

METRIC_NAMES = frozenset(
    {
        TOKENS_TOTAL,
        TOKEN_DETAILS_TOTAL,
        LABEL_OVERFLOW_TOTAL,
        COST_USD_TOTAL,
        REQUESTS_TOTAL,
        BLOCKED_REQUESTS_TOTAL,
        ESTIMATED_REQUESTS_TOTAL,
        UNPRICED_REQUESTS_TOTAL,
        BUDGET_LIMIT_USD,
        TOKEN_LIMIT,
        BUDGET_SPENT_USD,
        TOKENS_USED_WINDOW,
        BREAKER_STATE,
        BREAKER_TRANSITIONS_TOTAL,
        POLICY_SOURCE_UP,
        GATEWAY_OVERHEAD_SECONDS,
        GEN_AI_TOKEN_USAGE,
        GEN_AI_OPERATION_DURATION,
    }
)
"""Every metric family name tokenfuse exports (histograms also expose _bucket/_sum/_count)."""


# genai-prices provider ids → OpenTelemetry GenAI ``gen_ai.provider.name`` well-known values; other ids pass as they
# are (the convention allows custom values). tokenfuse's own ``provider`` label keeps the genai-prices id.
_SEMCONV_PROVIDERS = {
    "google": "gcp.gemini",
    "google-vertex": "gcp.vertex_ai",
    "vertex": "gcp.vertex_ai",
    "aws": "aws.bedrock",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "mistral": "mistral_ai",
    "x-ai": "x_ai",
    "ibm": "ibm.watsonx.ai",
}


def semconv_provider(provider: str) -> str:
    """The ``gen_ai_provider_name`` value of a genai-prices provider id (``google`` → ``gcp.gemini``, …)."""
    return _SEMCONV_PROVIDERS.get(provider, provider)


def _base(name: str) -> str:
    return name.removesuffix("_total")


class Metrics:
    """The collectors of the metric contract, registered in one registry.

    The five families every call writes (tokens, cost, requests and the two GenAI histograms) are `FastCounter` /
    `FastHistogram` sharing ``lock``: the `Meter` takes it once per call. The rest are prometheus_client's own.

    Args:
        registry: where to register; tests pass their own ``CollectorRegistry()``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.lock = threading.Lock()
        lock = self.lock
        self.tokens = FastCounter(
            _base(TOKENS_TOTAL),
            "Billable LLM tokens; token_type input + output = total.",
            (*USAGE_LABELS, "token_type"),
            lock=lock,
            registry=registry,
        )
        self.token_details = FastCounter(
            _base(TOKEN_DETAILS_TOTAL),
            "Parts of the billable tokens: detail cache_read and cache_write (of input), reasoning (of output).",
            (*USAGE_LABELS, "detail"),
            lock=lock,
            registry=registry,
        )
        self.label_overflow = Counter(
            _base(LABEL_OVERFLOW_TOTAL),
            "Label combinations folded into project/environment 'other' by metering.max_label_sets_per_department.",
            ("department",),
            registry=registry,
        )
        self.cost = FastCounter(
            _base(COST_USD_TOTAL), "LLM cost in US dollars.", USAGE_LABELS, lock=lock, registry=registry
        )
        self.requests = FastCounter(
            _base(REQUESTS_TOTAL),
            "LLM requests by outcome: success, upstream_error, client_error, blocked.",
            (*USAGE_LABELS, "outcome"),
            lock=lock,
            registry=registry,
        )
        self.blocked = Counter(
            _base(BLOCKED_REQUESTS_TOTAL),
            "Requests refused by a department's fuse or budget, by reason.",
            ("department", "reason"),
            registry=registry,
        )
        self.estimated = Counter(
            _base(ESTIMATED_REQUESTS_TOTAL),
            "Requests whose usage was estimated with tiktoken because the response carried none.",
            ("department", "provider", "model"),
            registry=registry,
        )
        self.unpriced = Counter(
            _base(UNPRICED_REQUESTS_TOTAL),
            "Requests for a model with no known price (costed at 0).",
            ("provider", "model"),
            registry=registry,
        )
        self.budget_limit = Gauge(
            BUDGET_LIMIT_USD, "Monthly budget from config.", ("department", "period"), registry=registry
        )
        self.token_limit = Gauge(
            TOKEN_LIMIT,
            "Rolling-window token limit from config.",
            ("department", "window"),
            registry=registry,
        )
        self.budget_spent = Gauge(
            BUDGET_SPENT_USD,
            "Month-to-date spend as the policy engine sees it.",
            ("department", "period"),
            registry=registry,
        )
        self.tokens_window = Gauge(
            TOKENS_USED_WINDOW,
            "Tokens used in the rolling window as the policy engine sees it.",
            ("department", "window"),
            registry=registry,
        )
        self.breaker_state = Gauge(
            BREAKER_STATE,
            "Fuse state per department: 1 for the current state, 0 for the others.",
            ("department", "state"),
            registry=registry,
        )
        self.breaker_transitions = Counter(
            _base(BREAKER_TRANSITIONS_TOTAL),
            "Fuse state transitions.",
            ("department", "from_state", "to_state"),
            registry=registry,
        )
        self.policy_source_up = Gauge(
            POLICY_SOURCE_UP,
            "1 when the policy engine's rate source answered at the last evaluation.",
            ("source",),
            registry=registry,
        )
        self.overhead = Histogram(
            _base(GATEWAY_OVERHEAD_SECONDS),
            "Time the gateway adds to a request (total minus upstream time).",
            ("route",),
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.gen_ai_tokens = FastHistogram(
            GEN_AI_TOKEN_USAGE,
            "OpenTelemetry GenAI gen_ai.client.token.usage: tokens per call.",
            GEN_AI_TOKEN_ATTRS,
            buckets=GEN_AI_TOKEN_BUCKETS,
            lock=lock,
            registry=registry,
        )
        self.gen_ai_duration = FastHistogram(
            _base(GEN_AI_OPERATION_DURATION).removesuffix("_seconds"),
            "OpenTelemetry GenAI gen_ai.client.operation.duration.",
            GEN_AI_DURATION_ATTRS,
            unit="seconds",
            buckets=GEN_AI_DURATION_BUCKETS,
            lock=lock,
            registry=registry,
        )

    def set_breaker_state(self, department: str, state: str) -> None:
        """Set the enum gauge: 1 for ``state``, 0 for the other states."""
        for s in BREAKER_STATES:
            self.breaker_state.labels(department, s).set(1.0 if s == state else 0.0)
