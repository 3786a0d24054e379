"""The fake OpenAI/Anthropic-compatible upstream: an aiohttp server for tests, benchmarks and ``tokenfuse demo``.

It owns the wire shapes of every API tokenfuse meters, the deterministic usage it reports, the faults it can be
told to produce, and the record of every request it served; :class:`FakeUpstream` documents the rules.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import math
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

from aiohttp import web

__all__ = [
    "FAULTS",
    "FAULT_HEADER",
    "LATENCY_HEADER",
    "USAGE_HEADER",
    "USAGE_KEYS",
    "FakeUpstream",
    "FakeUpstreamThread",
    "RecordedRequest",
    "fake_completion_tokens",
    "fake_prompt_tokens",
    "make_app",
    "serve",
]

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
_MODELS: Final[tuple[str, ...]] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "text-embedding-3-small",
    "claude-sonnet-4-6",
)
_EMBEDDING_DIMS: Final = 8
_MAX_EMBEDDING_DIMS: Final = 256
_SSE_HEADERS: Final[Mapping[str, str]] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
_JSON_TYPE: Final = "application/json"
_SLOT: Final = "\x00slot\x00"
_SLOT_JSON: Final = json.dumps(_SLOT)
_DONE: Final = "data: [DONE]\n\n"


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


def _prompt_units(body: Mapping[str, Any]) -> Iterator[str]:
    system = body.get("system")
    if system is not None:
        yield _text_of(system)
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
    ``messages``, and ``input`` / ``prompt`` (a string is one unit, a list has one unit per item). A unit's text is
    its string, or the concatenated ``text`` fields of its content parts; anything else (tool calls, token ids)
    is a unit with no text, so it counts 1.

    Args:
        body: the parsed JSON request body of any supported API.
    """
    chars = 0
    units = 0
    for text in _prompt_units(body):
        chars += len(text)
        units += 1
    return max(1, chars // 4 + units)


def _limit(body: Mapping[str, Any]) -> int | None:
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def fake_completion_tokens(body: Mapping[str, Any], default: int = 16) -> int:
    """The output tokens the fake reports: ``min(limit, default)``, limit being the first of ``max_tokens``,
    ``max_completion_tokens``, ``max_output_tokens`` present in ``body`` (non-negative int); ``default`` without one.

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
# wire shapes


def _openai_chat_usage(u: Mapping[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": u["input_tokens"],
        "completion_tokens": u["output_tokens"],
        "total_tokens": u["input_tokens"] + u["output_tokens"],
        "prompt_tokens_details": {"cached_tokens": u["cache_read_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u["output_reasoning_tokens"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_completions_usage(u: Mapping[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": u["input_tokens"],
        "completion_tokens": u["output_tokens"],
        "total_tokens": u["input_tokens"] + u["output_tokens"],
    }


def _responses_usage(u: Mapping[str, int]) -> dict[str, Any]:
    return {
        "input_tokens": u["input_tokens"],
        "input_tokens_details": {"cached_tokens": u["cache_read_tokens"]},
        "output_tokens": u["output_tokens"],
        "output_tokens_details": {"reasoning_tokens": u["output_reasoning_tokens"]},
        "total_tokens": u["input_tokens"] + u["output_tokens"],
    }


def _anthropic_usage(u: Mapping[str, int], output_tokens: int) -> dict[str, Any]:
    # Anthropic's input_tokens is only the uncached part; cache reads and writes are reported beside it.
    return {
        "input_tokens": u["input_tokens"] - u["cache_read_tokens"] - u["cache_write_tokens"],
        "cache_creation_input_tokens": u["cache_write_tokens"],
        "cache_read_input_tokens": u["cache_read_tokens"],
        "output_tokens": output_tokens,
    }


@dataclass(slots=True)
class _Stream:
    """SSE pieces of one answer; ``cut_at`` pieces are sent under the ``cut`` fault, reporting ``cut_usage``."""

    pieces: list[str]
    cut_at: int
    cut_usage: dict[str, int] | None = None


def _half(n: int) -> int:
    return math.ceil(n / 2)


def _chat_json(rid: str, created: int, model: str, plan: _Plan, with_usage: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _answer(plan.visible), "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "length" if plan.truncated else "stop",
            }
        ],
        "service_tier": "default",
        "system_fingerprint": "fp_tokenfuse",
    }
    if with_usage:
        out["usage"] = _openai_chat_usage(plan.usage)
    return out


def _chat_json_parts() -> list[str]:
    usage = {
        "prompt_tokens": _SLOT,
        "completion_tokens": _SLOT,
        "total_tokens": _SLOT,
        "prompt_tokens_details": {"cached_tokens": _SLOT, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": _SLOT,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    plan = _Plan(usage={}, visible=0, truncated=False)
    shape = _chat_json(_SLOT, 0, _SLOT, plan, with_usage=False)
    shape["created"] = _SLOT
    shape["choices"][0]["message"]["content"] = _SLOT
    shape["choices"][0]["finish_reason"] = _SLOT
    shape["usage"] = usage
    return _template(shape)


# Chat Completions is the benchmark baseline's route: splice the few varying values into a prebuilt serialisation
# instead of building and encoding a dict per request (a third of the handler's time).
_CHAT_JSON_PARTS: Final = _chat_json_parts()


@functools.lru_cache(maxsize=512)
def _encoded_answer(n: int) -> str:
    return json.dumps(_answer(n))


def _chat_json_bytes(rid: str, created: int, model: str, plan: _Plan) -> bytes:
    """The same bytes as ``_dumps(_chat_json(..., with_usage=True))``, built from the prebuilt template."""
    u = plan.usage
    return _fill(
        _CHAT_JSON_PARTS,
        json.dumps(rid),
        str(created),
        json.dumps(model),
        _encoded_answer(plan.visible),
        '"length"' if plan.truncated else '"stop"',
        str(u["input_tokens"]),
        str(u["output_tokens"]),
        str(u["input_tokens"] + u["output_tokens"]),
        str(u["cache_read_tokens"]),
        str(u["output_reasoning_tokens"]),
    ).encode()


def _head(obj: Mapping[str, Any], *values: str) -> str:
    """``obj`` serialised with its slots filled and its closing brace replaced by a comma, to prefix a tail."""
    return _fill(_template(obj), *values)[:-1] + ","


@functools.lru_cache(maxsize=64)
def _tail(obj_json: str) -> str:
    """The JSON ``obj_json`` without its opening brace, to follow a :func:`_head`."""
    return obj_json[1:]


def _choice_delta(delta: Any, finish: str | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _choice_text(text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}


@functools.lru_cache(maxsize=16)
def _openai_chunk_tails(chat: bool, include_usage: bool, finish: str) -> tuple[str, str, str, str]:
    """Request-independent ends of OpenAI stream chunks: (first, piece before text, piece after text, last).

    Real OpenAI puts ``"usage": null`` on every chunk but the last once include_usage is asked for.
    """
    usage: dict[str, Any] = {"usage": None} if include_usage else {}
    if chat:
        first = {"choices": [_choice_delta({"role": "assistant", "content": "", "refusal": None}, None)], **usage}
        piece = {"choices": [_choice_delta({"content": _SLOT}, None)], **usage}
        last = {"choices": [_choice_delta({}, finish)], **usage}
    else:
        first = {}
        piece = {"choices": [_choice_text(_SLOT, None)], **usage}
        last = {"choices": [_choice_text("", finish)], **usage}
    before, after = _template(piece)
    return _tail(_dumps(first)) if first else "", before[1:], after, _tail(_dumps(last))


def _openai_stream(
    chat: bool, rid: str, created: int, model: str, plan: _Plan, include_usage: bool, with_usage: bool
) -> _Stream:
    """Chat Completions (``chat``) or legacy Completions chunks: every chunk shares one per-request head."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    shape: dict[str, Any] = {"id": _SLOT, "object": obj, "created": _SLOT, "model": _SLOT}
    if chat:
        shape["system_fingerprint"] = "fp_tokenfuse"
    head = "data: " + _head(shape, json.dumps(rid), str(created), json.dumps(model))
    finish = "length" if plan.truncated else "stop"
    first, before, after, last = _openai_chunk_tails(chat, include_usage, finish)
    pieces = [f"{head}{first}\n\n"] if first else []
    pieces.extend(f"{head}{before}{p}{after}\n\n" for p in _encoded_pieces(plan.visible))
    pieces.append(f"{head}{last}\n\n")
    if include_usage and with_usage:
        usage = _openai_chat_usage(plan.usage) if chat else _openai_completions_usage(plan.usage)
        pieces.append(f'{head}"choices":[],"usage":{_dumps(usage)}}}\n\n')
    pieces.append(_DONE)
    return _Stream(pieces, cut_at=(1 if chat else 0) + _half(plan.visible))


def _completions_json(rid: str, created: int, model: str, plan: _Plan, with_usage: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "text": _answer(plan.visible),
                "index": 0,
                "logprobs": None,
                "finish_reason": "length" if plan.truncated else "stop",
            }
        ],
    }
    if with_usage:
        out["usage"] = _openai_completions_usage(plan.usage)
    return out


