"""Usage extraction from non-streamed LLM API responses, and the request facts metering needs (API, provider, model).

Owns the mapping from each provider's usage JSON to `Usage`, following genai-prices' extractors key for key.
Pure functions: no I/O, never raise on bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, TypeGuard

from tokenfuse.metering import jsonio
from tokenfuse.metering.types import Api, Usage

__all__ = [
    "detect_api",
    "extract_usage",
    "infer_provider",
    "request_model",
    "response_text",
    "usage_from_root",
    "wants_stream",
]

MAX_COUNT = 2**53 - 1
"""Largest token count accepted; anything above is treated as missing (no call is that large, and floats stay exact)."""


# Usage's fields in order, without the named tuple's Python-level __new__ (a third of the cost of building one).
_new_usage = tuple.__new__
_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "output_reasoning_tokens",
    "details",
    "model",
    "estimated",
)
if Usage._fields != _USAGE_FIELDS:  # pragma: no cover - a guard for whoever changes Usage
    raise ImportError("metering.extract builds Usage tuples positionally; update it with Usage's fields")

_SMALL_BODY = 4096  # below this a full orjson decode (~3 µs per KiB) is cheaper than the targeted scan
_raw_decode = json.JSONDecoder().raw_decode

# --- request side -------------------------------------------------------------------------------------------------

_GOOGLE_VERBS = (":generateContent", ":streamGenerateContent")


def detect_api(path: str, host: str | None = None) -> Api | None:
    """The API shape of a request path, whatever prefix a gateway or SDK puts before it.

    Args:
        path: the URL path, optionally with a query string (``/openai/v1/chat/completions?x=1``).
        host: the upstream host; accepted for symmetry with `infer_provider` (the path alone decides).

    Returns:
        The `Api`, or None for paths that are not metered calls (model lists, batch, token counting, …).
    """
    p = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    if p.endswith(_GOOGLE_VERBS):
        return "google.generate_content"
    if p.endswith("/chat/completions"):
        return "openai.chat"
    if p.endswith("/completions"):
        return "openai.completions"
    if p.endswith("/responses"):
        return "openai.responses"
    if p.endswith("/embeddings"):
        return "openai.embeddings"
    if p.endswith("/messages"):
        return "anthropic.messages"
    return None


_HOST_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "generativelanguage.googleapis.com": "google",
    "api.deepseek.com": "deepseek",
    "api.mistral.ai": "mistral",
    "api.groq.com": "groq",
    "openrouter.ai": "openrouter",
    "api.openrouter.ai": "openrouter",
    "api.x.ai": "x-ai",
    "api.together.xyz": "together",
    "api.fireworks.ai": "fireworks",
    "api.perplexity.ai": "perplexity",
    "api.cohere.com": "cohere",
    "api.cohere.ai": "cohere",
}

_API_PROVIDERS: Mapping[str, str] = {
    "anthropic.messages": "anthropic",
    "google.generate_content": "google",
}


def infer_provider(host: str | None, api: Api | None) -> str:
    """The genai-prices provider id for a call, from the upstream host, else from the API shape.

    Args:
        host: the upstream host name, with or without a port (``api.openai.com:443``).
        api: the API shape of the call, used when the host is unknown (a local proxy, a test server).

    Returns:
        A genai-prices provider id such as ``openai``, ``anthropic``, ``google``, ``azure``.
    """
    if host:
        h = host.strip().lower().rstrip(".")
        if h.startswith("["):
            h = h.split("]", 1)[0] + "]"
        elif h.count(":") == 1:
            h = h.split(":", 1)[0]
        found = _HOST_PROVIDERS.get(h)
        if found is not None:
            return found
        if h.endswith((".openai.azure.com", ".services.ai.azure.com", ".cognitiveservices.azure.com")):
            return "azure"
        if h.endswith(".googleapis.com"):
            return "google"
    if api is None:
        return "openai"
    return _API_PROVIDERS.get(api, "openai")


def request_model(api: Api, body: Mapping[str, Any], path: str = "") -> str | None:
    """The model the client asked for: ``body["model"]``, or for Gemini the ``models/X`` segment of the path.

    Args:
        api: the API shape.
        body: the parsed request body.
        path: the request path (Gemini names the model there, ``/v1beta/models/gemini-2.5-flash:generateContent``).

    Returns:
        The model name, or None when the request names none.
    """
    try:
        if api == "google.generate_content" and path:
            p = path.split("?", 1)[0]
            i = p.rfind("/models/")
            if i >= 0:
                name = p[i + len("/models/") :].split(":", 1)[0].strip("/")
                if name:
                    return name
        m = body.get("model") if isinstance(body, Mapping) else None
        if isinstance(m, str) and m:
            return m.removeprefix("models/") if api == "google.generate_content" else m
    except Exception:  # request inspection must never break a call
        return None
    return None


def wants_stream(api: Api, body: Mapping[str, Any], path: str = "") -> bool:
    """True when the request asks for a streamed (SSE) response.

    Args:
        api: the API shape.
        body: the parsed request body (``"stream": true``).
        path: the request path (Gemini streams on ``:streamGenerateContent``).
    """
    if api == "google.generate_content":
        return ":streamGenerateContent" in path
    try:
        return isinstance(body, Mapping) and body.get("stream") is True
    except Exception:
        return False


# --- usage mapping ------------------------------------------------------------------------------------------------


def _n(value: object) -> int | None:
    """A valid token count, or None: bools, floats, negatives, NaN and absurdly large values count as missing."""
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    return None


def _invalid(u: Mapping[str, Any], keys: tuple[str, ...]) -> bool:
    """Whether a count is present but not a valid count (negative, a float, a string…): then the provider's
    numbers cannot be trusted at all, and the usage is treated as missing (estimated), not read as 0."""
    for k in keys:
        v = u.get(k)
        if v is not None and _n(v) is None:
            return True
    return False


def _is_map(obj: object) -> TypeGuard[Mapping[str, Any]]:
    return type(obj) is dict or isinstance(obj, Mapping)  # JSON gives dicts: the ABC check is the slow exception


def _sub(obj: object, key: str) -> int | None:
    if _is_map(obj):
        return _n(obj.get(key))
    return None


def _put(details: dict[str, int], key: str, value: int | None) -> None:
    if value is not None:
        details[key] = details.get(key, 0) + value


def _make(details: dict[str, int], model: object) -> Usage:
    """Split the genai-prices key/value dict into `Usage`'s core fields and its details."""
    pop = details.pop
    return Usage(
        pop("input_tokens", 0),
        pop("output_tokens", 0),
        pop("cache_read_tokens", 0),
        pop("cache_write_tokens", 0),
        pop("output_reasoning_tokens", 0),
        {k: v for k, v in details.items() if v} if details else {},
        model if type(model) is str and model else None,
    )


