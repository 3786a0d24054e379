"""OpenAI Chat Completions, legacy Completions and Embeddings: their usage objects, JSON answers and SSE chunks
(Chat's JSON spliced into a prebuilt template, as it is the benchmark baseline's route).
"""

from __future__ import annotations

import base64
import functools
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Final

from tokenfuse.testing._fake.common import (
    _SLOT,
    _answer,
    _dumps,
    _encoded_pieces,
    _fill,
    _half,
    _head,
    _Plan,
    _Stream,
    _tail,
    _template,
)

_EMBEDDING_DIMS: Final = 8
_MAX_EMBEDDING_DIMS: Final = 256
_DONE: Final = "data: [DONE]\n\n"


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