def _responses_object(
    rid: str, created: int, model: str, body: Mapping[str, Any], status: str, output: list[Any], usage: Any
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": {},
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "user": None,
        "usage": usage,
    }


def _responses_message(msg_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}]
    status = "in_progress" if text is None else "completed"
    return {"id": msg_id, "type": "message", "status": status, "content": content, "role": "assistant"}


def _responses_json(
    rid: str, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> dict[str, Any]:
    output = [_responses_message("msg_" + rid[5:], _answer(plan.visible))]
    usage = _responses_usage(plan.usage) if with_usage else None
    return _responses_object(rid, created, model, body, "completed", output, usage)


def _responses_stream(
    rid: str, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> _Stream:
    msg_id = "msg_" + rid[5:]
    text = _answer(plan.visible)
    seq = itertools.count()

    def event(kind: str, payload: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {_dumps({'type': kind, **payload, 'sequence_number': next(seq)})}\n\n"

    pending = _dumps(_responses_object(rid, created, model, body, "in_progress", [], None))
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    pieces = [
        f'event: {name}\ndata: {{"type":"{name}","response":{pending},"sequence_number":{next(seq)}}}\n\n'
        for name in ("response.created", "response.in_progress")
    ]
    pieces += [
        event("response.output_item.added", {"output_index": 0, "item": _responses_message(msg_id, None)}),
        event("response.content_part.added", {**where, "part": part}),
    ]
    kind = "response.output_text.delta"
    head = f"event: {kind}\ndata: " + _head({"type": kind, **where, "logprobs": []})
    for p in _encoded_pieces(plan.visible):
        pieces.append(f'{head}"delta":{p},"sequence_number":{next(seq)}}}\n\n')
    pieces.append(event("response.output_text.done", {**where, "logprobs": [], "text": text}))
    pieces.append(event("response.content_part.done", {**where, "part": {**part, "text": text}}))
    pieces.append(event("response.output_item.done", {"output_index": 0, "item": _responses_message(msg_id, text)}))
    usage = _responses_usage(plan.usage) if with_usage else None
    done = _responses_object(rid, created, model, body, "completed", [_responses_message(msg_id, text)], usage)
    pieces.append(event("response.completed", {"response": done}))
    return _Stream(pieces, cut_at=4 + _half(plan.visible))


def _anthropic_stop(plan: _Plan) -> str:
    return "max_tokens" if plan.truncated else "end_turn"


def _anthropic_json(rid: str, model: str, plan: _Plan, with_usage: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": _answer(plan.visible)}],
        "stop_reason": _anthropic_stop(plan),
        "stop_sequence": None,
    }
    if with_usage:
        out["usage"] = _anthropic_usage(plan.usage, plan.usage["output_tokens"])
    return out


@functools.lru_cache(maxsize=512)
def _anthropic_text_events(n: int) -> tuple[str, ...]:
    """The ``content_block_delta`` events of an ``n``-token answer: nothing in them depends on the request."""
    before, after = _template(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _SLOT}}
    )
    return tuple(f"event: content_block_delta\ndata: {before}{p}{after}\n\n" for p in _encoded_pieces(n))


def _anthropic_stream(rid: str, model: str, plan: _Plan, with_usage: bool) -> _Stream:
    def event(kind: str, payload: dict[str, Any]) -> str:
        return f"event: {kind}\ndata: {_dumps({'type': kind, **payload})}\n\n"

    message: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
    }
    # Like the real API, message_start carries the input side and a provisional output count; message_delta
    # carries the final (cumulative) output count. A meter that adds both up double-counts.
    start_output = min(1, plan.usage["output_tokens"])
    if with_usage:
        message["usage"] = _anthropic_usage(plan.usage, start_output)
    pieces = [event("message_start", {"message": message}), _ANTHROPIC_BLOCK_START]
    pieces.extend(_anthropic_text_events(plan.visible))
    pieces.append(_ANTHROPIC_BLOCK_STOP)
    delta: dict[str, Any] = {"delta": {"stop_reason": _anthropic_stop(plan), "stop_sequence": None}}
    if with_usage:
        delta["usage"] = _anthropic_usage(plan.usage, plan.usage["output_tokens"])
    pieces.append(event("message_delta", delta))
    pieces.append(_ANTHROPIC_MESSAGE_STOP)
    cut_usage = {**plan.usage, "output_tokens": start_output} if with_usage else None
    return _Stream(pieces, cut_at=2 + _half(plan.visible), cut_usage=cut_usage)