def _openai_chat(u: Mapping[str, Any], model: object) -> Usage | None:
    # genai-prices "openai" / chat flavor, key for key; legacy Completions has the same usage shape.
    # Written out flat, without helper calls: this runs on every call, and each call costs more than its check.
    prompt = u.get("prompt_tokens")
    completion = u.get("completion_tokens")
    if type(prompt) is not int or not 0 <= prompt <= MAX_COUNT:
        prompt = None
    if type(completion) is not int or not 0 <= completion <= MAX_COUNT:
        completion = None
    if (prompt is None or completion is None) and (
        (prompt is None and completion is None) or _invalid(u, ("prompt_tokens", "completion_tokens"))
    ):
        return None
    details: dict[str, int] = {}
    cached = cache_write = reasoning = -1
    pd = u.get("prompt_tokens_details")
    if pd is not None and _is_map(pd):
        v = pd.get("cached_tokens")
        if type(v) is int and 0 <= v <= MAX_COUNT:
            cached = v
        v = pd.get("cache_write_tokens")
        if type(v) is int and 0 <= v <= MAX_COUNT:
            cache_write = v
        v = pd.get("audio_tokens")
        if type(v) is int and 0 < v <= MAX_COUNT:
            details["input_audio_tokens"] = v
    if cached < 0:
        # DeepSeek's own field, for servers that do not also fill prompt_tokens_details.
        v = u.get("prompt_cache_hit_tokens")
        if type(v) is int and 0 <= v <= MAX_COUNT:
            cached = v
    cd = u.get("completion_tokens_details")
    if cd is not None and _is_map(cd):
        v = cd.get("reasoning_tokens")
        if type(v) is int and 0 <= v <= MAX_COUNT:
            reasoning = v
        v = cd.get("audio_tokens")
        if type(v) is int and 0 < v <= MAX_COUNT:
            details["output_audio_tokens"] = v
    return _new_usage(
        Usage,
        (
            prompt or 0,
            completion or 0,
            cached if cached > 0 else 0,
            cache_write if cache_write > 0 else 0,
            reasoning if reasoning > 0 else 0,
            details,
            model if type(model) is str and model else None,
            False,
        ),
    )


