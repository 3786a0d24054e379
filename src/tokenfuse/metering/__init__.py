"""Metering: what an LLM call used and what it cost, from its request and response. Pure functions, no I/O.

`extract_usage` and `StreamUsageParser` read usage from responses, `estimate_usage` estimates it when a response
has none, and `Pricer` turns usage into US dollars.
"""

from __future__ import annotations

from tokenfuse.metering.estimate import count_tokens, estimate_prompt_tokens, estimate_usage, max_output_tokens
from tokenfuse.metering.extract import detect_api, extract_usage, infer_provider, request_model, wants_stream
from tokenfuse.metering.pricing import Price, Pricer
from tokenfuse.metering.stream import StreamUsageParser
from tokenfuse.metering.types import API_OPERATIONS, Api, Usage

__all__ = [
    "API_OPERATIONS",
    "Api",
    "Price",
    "Pricer",
    "StreamUsageParser",
    "Usage",
    "count_tokens",
    "detect_api",
    "estimate_prompt_tokens",
    "estimate_usage",
    "extract_usage",
    "infer_provider",
    "max_output_tokens",
    "request_model",
    "wants_stream",
]