_ANTHROPIC_BLOCK_START: Final = (
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":{"type":"text",'
    '"text":""}}\n\nevent: ping\ndata: {"type":"ping"}\n\n'
)
_ANTHROPIC_BLOCK_STOP: Final = 'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_ANTHROPIC_MESSAGE_STOP: Final = 'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def _embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return [" ".join(map(str, value))]
        return [v if isinstance(v, str) else _dumps(v) for v in value]
    return [""]


def _embeddings_json(model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool) -> dict[str, Any]:
    dims = body.get("dimensions")
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= _MAX_EMBEDDING_DIMS:
        dims = _EMBEDDING_DIMS
    as_base64 = body.get("encoding_format") == "base64"
    data: list[dict[str, Any]] = []
    for i, text in enumerate(_embedding_inputs(body)):
        seed = zlib.crc32(text.encode())
        vector = [((seed + 7919 * j) % 2001 - 1000) / 1000 for j in range(dims)]
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    out: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if with_usage:
        n = plan.usage["input_tokens"]
        out["usage"] = {"prompt_tokens": n, "total_tokens": n}
    return out


def _json_payload(
    api: str, n: int, created: int, model: str, body: Mapping[str, Any], plan: _Plan, with_usage: bool
) -> dict[str, Any]:
    """The non-stream answer of request number ``n`` for ``api``."""
    if api == "openai.chat":
        return _chat_json(f"chatcmpl-fake{n:010d}", created, model, plan, with_usage)
    if api == "openai.responses":
        return _responses_json(f"resp_fake{n:010d}", created, model, body, plan, with_usage)
    if api == "openai.completions":
        return _completions_json(f"cmpl-fake{n:010d}", created, model, plan, with_usage)
    if api == "openai.embeddings":
        return _embeddings_json(model, body, plan, with_usage)
    return _anthropic_json(f"msg_fake{n:010d}", model, plan, with_usage)