def _openai_embeddings(u: Mapping[str, Any], model: object) -> Usage | None:
    prompt = _n(u.get("prompt_tokens"))
    if prompt is None:
        prompt = _n(u.get("total_tokens"))
    if prompt is None:
        return None
    return Usage(prompt, model=model if type(model) is str and model else None)


def _openai_responses(u: Mapping[str, Any], model: object) -> Usage | None:
    inp = u.get("input_tokens")
    out = u.get("output_tokens")
    if type(inp) is not int or not 0 <= inp <= MAX_COUNT:
        inp = None
    if type(out) is not int or not 0 <= out <= MAX_COUNT:
        out = None
    if (inp is None and out is None) or _invalid(u, ("input_tokens", "output_tokens")):
        return None
    cached = cache_write = reasoning = None
    idt = u.get("input_tokens_details")
    if idt is not None and _is_map(idt):
        cached = _n(idt.get("cached_tokens"))
        cache_write = _n(idt.get("cache_write_tokens"))
    odt = u.get("output_tokens_details")
    if odt is not None and _is_map(odt):
        reasoning = _n(odt.get("reasoning_tokens"))
    return Usage(
        inp or 0,
        out or 0,
        cached or 0,
        cache_write or 0,
        reasoning or 0,
        {},
        model if type(model) is str and model else None,
    )


def _anthropic_counts(u: Mapping[str, Any], d: dict[str, int]) -> bool:
    """Add one Anthropic usage object's counts to ``d`` (genai-prices' anthropic extractor); False if it has none."""
    inp = _n(u.get("input_tokens"))
    out = _n(u.get("output_tokens"))
    cw = _n(u.get("cache_creation_input_tokens"))
    cr = _n(u.get("cache_read_input_tokens"))
    if inp is None and out is None and cw is None and cr is None:
        return False
    # input_tokens is Anthropic's uncached part only; ours (and genai-prices') is all input.
    _put(d, "input_tokens", inp)
    _put(d, "input_tokens", cw)
    _put(d, "input_tokens", cr)
    _put(d, "cache_write_tokens", cw)
    cc = u.get("cache_creation")
    _put(d, "cache_write_5m_tokens", _sub(cc, "ephemeral_5m_input_tokens"))
    _put(d, "cache_write_1h_tokens", _sub(cc, "ephemeral_1h_input_tokens"))
    _put(d, "cache_read_tokens", cr)
    _put(d, "web_searches", _sub(u.get("server_tool_use"), "web_search_requests"))
    _put(d, "output_reasoning_tokens", _sub(u.get("output_tokens_details"), "thinking_tokens"))
    _put(d, "output_tokens", out)
    return True


