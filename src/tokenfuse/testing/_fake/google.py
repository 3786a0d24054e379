"""Gemini's native ``generateContent``: its ``usageMetadata`` (``promptTokenCount`` includes cached content,
``candidatesTokenCount`` excludes thoughts), the JSON answer, and the streamed chunks of
``streamGenerateContent`` (SSE events separated by ``\\r\\n\\r\\n`` with ``alt=sse``, else one JSON array).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from tokenfuse.testing._fake.common import _answer, _dumps, _pieces, _Plan, _Stream

GOOGLE: Final = "google.generate_content"
VERBS: Final[tuple[str, ...]] = ("generateContent", "streamGenerateContent")
_SSE_END: Final = "\r\n\r\n"
_STATUS: Final[Mapping[int, str]] = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
}


def _google_error(status: int, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": _STATUS.get(status, "INTERNAL")}}


def _google_usage(u: Mapping[str, int], candidates: int) -> dict[str, Any]:
    """``usageMetadata`` after ``candidates`` visible tokens; thoughts are reported whole in every chunk."""
    thoughts = u["output_reasoning_tokens"]
    out: dict[str, Any] = {
        "promptTokenCount": u["input_tokens"],
        "candidatesTokenCount": candidates,
        "totalTokenCount": u["input_tokens"] + candidates + thoughts,
    }
    if u["cache_read_tokens"]:
        out["cachedContentTokenCount"] = u["cache_read_tokens"]
    if thoughts:
        out["thoughtsTokenCount"] = thoughts
    return out


def _google_chunk(rid: str, model: str, text: str, finish: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish is not None:
        candidate["finishReason"] = finish
    candidate["index"] = 0
    out: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        out["usageMetadata"] = usage
    out["modelVersion"] = model
    out["responseId"] = rid
    return out


def _google_finish(plan: _Plan) -> str:
    return "MAX_TOKENS" if plan.truncated else "STOP"


def _google_json(rid: str, model: str, plan: _Plan, with_usage: bool) -> dict[str, Any]:
    usage = _google_usage(plan.usage, plan.visible) if with_usage else None
    return _google_chunk(rid, model, _answer(plan.visible), _google_finish(plan), usage)


def _google_chunks(rid: str, model: str, plan: _Plan, with_usage: bool) -> list[str]:
    """The serialised chunks of a streamed answer: one word each (one empty chunk for an empty answer), every
    chunk with the running ``usageMetadata``, the last with ``finishReason``."""
    words = _pieces(plan.visible) or ("",)
    last = len(words) - 1
    finish = _google_finish(plan)
    out: list[str] = []
    for i, word in enumerate(words):
        usage = _google_usage(plan.usage, min(i + 1, plan.visible)) if with_usage else None
        out.append(_dumps(_google_chunk(rid, model, word, finish if i == last else None, usage)))
    return out


def _google_stream(rid: str, model: str, plan: _Plan, with_usage: bool) -> _Stream:
    """``streamGenerateContent?alt=sse``: ``data: {chunk}\\r\\n\\r\\n`` per chunk, no ``event:`` lines, no end marker.

    Under ``cut`` half the chunks arrive; the last of them carried the running usage, which is what was reported.
    """
    pieces = [f"data: {chunk}{_SSE_END}" for chunk in _google_chunks(rid, model, plan, with_usage)]
    cut_at = len(pieces) // 2
    cut_usage = None
    if with_usage and cut_at:
        u = plan.usage
        cut_usage = {**u, "output_tokens": min(cut_at, plan.visible) + u["output_reasoning_tokens"]}
    return _Stream(pieces, cut_at=cut_at, cut_usage=cut_usage)


def _google_array(rid: str, model: str, plan: _Plan, with_usage: bool) -> str:
    """``streamGenerateContent`` without ``alt=sse``: the same chunks as one JSON array."""
    return "[" + ",\r\n".join(_google_chunks(rid, model, plan, with_usage)) + "]"