def _error_body(api: str, status: int, message: str, param: str | None = None) -> bytes:
    if api == "anthropic.messages":
        kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "api_error")
        return _dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    kind, code = {
        400: ("invalid_request_error", "invalid_request"),
        429: ("requests", "rate_limit_exceeded"),
    }.get(status, ("server_error", "server_error"))
    return _dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


# ---------------------------------------------------------------------------------------------------------------------
# the server


@dataclass(slots=True)
class RecordedRequest:
    """One request the fake served, and what it answered.

    Args:
        method: HTTP method.
        path: request path, e.g. ``/v1/chat/completions``.
        api: the API shape (``openai.chat``, ``openai.responses``, ``openai.embeddings``, ``openai.completions``,
            ``anthropic.messages``, or ``openai.models``).
        headers: request headers, names lower-cased.
        body: the parsed JSON body (None for GET or a body that was not a JSON object).
        stream: whether the answer was an SSE stream.
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


def _abort(request: web.Request) -> None:
    # abort() (not close()) so no terminating chunk is sent: the client sees a truncated body.
    if request.transport is not None:
        request.transport.abort()


class FakeUpstream:
    """A fake OpenAI/Anthropic-compatible upstream on loopback.

    Usage (so tests can compute the numbers):

    - input tokens = :func:`fake_prompt_tokens` of the request body;
    - output tokens = :func:`fake_completion_tokens`: ``min(limit, default_completion_tokens)``, ``limit`` being the
      first of ``max_tokens``, ``max_completion_tokens``, ``max_output_tokens`` in the body. The answer has exactly
      that many words, one word per token; ``finish_reason`` is ``length`` (Anthropic ``max_tokens``) when the
      limit cut the natural answer short. The request's ``model`` is echoed back.
    - header ``x-fake-usage`` (JSON object, any subset, e.g. ``{"prompt_tokens": 100, "completion_tokens": 20,
      "cached_tokens": 10, "reasoning_tokens": 5, "cache_write_tokens": 0}``; :data:`USAGE_KEYS` and the providers'
      own names are accepted) or :meth:`set_usage` replace those numbers exactly (not capped by ``max_tokens``);
      the visible answer then has ``output - reasoning`` words.
    - Each API reports only what its shape can carry: Chat and Responses report cached and reasoning tokens,
      Anthropic cache reads and writes (its wire ``input_tokens`` excludes both, as the real API's does), legacy
      completions input/output, embeddings input only. What was not reported is recorded as 0.
    - Streams: Chat and legacy completions report usage only with ``stream_options.include_usage`` (a last chunk
      with ``choices: []``; every earlier chunk then has ``"usage": null``); Responses in ``response.completed``;
      Anthropic input in ``message_start`` (with ``output_tokens`` 1) and the final counts in ``message_delta``.

    Faults, by header ``x-fake-fault: NAME`` for one request, or :meth:`inject` for the next N API requests (the
    header wins and does not consume the queue):

    - ``http_500``; ``http_429`` with a ``retry-after`` header (:attr:`retry_after`); both with the provider's error body;
    - ``timeout``: sleeps :attr:`timeout_seconds`; :meth:`stop` wakes it and drops the connection, a client that
      goes away cancels it;
    - ``cut``: the body stops mid-way and the connection is dropped: no usage, no ``[DONE]`` (an Anthropic stream
      has sent ``message_start``, with its input usage, before the cut, as the real API would have);
    - ``no_usage``: a valid answer without usage anywhere;
    - ``slow_first_chunk``: headers at once (streams), then :attr:`slow_first_chunk_seconds` before the body.

    Header ``x-fake-latency: SECONDS`` overrides ``latency`` for one request. A bad body (not a JSON object, no
    ``model``, Anthropic without ``max_tokens``) or a bad ``x-fake-*`` header gets HTTP 400 with the provider's
    error shape.

    Args:
        host: interface to bind.
        port: TCP port; 0 picks a free one (read :attr:`url` after :meth:`start`).
        latency: seconds before each response (non-stream) or before the first chunk (stream).
        chunk_delay: seconds between SSE chunks; 0 writes a whole stream at once.
        default_completion_tokens: length of the natural answer, in tokens (words).
        record: keep every request in :attr:`requests`; turn off for long runs (totals are kept either way).
    """

    timeout_seconds: float = 3600.0
    """How long the ``timeout`` fault sleeps (longer than any client timeout)."""
    slow_first_chunk_seconds: float = 2.0
    """Pause before the first body byte under the ``slow_first_chunk`` fault."""
    retry_after: float = 1.0
    """Value of the ``retry-after`` header sent with ``http_429``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        default_completion_tokens: int = 16,
        record: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.default_completion_tokens = default_completion_tokens
        self.record = record
        self.requests: list[RecordedRequest] = []
        self._faults: deque[str] = deque()
        self._usage_override: dict[str, int] | None = None
        self._totals = dict.fromkeys(USAGE_KEYS, 0)
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    @property
    def url(self) -> str:
        """Base URL without ``/v1``, e.g. ``http://127.0.0.1:43117``; valid after :meth:`start`."""
        if self._runner is None:
            raise RuntimeError("FakeUpstream.url: call start() (or enter the context manager) first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and start serving; with ``port=0`` the chosen port is then in :attr:`port` and :attr:`url`."""
        if self._runner is not None:
            raise RuntimeError("FakeUpstream.start: already started")
        self._closing = asyncio.Event()
        # handler_cancellation: a client that gives up on a `timeout` fault cancels the sleeping handler.
        runner = web.AppRunner(make_app(self), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving: wake requests held by the ``timeout`` fault (their connections are dropped), close all."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def inject(self, fault: str, count: int = 1) -> None:
        """Give the next ``count`` API requests (not ``GET /v1/models``) this fault, after any already queued.

        Args:
            fault: one of :data:`FAULTS`.
            count: how many requests get it.
        """
        if fault not in FAULTS:
            raise ValueError(f"FakeUpstream.inject: unknown fault {fault!r}; use one of {sorted(FAULTS)}")
        self._faults.extend([fault] * count)

    def set_usage(self, usage: Mapping[str, int] | None) -> None:
        """Report exactly these numbers for every following request, until called with None.

        The ``x-fake-usage`` header of a request is applied on top of this.

        Args:
            usage: usage keys (:data:`USAGE_KEYS` or the aliases the header takes) to their counts.
        """
        try:
            self._usage_override = None if usage is None else _normalise_usage(usage)
        except _BadRequest as e:
            raise ValueError(e.message.replace(USAGE_HEADER, "FakeUpstream.set_usage")) from None

    def reported_totals(self) -> dict[str, int]:
        """Sum of every usage the fake reported, keyed by :data:`USAGE_KEYS`."""
        return dict(self._totals)

    def reset(self) -> None:
        """Forget recorded requests and totals, queued faults and the :meth:`set_usage` override."""
        self.requests.clear()
        self._faults.clear()
        self._usage_override = None
        self._totals = dict.fromkeys(USAGE_KEYS, 0)

    # -- request handling ---------------------------------------------------------------------------------------

    def _report(self, rec: RecordedRequest, usage: dict[str, int] | None) -> None:
        if usage is None:
            return
        rec.usage = usage
        totals = self._totals
        for key in USAGE_KEYS:
            totals[key] += usage[key]

    def _steer(self, header: str | None) -> dict[str, int] | None:
        if header is None:
            return self._usage_override
        try:
            spec = json.loads(header)
        except ValueError:
            raise _BadRequest(f"{USAGE_HEADER}: not JSON: {header!r}", USAGE_HEADER) from None
        if not isinstance(spec, dict):
            raise _BadRequest(f"{USAGE_HEADER}: must be a JSON object, got {header!r}", USAGE_HEADER)
        steer = _normalise_usage(spec)
        return steer if self._usage_override is None else {**self._usage_override, **steer}

    def _fault(self, header: str | None) -> str | None:
        if header is not None:
            fault = header.strip()
            if fault not in FAULTS:
                raise _BadRequest(f"{FAULT_HEADER}: unknown fault {fault!r}; use one of {sorted(FAULTS)}", FAULT_HEADER)
            return fault
        if self._faults:
            return self._faults.popleft()
        return None

    def _latency(self, header: str | None) -> float:
        if header is None:
            return self.latency
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not value >= 0:
            raise _BadRequest(f"{LATENCY_HEADER}: must be a number of seconds >= 0, got {header!r}", LATENCY_HEADER)
        return value

    async def _hold(self, seconds: float) -> bool:
        """Sleep ``seconds``; False when :meth:`stop` cut it short."""
        closing = self._closing
        if closing is None:
            await asyncio.sleep(seconds)
            return True
        try:
            await asyncio.wait_for(closing.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: the OpenAI model list."""
        if self.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.requests.append(RecordedRequest(request.method, request.path, "openai.models", headers, status=200))
        data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "tokenfuse-fake"} for m in _MODELS]
        return web.Response(body=_dumps({"object": "list", "data": data}).encode(), content_type=_JSON_TYPE)

    async def _handle_api(self, request: web.Request, api: str) -> web.StreamResponse:
        """Answer one API request of shape ``api`` (see :data:`_REPORTABLE` for the shapes).

        Args:
            request: the aiohttp request.
            api: the API shape the route serves.
        """
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()} if self.record else {}
        rec = RecordedRequest(request.method, request.path, api, headers)
        try:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                raise _BadRequest("request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise _BadRequest("request body must be a JSON object")
            rec.body = body
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise _BadRequest("missing required field 'model' (a non-empty string)", "model")
            if api == "anthropic.messages" and _limit(body) is None:
                raise _BadRequest("max_tokens: Field required", "max_tokens")
            plan = _plan(api, body, self._steer(request.headers.get(USAGE_HEADER)), self.default_completion_tokens)
            latency = self._latency(request.headers.get(LATENCY_HEADER))
            fault = self._fault(request.headers.get(FAULT_HEADER))
        except _BadRequest as e:
            rec.status = 400
            if self.record:
                self.requests.append(rec)
            return web.Response(status=400, body=_error_body(api, 400, e.message, e.param), content_type=_JSON_TYPE)
        rec.fault = fault
        rec.stream = stream = api != "openai.embeddings" and body.get("stream") is True
        if self.record:
            self.requests.append(rec)

        if latency > 0:
            await asyncio.sleep(latency)
        if fault == "timeout" and not await self._hold(self.timeout_seconds):
            _abort(request)
            return web.Response(status=503)
        if fault == "http_500":
            rec.status = 500
            body_500 = _error_body(api, 500, "The fake upstream was told to fail (x-fake-fault: http_500).")
            return web.Response(status=500, body=body_500, content_type=_JSON_TYPE)
        if fault == "http_429":
            rec.status = 429
            body_429 = _error_body(api, 429, "Rate limit reached (fake upstream, x-fake-fault: http_429).")
            headers_429 = {"retry-after": f"{self.retry_after:g}"}
            return web.Response(status=429, body=body_429, content_type=_JSON_TYPE, headers=headers_429)

        with_usage = fault != "no_usage"
        n = next(self._ids)
        created = int(time.time())
        if stream:
            return await self._send_stream(request, rec, api, body, model, plan, fault, with_usage, n, created)

        if api == "openai.chat" and with_usage:
            data = _chat_json_bytes(f"chatcmpl-fake{n:010d}", created, model, plan)
        else:
            data = _dumps(_json_payload(api, n, created, model, body, plan, with_usage)).encode()
        if fault == "slow_first_chunk" and not await self._hold(self.slow_first_chunk_seconds):
            _abort(request)
            return web.Response(status=503)
        if fault == "cut":
            resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON_TYPE})
            resp.content_length = len(data)
            with contextlib.suppress(ConnectionResetError):
                await resp.prepare(request)
                rec.status = 200
                await resp.write(data[: len(data) // 2])
            _abort(request)
            return resp
        rec.status = 200
        self._report(rec, plan.usage if with_usage else None)
        return web.Response(body=data, content_type=_JSON_TYPE)

    async def _send_stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        api: str,
        body: Mapping[str, Any],
        model: str,
        plan: _Plan,
        fault: str | None,
        with_usage: bool,
        n: int,
        created: int,
    ) -> web.StreamResponse:
        options = body.get("stream_options")
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        if api == "openai.chat":
            sse = _openai_stream(True, f"chatcmpl-fake{n:010d}", created, model, plan, include_usage, with_usage)
            reported = include_usage and with_usage
        elif api == "openai.completions":
            sse = _openai_stream(False, f"cmpl-fake{n:010d}", created, model, plan, include_usage, with_usage)
            reported = include_usage and with_usage
        elif api == "openai.responses":
            sse = _responses_stream(f"resp_fake{n:010d}", created, model, body, plan, with_usage)
            reported = with_usage
        else:
            sse = _anthropic_stream(f"msg_fake{n:010d}", model, plan, with_usage)
            reported = with_usage

        resp = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        try:
            await resp.prepare(request)
            rec.status = 200
            if fault == "slow_first_chunk" and not await self._hold(self.slow_first_chunk_seconds):
                _abort(request)
                return resp
            cut = fault == "cut"
            pieces = sse.pieces[: sse.cut_at] if cut else sse.pieces
            # Usage is recorded just before the last bytes go out: a client that has read the whole stream (an SDK
            # stops at [DONE]) must find it recorded, even before this handler resumes.
            final = plan.usage if reported else None
            if self.chunk_delay > 0:
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(self.chunk_delay)
                    if i == len(pieces) - 1 and not cut:
                        self._report(rec, final)
                    await resp.write(piece.encode())
            else:
                if not cut:
                    self._report(rec, final)
                if pieces:
                    await resp.write("".join(pieces).encode())
            if cut:
                self._report(rec, sse.cut_usage)
                _abort(request)
                return resp
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away (an app closing a stream early, a load generator stopping): what it did not
            # receive was not reported, and it is no server error worth a traceback.
            return resp
        return resp


_API_ROUTES: Final[tuple[tuple[str, str], ...]] = (
    ("/chat/completions", "openai.chat"),
    ("/responses", "openai.responses"),
    ("/embeddings", "openai.embeddings"),
    ("/completions", "openai.completions"),
    ("/messages", "anthropic.messages"),
)


def make_app(upstream: FakeUpstream) -> web.Application:
    """The aiohttp application serving ``upstream``'s routes, each with and without the ``/v1`` prefix.

    Args:
        upstream: the server whose settings, fault queue and record the handlers use.
    """
    app = web.Application(client_max_size=64 * 1024 * 1024)

    def bind(api: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await upstream._handle_api(request, api)

        return handler

    for prefix in ("/v1", ""):
        for path, api in _API_ROUTES:
            app.router.add_post(prefix + path, bind(api))
        app.router.add_get(prefix + "/models", upstream._handle_models)
    return app


class FakeUpstreamThread:
    """A :class:`FakeUpstream` running in a background thread with its own event loop, for synchronous tests.

    ``with FakeUpstreamThread() as upstream:`` gives the running :class:`FakeUpstream` (``url``, ``requests``,
    ``inject`` …); its methods that only touch plain data are safe to call from the test thread.

    Args:
        host: see :class:`FakeUpstream`.
        port: see :class:`FakeUpstream`.
        latency: see :class:`FakeUpstream`.
        chunk_delay: see :class:`FakeUpstream`.
        default_completion_tokens: see :class:`FakeUpstream`.
        record: see :class:`FakeUpstream`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        default_completion_tokens: int = 16,
        record: bool = True,
    ) -> None:
        self.upstream = FakeUpstream(
            host=host,
            port=port,
            latency=latency,
            chunk_delay=chunk_delay,
            default_completion_tokens=default_completion_tokens,
            record=record,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        """Start the loop thread and the server; returns once it accepts connections.

        Args:
            timeout: seconds to wait for the server to come up.
        """
        if self._thread is not None:
            raise RuntimeError("FakeUpstreamThread.start: already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tokenfuse-fake-upstream", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.start(), loop).result(timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        return self.upstream

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server, then the loop thread.

        Args:
            timeout: seconds to wait for the server to stop.
        """
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.upstream.stop(), loop).result(timeout)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def serve(host: str = "127.0.0.1", port: int = 8081, latency: float = 0.0) -> None:
    """Run a fake upstream until Ctrl-C (``tokenfuse fake-upstream``); requests are counted, not recorded.

    Args:
        host: interface to bind.
        port: TCP port.
        latency: seconds before each response.
    """

    async def run() -> None:
        async with FakeUpstream(host=host, port=port, latency=latency, record=False) as upstream:
            print(f"fake upstream listening on {upstream.url} (OpenAI: {upstream.url}/v1); Ctrl-C stops", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