_ANTHROPIC_COUNTS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _anthropic(u: Mapping[str, Any], model: object) -> Usage | None:
    if _invalid(u, _ANTHROPIC_COUNTS):
        return None
    d: dict[str, int] = {}
    iterations = u.get("iterations")
    if type(iterations) is list and iterations:
        # With server-side compaction Anthropic runs several model iterations for one request; the top-level
        # counts describe only the last ("message") iteration, and each iteration is billed, so the request
        # costs the SUM over usage.iterations (the compaction pass re-reads the whole cached context). Summing
        # the top level instead would drop the compaction pass; taking message_start's counts would drop the
        # answer. Server tool use is reported once, at the top level, unless an iteration carries it.
        any_counts = False
        for it in iterations:
            if _is_map(it):
                any_counts = _anthropic_counts(it, d) or any_counts
        if any_counts:
            if "web_searches" not in d:
                _put(d, "web_searches", _sub(u.get("server_tool_use"), "web_search_requests"))
            return _make(d, model)
        d = {}
    if not _anthropic_counts(u, d):
        return None
    return _make(d, model)


_MODALITY_KEYS = {"TEXT": "text", "AUDIO": "audio", "IMAGE": "image", "DOCUMENT": "image", "VIDEO": "video"}


def _modalities(items: object) -> dict[str, int]:
    """Gemini's ``[{"modality": "TEXT", "tokenCount": n}, …]`` as {modality: n}, first match per modality like
    genai-prices' array-match (DOCUMENT is billed as IMAGE there, and both are summed)."""
    out: dict[str, int] = {}
    if not isinstance(items, list):
        return out
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, Mapping):
            continue
        m = item.get("modality")
        if not isinstance(m, str) or not m:
            continue
        up = m.upper()
        if up in seen or up not in _MODALITY_KEYS:
            continue
        seen.add(up)
        n = _n(item.get("tokenCount"))
        if n is not None:
            key = _MODALITY_KEYS[up]
            out[key] = out.get(key, 0) + n
    return out


