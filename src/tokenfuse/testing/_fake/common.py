"""What every API shape of the fake upstream shares: the control headers and faults, the deterministic usage
plan (token counting, ``x-fake-usage`` steering), the request record, and the JSON/SSE templating helpers.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

FAULTS: Final[frozenset[str]] = frozenset({"http_500", "http_429", "timeout", "cut", "no_usage", "slow_first_chunk"})
FAULT_HEADER: Final = "x-fake-fault"
USAGE_HEADER: Final = "x-fake-usage"
LATENCY_HEADER: Final = "x-fake-latency"

USAGE_KEYS: Final[tuple[str, ...]] = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_reasoning_tokens",
)
"""Keys of a recorded usage dict; the names and meaning of :class:`tokenfuse.metering.types.Usage`'s fields
(input includes cache reads and writes, output includes reasoning), so ``Usage(**recorded.usage)`` works."""

# Accepted spellings in x-fake-usage / set_usage, so tests can use the provider's own field names.
_USAGE_ALIASES: Final[Mapping[str, str]] = {
    "input_tokens": "input_tokens",
    "prompt_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "completion_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cached_tokens": "cache_read_tokens",
    "cache_read_input_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "cache_creation_input_tokens": "cache_write_tokens",
    "output_reasoning_tokens": "output_reasoning_tokens",
    "reasoning_tokens": "output_reasoning_tokens",
}

# Which usage keys each API shape can carry on the wire; the rest is reported (and recorded) as 0.
_REPORTABLE: Final[Mapping[str, frozenset[str]]] = {
    "openai.chat": frozenset({"input_tokens", "output_tokens", "cache_read_tokens", "output_reasoning_tokens"}),
    "openai.responses": frozenset({"input_tokens", "output_tokens", "cache_read_tokens", "output_reasoning_tokens"}),
    "openai.completions": frozenset({"input_tokens", "output_tokens"}),
    "openai.embeddings": frozenset({"input_tokens"}),
    "anthropic.messages": frozenset({"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"}),
    "google.generate_content": frozenset(
        {"input_tokens", "output_tokens", "cache_read_tokens", "output_reasoning_tokens"}
    ),
}

_WORDS: Final[tuple[str, ...]] = (
    "tokens",
    "flow",
    "through",
    "the",
    "fuse",
    "and",
    "every",
    "one",
    "is",
    "counted",
    "once",
    "per",
    "department",
    "budget",
    "stays",
    "safe",
)
_SLOT: Final = "\x00slot\x00"
_SLOT_JSON: Final = json.dumps(_SLOT)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _template(obj: Any) -> list[str]:
    """Serialise ``obj`` once and split it at every ``_SLOT`` value, so per-chunk fields are spliced in as text."""
    return _dumps(obj).split(_SLOT_JSON)


def _fill(parts: list[str], *values: str) -> str:
    out = [parts[0]]
    for value, part in zip(values, parts[1:], strict=True):
        out.append(value)
        out.append(part)
    return "".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# deterministic usage


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def _gemini_text(content: Any) -> str:
    """The text of a Gemini ``Content`` (its ``parts``' ``text`` fields), or of a plain string."""
    return _text_of(content.get("parts")) if isinstance(content, Mapping) else _text_of(content)


def _prompt_units(body: Mapping[str, Any]) -> Iterator[str]:
    system = body.get("system")
    if system is not None:
        yield _text_of(system)
    # Gemini: the REST API takes both spellings (the SDK sends camelCase, Google's curl examples snake_case).
    instruction = body.get("systemInstruction", body.get("system_instruction"))
    if instruction is not None:
        yield _gemini_text(instruction)
    contents = body.get("contents")
    if isinstance(contents, list):
        for c in contents:
            yield _gemini_text(c)
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        yield instructions
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            yield _text_of(m.get("content")) if isinstance(m, Mapping) else ""
    for key in ("input", "prompt"):
        value = body.get(key)
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    yield item
                elif isinstance(item, Mapping):
                    yield _text_of(item["content"] if "content" in item else item.get("text"))
                else:
                    yield ""


def fake_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The input tokens the fake reports for a request body: ``total characters // 4 + number of units``, min 1.

    A unit is one message or text: Anthropic ``system``, Responses ``instructions`` (when non-empty), each item of
    ``messages``, ``input`` / ``prompt`` (a string is one unit, a list has one unit per item), Gemini
    ``systemInstruction`` and each item of ``contents``. A unit's text is its string, or the concatenated ``text``
    fields of its content parts (Gemini: of its ``parts``); anything else (tool calls, function calls, token ids,
    images) is a unit with no text, so it counts 1.

    Args:
        body: the parsed JSON request body of any supported API.
    """
    chars = 0
    units = 0
    for text in _prompt_units(body):
        chars += len(text)
        units += 1
    return max(1, chars // 4 + units)


def _count_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _limit(body: Mapping[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = _count_or_none(body.get(key))
        if value is not None:
            return value
    config = body.get("generationConfig", body.get("generation_config"))
    if isinstance(config, Mapping):
        return _count_or_none(config.get("maxOutputTokens", config.get("max_output_tokens")))
    return None


def fake_completion_tokens(body: Mapping[str, Any], default: int = 16) -> int:
    """The output tokens the fake reports: ``min(limit, default)``, limit being the first of ``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens``, Gemini's ``generationConfig.maxOutputTokens`` present in
    ``body`` (non-negative int); ``default`` without one.

    Args:
        body: the parsed JSON request body.
        default: the length of the fake's natural answer (``FakeUpstream(default_completion_tokens=...)``).
    """
    limit = _limit(body)
    return default if limit is None else min(limit, default)


@functools.lru_cache(maxsize=512)
def _pieces(n: int) -> tuple[str, ...]:
    """The answer of ``n`` tokens as stream pieces: one word each, later ones with a leading space."""
    return tuple(_WORDS[i % len(_WORDS)] if i == 0 else " " + _WORDS[i % len(_WORDS)] for i in range(n))


@functools.lru_cache(maxsize=512)
def _encoded_pieces(n: int) -> tuple[str, ...]:
    return tuple(json.dumps(p) for p in _pieces(n))


@functools.lru_cache(maxsize=512)
def _answer(n: int) -> str:
    return "".join(_pieces(n))


class _BadRequest(Exception):
    """A request the fake refuses with HTTP 400, the way the real API would."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _as_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _BadRequest(f"{USAGE_HEADER}: {key} must be a non-negative integer, got {value!r}", USAGE_HEADER)
    return value


_INPUT_RULE: Final = (
    "input_tokens counts every input token, cache reads and writes included (as tokenfuse's Usage does); "
    "the fake derives Anthropic's wire input_tokens (the uncached part) from it"
)


def _check_parts(usage: Mapping[str, int]) -> None:
    cached = usage.get("cache_read_tokens", 0) + usage.get("cache_write_tokens", 0)
    if "input_tokens" in usage and cached > usage["input_tokens"]:
        raise _BadRequest(
            f"{USAGE_HEADER}: input_tokens ({usage['input_tokens']}) is less than cache_read_tokens + "
            f"cache_write_tokens ({cached}); {_INPUT_RULE}",
            USAGE_HEADER,
        )
    reasoning = usage.get("output_reasoning_tokens", 0)
    if "output_tokens" in usage and reasoning > usage["output_tokens"]:
        raise _BadRequest(
            f"{USAGE_HEADER}: output_tokens ({usage['output_tokens']}) is less than reasoning tokens ({reasoning}); "
            "output_tokens counts every output token, reasoning included",
            USAGE_HEADER,
        )


def _normalise_usage(spec: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, value in spec.items():
        canonical = _USAGE_ALIASES.get(key)
        if canonical is None:
            known = ", ".join(sorted(_USAGE_ALIASES))
            raise _BadRequest(f"{USAGE_HEADER}: unknown key {key!r}; use one of: {known}", USAGE_HEADER)
        out[canonical] = _as_count(key, value)
    _check_parts(out)
    return out


@dataclass(slots=True)
class _Plan:
    """What one request will be answered with: the numbers before the API shape decides what it can report."""

    usage: dict[str, int]
    visible: int
    truncated: bool


def _plan(api: str, body: Mapping[str, Any], steer: Mapping[str, int] | None, default: int) -> _Plan:
    input_tokens = fake_prompt_tokens(body)
    output_tokens = 0 if api == "openai.embeddings" else fake_completion_tokens(body, default)
    limit = _limit(body)
    truncated = limit is not None and limit < default
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "output_reasoning_tokens": 0,
    }
    if steer:
        usage.update(steer)
        if "output_tokens" in steer:
            truncated = False
    reportable = _REPORTABLE[api]
    for key in USAGE_KEYS:
        if key not in reportable:
            usage[key] = 0
    _check_parts(usage)
    return _Plan(usage=usage, visible=usage["output_tokens"] - usage["output_reasoning_tokens"], truncated=truncated)


# ---------------------------------------------------------------------------------------------------------------------
# stream pieces and templates


@dataclass(slots=True)
class _Stream:
    """SSE pieces of one answer; ``cut_at`` pieces are sent under the ``cut`` fault, reporting ``cut_usage``.

    ``final`` is the finished response object, for an API whose responses can be fetched again later.
    """

    pieces: list[str]
    cut_at: int
    cut_usage: dict[str, int] | None = None
    final: dict[str, Any] | None = None


def _half(n: int) -> int:
    return math.ceil(n / 2)


def _head(obj: Mapping[str, Any], *values: str) -> str:
    """``obj`` serialised with its slots filled and its closing brace replaced by a comma, to prefix a tail."""
    return _fill(_template(obj), *values)[:-1] + ","


@functools.lru_cache(maxsize=64)
def _tail(obj_json: str) -> str:
    """The JSON ``obj_json`` without its opening brace, to follow a :func:`_head`."""
    return obj_json[1:]


# ---------------------------------------------------------------------------------------------------------------------
# the request record


@dataclass(slots=True)
class RecordedRequest:
    """One request the fake served, and what it answered.

    Args:
        method: HTTP method.
        path: request path, e.g. ``/v1/chat/completions``.
        api: the API shape: a metered one (``openai.chat``, ``openai.responses``, ``openai.embeddings``,
            ``openai.completions``, ``anthropic.messages``, ``google.generate_content``) or one that reports no
            usage (``openai.models``, ``anthropic.count_tokens``, ``openai.responses.retrieve``,
            ``openai.responses.input_items``, ``openai.responses.delete``).
        headers: request headers, names lower-cased.
        body: the parsed JSON body (None for GET or a body that was not a JSON object).
        stream: whether the answer was an SSE stream (Gemini: ``streamGenerateContent?alt=sse``; without
            ``alt=sse`` it answers one JSON array, recorded as not a stream).
        fault: the fault applied, if any.
        status: HTTP status sent; None while in flight or when the client went away first.
        usage: the usage the fake REPORTED on the wire, keyed by :data:`USAGE_KEYS`; None when it reported none.
    """

    method: str
    path: str
    api: str
    headers: dict[str, str]
    body: dict[str, Any] | None = None
    stream: bool = False
    fault: str | None = None
    status: int | None = None
    usage: dict[str, int] | None = field(default=None)