def _google(u: Mapping[str, Any], model: object) -> Usage | None:
    if _invalid(u, ("promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "cachedContentTokenCount")):
        return None
    d: dict[str, int] = {}
    prompt = _n(u.get("promptTokenCount"))
    cand = _n(u.get("candidatesTokenCount"))
    thoughts = _n(u.get("thoughtsTokenCount"))
    tool = _n(u.get("toolUsePromptTokenCount"))
    cached = _n(u.get("cachedContentTokenCount"))
    _put(d, "input_tokens", prompt)
    _put(d, "cache_read_tokens", cached)
    for mod, n in _modalities(u.get("cacheTokensDetails")).items():
        _put(d, f"cache_{mod}_read_tokens", n)
    for mod, n in _modalities(u.get("promptTokensDetails")).items():
        _put(d, f"input_{mod}_tokens", n)
    for mod, n in _modalities(u.get("candidatesTokensDetails")).items():
        _put(d, f"output_{mod}_tokens", n)
    # Thoughts are billed as output: output_tokens = candidates + thoughts, as genai-prices counts them.
    _put(d, "output_tokens", cand)
    _put(d, "output_tokens", thoughts)
    _put(d, "output_reasoning_tokens", thoughts)
    _put(d, "input_tokens", tool)
    _put(d, "input_tool_tokens", tool)
    for mod, n in _modalities(u.get("toolUsePromptTokensDetails")).items():
        _put(d, f"input_{mod}_tokens", n)
        _put(d, f"input_{mod}_tool_tokens", n)
    if not d:
        return None
    return _make(d, model)


def usage_from_root(api: Api, root: object) -> Usage | None:
    """`Usage` from a parsed response object (or one SSE event's object) of the given API; None if it has none.

    Args:
        api: the API shape.
        root: the decoded JSON: a response body, a Responses ``response.completed`` event, or a Gemini chunk list.
    """
    if api == "google.generate_content":
        if isinstance(root, list):
            # Gemini's non-SSE streamGenerateContent answers a JSON array of running-total chunks: take the last.
            for item in reversed(root):
                if _is_map(item) and _is_map(item.get("usageMetadata")):
                    root = item
                    break
            else:
                return None
        if not _is_map(root):
            return None
        u = root.get("usageMetadata")
        return _google(u, root.get("modelVersion")) if _is_map(u) else None
    if not _is_map(root):
        return None
    u = root.get("usage")
    if api == "openai.responses" and not _is_map(u):
        inner = root.get("response")
        if _is_map(inner):
            root = inner
            u = root.get("usage")
    if not _is_map(u):
        return None
    model = root.get("model")
    if api == "openai.chat" or api == "openai.completions":
        return _openai_chat(u, model)
    if api == "openai.responses":
        return _openai_responses(u, model)
    if api == "openai.embeddings":
        return _openai_embeddings(u, model)
    if api == "anthropic.messages":
        return _anthropic(u, model)
    return None


# --- fast body scan -----------------------------------------------------------------------------------------------

_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_SCAN_LIMIT = 8192
_WS = b" \t\r\n"
_USAGE_KEY: Mapping[str, bytes] = {"google.generate_content": b'"usageMetadata"'}
_MODEL_KEY: Mapping[str, bytes] = {"google.generate_content": b'"modelVersion"'}


def _depth(fragment: str) -> tuple[int, int]:
    """Net ``{`` and ``[`` nesting a JSON fragment opens (negative: closes), ignoring brackets inside strings."""
    s = _STRING_RE.sub("", fragment) if '"' in fragment else fragment
    return s.count("{") - s.count("}"), s.count("[") - s.count("]")


def _value_after(data: bytes, key_end: int) -> int:
    """Index of the value after ``"key"`` ending at ``key_end`` (past the colon), or -1 if no colon follows."""
    n = len(data)
    i = key_end
    while i < n and data[i] in _WS:
        i += 1
    if i >= n or data[i] != 0x3A:  # ':'
        return -1
    i += 1
    while i < n and data[i] in _WS:
        i += 1
    return i


def _scan(api: Api, data: bytes) -> tuple[bool, Usage | None]:
    """Find usage without decoding the whole body: (True, usage) when sure, (False, None) to fall back to json.loads.

    Every provider puts the usage object near the end of its response, so: take the last ``"usage":`` key, decode
    just its value, and prove it is a key of the top-level object by counting the brackets after it (strings
    stripped). The model key is looked for after usage (Gemini), then before it (OpenAI, Anthropic), and proved
    top-level the same way. Anything unusual (usage far from the end, nested, escaped) takes the full parse.
    """
    n = len(data)
    start = 0
    while start < n and data[start] in _WS:
        start += 1
    if start >= n or data[start] != 0x7B:  # '{': arrays and scalars take the full path
        return False, None
    ukey = _USAGE_KEY.get(api, b'"usage"')
    i = data.rfind(ukey)
    if i < 0:
        return True, None
    v = _value_after(data, i + len(ukey))
    if v < 0 or n - v > _SCAN_LIMIT:
        return False, None
    tail = data[v:].decode("utf-8", "replace")
    try:
        usage_obj, end = _raw_decode(tail)
    except ValueError:
        return False, None
    rest = tail[end:]
    if rest.strip() != "}" and (not rest.rstrip().endswith("}") or _depth(rest) != (-1, 0)):
        return False, None
    if not _is_map(usage_obj):
        return True, None
    mkey = _MODEL_KEY.get(api, b'"model"')
    model: object = None
    found, model = _model_in(rest, mkey.decode())
    if not found:
        j = data.find(mkey, start, i)
        tries = 0
        while j >= 0:
            tries += 1
            if j > _SCAN_LIMIT or tries > 8:
                return False, None
            mv = _value_after(data, j + len(mkey))
            if mv >= 0:
                prefix = data[start + 1 : j]
                # Common case (OpenAI, Anthropic put the model among the first, flat keys): no bracket at all
                # before it, so it is top-level without decoding; otherwise count brackets outside strings.
                if (b"{" in prefix or b"[" in prefix or b"}" in prefix or b"]" in prefix) and _depth(
                    prefix.decode("utf-8", "replace")
                ) != (0, 0):
                    return False, None
                window = data[mv : min(i, mv + 1024)].decode("utf-8", "replace")
                try:
                    model, _ = _raw_decode(window)
                except ValueError:
                    return False, None
                break
            j = data.find(mkey, j + len(mkey), i)
    if api == "google.generate_content":
        return True, usage_from_root(api, {"usageMetadata": usage_obj, "modelVersion": model})
    return True, usage_from_root(api, {"usage": usage_obj, "model": model})


def _model_in(rest: str, key: str) -> tuple[bool, object]:
    """The value of a top-level ``key`` in the fragment after the usage object, if there is one."""
    k = rest.find(key)
    while k >= 0:
        after = rest[k + len(key) :].lstrip()
        if after.startswith(":") and _depth(rest[:k]) == (0, 0):
            try:
                value, _ = _raw_decode(after[1:].lstrip())
            except ValueError:
                return False, None
            return True, value
        k = rest.find(key, k + 1)
    return False, None


def extract_usage(api: Api, body: bytes | str | Mapping[str, Any]) -> Usage | None:
    """`Usage` of a non-streamed response body, with ``model`` set to the model the provider says answered.

    Counts follow genai-prices: ``input_tokens`` is all input (cache reads and writes included), ``output_tokens``
    all output (reasoning included). Values that are not non-negative ints are treated as missing.

    Args:
        api: the API shape of the call.
        body: the response body as bytes, text, or already-decoded JSON.

    Returns:
        The usage, or None when the body carries none, is not JSON, or has the wrong types. Never raises.
    """
    try:
        if type(body) is bytes:
            if len(body) > _SMALL_BODY:
                sure, usage = _scan(api, body)
                if sure:
                    return usage
            try:
                root = jsonio.fast_loads(body)
            except jsonio.DecodeError:
                root = jsonio.loads(body)
            return usage_from_root(api, root)
        if _is_map(body):
            return usage_from_root(api, body)
        if isinstance(body, str):
            data = body.encode("utf-8", "surrogatepass")
        elif isinstance(body, bytes | bytearray | memoryview):
            data = bytes(body)
        else:
            return usage_from_root(api, body)
        if len(data) > _SMALL_BODY:
            sure, usage = _scan(api, data)
            if sure:
                return usage
        return usage_from_root(api, jsonio.loads(data))
    except Exception:  # a malformed body must never break metering: no usage is the answer
        return None


# Where each API puts what the model generated, and the keys whose string values are generated text (answer,
# reasoning, tool arguments) — the same parts `StreamUsageParser` collects from a stream.
_OUTPUT_ROOTS: Mapping[str, str] = {
    "openai.chat": "choices",
    "openai.completions": "choices",
    "openai.responses": "output",
    "anthropic.messages": "content",
    "google.generate_content": "candidates",
}
_TEXT_KEYS = frozenset({"content", "text", "reasoning_content", "reasoning", "refusal", "arguments", "thinking",
                        "partial_json"})  # fmt: skip
_NESTED_KEYS = frozenset({"message", "content", "parts", "tool_calls", "function", "summary", "functionCall", "args"})


def response_text(api: Api, body: bytes | Mapping[str, Any]) -> str:
    """The generated text of a non-streamed response (answer, reasoning, tool arguments), for estimating output
    when the response reports no usage. Never raises; "" when there is none or the body is not JSON."""
    try:
        root = jsonio.loads(body) if isinstance(body, bytes) else body
        if not _is_map(root):
            return ""
        key = _OUTPUT_ROOTS.get(api)
        if key is None:
            return ""
        out: list[str] = []
        _collect(root.get(key), out, 0)
        return "\n".join(out)
    except Exception:
        return ""


def _collect(node: object, out: list[str], depth: int) -> None:
    if depth > 12:
        return
    if isinstance(node, list):
        for item in node:
            _collect(item, out, depth + 1)
    elif _is_map(node):
        for k, v in node.items():
            if isinstance(v, str):
                if k in _TEXT_KEYS and v:
                    out.append(v)
            elif k in _NESTED_KEYS or k in _TEXT_KEYS:
                if k == "args" and _is_map(v):
                    out.append(jsonio.dumps(v).decode())
                else:
                    _collect(v, out, depth + 1)
        inp = node.get("input")
        if node.get("type") == "tool_use" and _is_map(inp):
            out.append(jsonio.dumps(inp).decode())
