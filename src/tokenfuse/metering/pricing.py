"""The price of one call in USD: genai-prices' rates (tiers and time-dependent prices honoured), or config overrides.

Owns the fast path: a model's genai-prices `ModelPrice` is resolved once per (provider, model, UTC day) and compiled
into a plan that prices each call in exact integer arithmetic, equal to ``genai_prices.calc_price``'s Decimal total.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal, cast

from genai_prices import data_snapshot
from genai_prices import types as gp_types
from genai_prices.data_units import unit_data
from genai_prices.units import UnitDef, UnitRegistry
from genai_prices.validation import validate_priced_units

from tokenfuse.config import PriceOverride
from tokenfuse.logs import log_event
from tokenfuse.metering.extract import MAX_COUNT
from tokenfuse.metering.types import Usage

__all__ = ["Price", "Pricer"]

log = logging.getLogger("tokenfuse.metering")

_REGISTRY = UnitRegistry(unit_data)
_REPORTED_KEYS = frozenset(k for k in _REGISTRY.units if k != "requests")  # usage keys a Usage may carry
_ZERO = Decimal(0)
_MILLION = Decimal(1_000_000)
_CORE_KEYS = frozenset(
    {"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "output_reasoning_tokens"}
)
# Families whose usage keys are plain counts that `Usage` carries; other families (durations, characters, pixels,
# pages, …) take genai-prices' own calc_price, which knows their special cases.
_LINEAR_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "output_reasoning_tokens")
_FAST_FAMILIES = frozenset({"tokens", "tool_calls", "requests"})
_MAX_CACHE = 4096
_PER_LIMIT = 1_000_000  # every fast-path unit is priced per 1e6 (tokens) or 1e3 (requests, tool calls)
_UNRESOLVED = object()


@dataclass(frozen=True, slots=True)
class Price:
    """The cost of one call.

    Args:
        input_usd: cost of the input side (cache reads and writes included).
        output_usd: cost of the output side (reasoning included).
        total_usd: everything, including per-request and tool-call fees that are neither input nor output.
        exact: the total as a Decimal, equal to genai-prices' ``calc_price(...).total_price``.
        source: where the rates came from.
    """

    input_usd: float
    output_usd: float
    total_usd: float
    exact: Decimal
    source: Literal["genai-prices", "override"]


def _count(value: object) -> int:
    """A usage value made safe to price: ints only, clamped to [0, MAX_COUNT]."""
    if type(value) is not int or value <= 0:
        return 0
    return value if value <= MAX_COUNT else MAX_COUNT


def _is_price(value: object) -> bool:
    return isinstance(value, Decimal) and value.is_finite() and value >= 0


@dataclass(frozen=True, slots=True)
class _Term:
    """One priced unit: which leaf count it multiplies, at what rate(s), as integers over the plan's denominator."""

    leaf: int  # index into the plan's leaf counts; -1 = the per-request fee (count 1)
    base: int
    tiers: tuple[tuple[int, int], ...]  # (start, rate), highest start first; empty when not tiered
    direction: int  # 1 input, 2 output, 0 neither (request and tool-call fees)


def _decimal_places(value: Decimal) -> int:
    exp = value.as_tuple().exponent
    return -exp if isinstance(exp, int) and exp < 0 else 0


class _Plan:
    """A compiled `ModelPrice`: leaf decomposition and the terms, in genai-prices' order.

    genai-prices sums ``rate * count / per`` in Decimal per unit. Every rate here has few decimal places and every
    ``per`` is a power of ten, so the same sum is computed exactly in integers over one denominator and turned into
    a Decimal once: equal to genai-prices' total (its Decimal arithmetic is exact at these magnitudes), and several
    times cheaper than a Decimal multiply-divide-add per unit.
    """

    __slots__ = ("denominator", "has_tiers", "keys", "linear", "parents", "terms")

    def __init__(self, model_price: gp_types.ModelPrice) -> None:
        priced: list[tuple[UnitDef, Decimal | gp_types.TieredPrices]] = []
        rates: list[Decimal] = []
        for price_key, value in model_price.__dict__.items():
            if price_key.startswith("_") or value is None:
                continue
            try:
                unit = _REGISTRY.unit_for_price_key(price_key)
            except KeyError:
                continue  # genai-prices warns and ignores unknown price keys too
            if unit.dimensions.get("family") not in _FAST_FAMILIES or _PER_LIMIT % unit.per:
                raise _NeedsSlowPath(price_key)
            if isinstance(value, gp_types.TieredPrices):
                if not _is_price(value.base) or not all(
                    type(t.start) is int and t.start >= 0 and _is_price(t.price) for t in value.tiers
                ):
                    raise _NeedsSlowPath(price_key)
                rates.append(value.base)
                rates.extend(t.price for t in value.tiers)
            elif _is_price(value):
                rates.append(value)
            else:
                raise _NeedsSlowPath(price_key)
            priced.append((unit, value))
        validate_priced_units(tuple(u for u, _ in priced), _REGISTRY)
        places = max((_decimal_places(r) for r in rates), default=0)
        if places > 18:
            raise _NeedsSlowPath("precision")
        scale = 10**places
        self.denominator: int = scale * _PER_LIMIT

        def coef(rate: Decimal, per: int) -> int:
            return int(rate * scale) * (_PER_LIMIT // per)

        # Leaf decomposition, as genai-prices' decompose.compute_leaf_values: most specific units first; each
        # unit's leaf is its reported count minus the leaves of every priced unit more specific than it, so
        # e.g. input_mtok applies to input_tokens - cache_read - cache_write.
        leaf_units = sorted(
            (u for u, _ in priced if u.usage_key != "requests"), key=lambda u: (-len(u.dimensions), u.usage_key)
        )
        index = {u.usage_key: i for i, u in enumerate(leaf_units)}
        self.keys: tuple[tuple[str, bool], ...] = tuple((u.usage_key, u.usage_key in _CORE_KEYS) for u in leaf_units)
        self.parents: tuple[tuple[int, ...], ...] = tuple(
            tuple(j for j, d in enumerate(leaf_units) if d is not u and u.dimensions.items() <= d.dimensions.items())
            for u in leaf_units
        )
        terms: list[_Term] = []
        for unit, value in priced:
            if isinstance(value, gp_types.TieredPrices):
                ordered = sorted(value.tiers, key=lambda t: t.start, reverse=True)
                tiers = tuple((t.start, coef(t.price, unit.per)) for t in ordered)
                base = coef(value.base, unit.per)
            else:
                tiers = ()
                base = coef(value, unit.per)
            leaf = -1 if unit.usage_key == "requests" else index[unit.usage_key]
            direction = {"input": 1, "output": 2}.get(unit.dimensions.get("direction", ""), 0)
            terms.append(_Term(leaf, base, tiers, direction))
        self.terms = tuple(terms)
        self.has_tiers = any(t.tiers for t in terms)
        self.linear = None if self.has_tiers else self._linear()

    def _linear(self) -> tuple[int, int, int, int, int, int]:
        """The total as integer coefficients of the five core counts, for usage without details.

        Without tiers the total is linear in the leaves, and each leaf is its count minus its more specific
        leaves: linear in the counts as long as no leaf goes negative (`price` checks; see `Pricer.cost_usd`).
        Returns (per-request fee, input, output, cache read, cache write, reasoning) over `denominator`.
        """
        combos: list[dict[str, int]] = []
        for i, (key, core) in enumerate(self.keys):
            combo = {key: 1} if core else {}
            for j in self.parents[i]:
                for k, c in combos[j].items():
                    combo[k] = combo.get(k, 0) - c
            combos.append(combo)
        coef = dict.fromkeys(_LINEAR_KEYS, 0)
        fee = 0
        for t in self.terms:
            if t.leaf < 0:
                fee += t.base
                continue
            for k, c in combos[t.leaf].items():
                coef[k] += t.base * c
        return (fee, *(coef[k] for k in _LINEAR_KEYS))  # type: ignore[return-value]

    def price(self, usage: Usage) -> tuple[int, int, int, bool]:
        """(input, output, total) over `denominator`, and whether the usage was consistent (else it was clamped)."""
        details = usage.details
        leaves: list[int] = []
        consistent = True
        parents = self.parents
        for i, (key, core) in enumerate(self.keys):
            v = getattr(usage, key) if core else (details.get(key, 0) if isinstance(details, Mapping) else 0)
            if type(v) is not int or v <= 0:
                v = 0
            elif v > MAX_COUNT:
                v = MAX_COUNT
            for j in parents[i]:
                v -= leaves[j]
            if v < 0:
                consistent = False  # a detail above its total: genai-prices refuses, we bill the details
                v = 0
            leaves.append(v)
        total_input = _count(usage.input_tokens) if self.has_tiers else 0
        inp = out = total = 0
        for t in self.terms:
            count = 1 if t.leaf < 0 else leaves[t.leaf]
            if not count:
                continue
            rate = t.base
            for start, tier_rate in t.tiers:
                # The "cliff" model: past a threshold on total input, the tier's rate applies to every token.
                if total_input > start:
                    rate = tier_rate
                    break
            amount = rate * count
            total += amount
            if t.direction == 1:
                inp += amount
            elif t.direction == 2:
                out += amount
        return inp, out, total, consistent


class _NeedsSlowPath(Exception):
    pass


class _Model:
    """A resolved genai-prices model: its plans per `ModelPrice`, and the one in force for the last UTC day."""

    __slots__ = ("info", "plans", "provider", "time_of_day", "today")

    def __init__(self, provider: gp_types.Provider, info: gp_types.ModelInfo) -> None:
        self.provider = provider
        self.info = info
        self.plans: dict[int, tuple[gp_types.ModelPrice, _Plan | None]] = {}
        prices = info.prices
        self.time_of_day = isinstance(prices, list) and any(
            isinstance(c.constraint, gp_types.TimeOfDateConstraint) for c in prices
        )
        # (UTC day, its ModelPrice) as one tuple, so concurrent callers never pair one day with another's price.
        self.today: tuple[date, gp_types.ModelPrice] | None = None

    def model_price(self, when: datetime) -> gp_types.ModelPrice:
        """The prices in force at ``when`` (UTC): start dates change them by day, off-peak windows by the hour."""
        if self.time_of_day:
            return self.info.get_prices(when)
        day = when.date()
        today = self.today
        if today is not None and today[0] == day:
            return today[1]
        mp = self.info.get_prices(when)
        self.today = (day, mp)
        return mp

    def plan(self, mp: gp_types.ModelPrice) -> _Plan | None:
        entry = self.plans.get(id(mp))
        if entry is None or entry[0] is not mp:
            try:
                plan: _Plan | None = _Plan(mp)
            except _NeedsSlowPath:
                plan = None
            entry = (mp, plan)
            self.plans[id(mp)] = entry
        return entry[1]


def _utc(when: datetime | None) -> datetime:
    if when is None:
        return datetime.now(UTC)
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)  # genai-prices reads naive timestamps as UTC
    return when.astimezone(UTC)


def _float(d: Decimal) -> float:
    f = float(d)
    return f if math.isfinite(f) and f >= 0 else 0.0


class Pricer:
    """Prices calls: config overrides first, then genai-prices; None for models neither knows.

    Args:
        overrides: USD per million tokens by model name (``pricing.overrides`` in tokenfuse.yaml).
    """

    def __init__(self, overrides: Mapping[str, PriceOverride] | None = None) -> None:
        self._overrides: dict[str, PriceOverride] = dict(overrides or {})
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _Model | None] = {}
        self._override_ids: dict[str, dict[str, str]] = {}
        self._logged: set[tuple[str, str, str]] = set()
        self._affine: dict[tuple[str, str, int], tuple[float, float, float] | Literal[False]] = {}
        self._quotes: dict[tuple[str, str, str | None], tuple[int, _Plan | None]] = {}

    # -- public ---------------------------------------------------------------------------------------------------

    def price(self, provider: str, model: str, usage: Usage, when: datetime | None = None) -> Price | None:
        """The price of ``usage`` for ``model`` at ``provider``.

        Args:
            provider: genai-prices provider id (``openai``, ``anthropic``, ``google``, ``deepseek``, ``azure``, …).
            model: the model to price as; when unknown, ``usage.model`` (the model that answered) is tried next.
            usage: the call's usage.
            when: time of the call (default now); prices can change by date and, for some providers, by hour.

        Returns:
            The price, or None when no override and no genai-prices model matches. Never raises.
        """
        try:
            return self._price(provider, model, usage, when)
        except Exception as e:  # pricing must never break a call
            self._log_once("error", provider, model, "pricing %s/%s failed (%s); the call counts as unpriced", e)
            return None

    def cost_usd(self, provider: str, model: str, usage: Usage) -> float | None:
        """``price(provider, model, usage).total_usd`` (the same float), or None when unpriced; for the meter.

        The meter prices every call: the plan in force for (provider, model, answering model) is looked up once
        per UTC day, and the call costs one integer evaluation of it, without a `Price` or a Decimal. Overrides,
        time-of-day prices and usage the plan cannot take go through `price`. Never raises.

        Args:
            provider: genai-prices provider id.
            model: the model to price as (``usage.model`` is tried next, as in `price`).
            usage: the call's usage.
        """
        try:
            day = int(time.time() // 86400)  # UTC day: genai-prices' prices change by date
            key = (provider, model, usage.model)
            quote = self._quotes.get(key)
            if quote is None or quote[0] != day:
                quote = (day, self._quote_plan(provider, model, usage))
                if len(self._quotes) >= _MAX_CACHE:
                    self._quotes.clear()  # model names come from traffic; keep the cache bounded
                self._quotes[key] = quote
            plan = quote[1]
            if plan is not None:
                lin = plan.linear
                inp, out, read, write, reasoning, details = usage[:6]
                if (
                    lin is not None
                    and not details
                    and type(inp) is int
                    and type(out) is int
                    and type(read) is int
                    and type(write) is int
                    and type(reasoning) is int
                    and read >= 0
                    and write >= 0
                    and read + write <= inp <= MAX_COUNT
                    and 0 <= reasoning <= out <= MAX_COUNT
                ):
                    # Every leaf is >= 0 here, so this is `_Plan.price`'s integer total, term for term.
                    fee, c_in, c_out, c_read, c_write, c_reasoning = lin
                    total: int = (
                        fee + c_in * inp + c_out * out + c_read * read + c_write * write + c_reasoning * reasoning
                    )
                    return total / plan.denominator
                _, _, exact, consistent = plan.price(usage)
                if consistent:
                    return exact / plan.denominator
        except Exception:  # the full path below logs what is wrong
            pass
        p = self.price(provider, model, usage)
        return None if p is None else p.total_usd

    def _quote_plan(self, provider: str, model: str, usage: Usage) -> _Plan | None:
        """The plan `_price` would use for this call today, or None when it would not use one."""
        override, resolved, _ = self._select(provider, model, usage)
        if override is not None or resolved is None or resolved.time_of_day:
            return None
        return resolved.plan(resolved.model_price(_utc(None)))

    def _select(self, provider: str, model: str, usage: Usage) -> tuple[PriceOverride | None, _Model | None, str]:
        """What prices a call: a config override, else the genai-prices model, with the name it was found by.

        ``model`` first, then the model that answered (``usage.model``), for overrides and genai-prices alike.
        """
        answered = usage.model if isinstance(usage.model, str) and usage.model != model else None
        if self._overrides:
            ov = self._override_for(provider, model) if model else None
            if ov is None and answered:
                ov = self._override_for(provider, answered)
            if ov is not None:
                return ov, None, model
        resolved = self._resolve(provider, model) if model else None
        if resolved is None and answered:
            return None, self._resolve(provider, answered), answered
        return None, resolved, model

    def context_window(self, provider: str, model: str) -> int | None:
        """The most input tokens the model can take, where genai-prices knows it: its context window, unless its
        input is priced in tiers (then longer contexts exist: Anthropic's 200k window has a 1M beta priced above
        200k) — None then, and when unknown."""
        resolved = self._resolve(provider, model) if model else None
        if resolved is None:
            return None
        window = getattr(resolved.info, "context_window", None)
        if type(window) is not int or window <= 0:
            return None
        try:
            tiered = isinstance(resolved.model_price(datetime.now(UTC)).input_mtok, gp_types.TieredPrices)
        except Exception:
            return None
        return None if tiered else window

    def worst_case_usd(self, provider: str, model: str, input_tokens: int, output_tokens: int) -> float:
        """The price of ``input_tokens`` in and ``output_tokens`` out, for admission control (0.0 if unknown).

        Args:
            provider: genai-prices provider id.
            model: the requested model.
            input_tokens: estimated prompt tokens.
            output_tokens: the most output the request allows.
        """
        inp, out = _count(input_tokens), _count(output_tokens)
        # Admission prices every request; without tiers the price is affine in (input, output), so its three
        # coefficients are found once per model and hour (hour: some providers price by time of day).
        key = (provider, model, int(time.time() // 3600))
        coef = self._affine.get(key)
        if coef is None:
            coef = self._affine_coefficients(provider, model)
            if len(self._affine) > 10_000:
                self._affine.clear()
            self._affine[key] = coef
        if coef is False:
            p = self.price(provider, model, Usage(input_tokens=inp, output_tokens=out))
            return p.total_usd if p is not None else 0.0
        c0, a, b = coef
        return c0 + a * inp + b * out

    def _affine_coefficients(self, provider: str, model: str) -> tuple[float, float, float] | Literal[False]:
        """``(constant, per input token, per output token)``, or False when tiers make the price non-affine."""
        override = self._override_for(provider, model) if self._overrides and model else None
        resolved = self._resolve(provider, model) if model and override is None else None
        if resolved is not None:
            plan = resolved.plan(resolved.model_price(_utc(None)))
            if plan is None or plan.has_tiers:
                return False
        prices = [
            self.price(provider, model, Usage(input_tokens=i, output_tokens=o)) for i, o in ((0, 0), (1, 0), (0, 1))
        ]
        if any(p is None for p in prices):
            return (0.0, 0.0, 0.0)
        c0, c_in, c_out = (p.total_usd for p in prices if p is not None)
        return (c0, c_in - c0, c_out - c0)

    # -- internals ------------------------------------------------------------------------------------------------

    def _price(self, provider: str, model: str, usage: Usage, when: datetime | None) -> Price | None:
        override, resolved, name = self._select(provider, model, usage)
        if override is not None:
            return _override_price(override, usage)
        if resolved is None:
            self._log_once("unknown", provider, model or name or "", "no price known for %s/%s; its calls cost 0", None)
            return None
        at = _utc(when)
        mp = resolved.model_price(at)
        plan = resolved.plan(mp)
        if plan is None:
            return self._slow(resolved, usage, at, provider, name)
        inp, out, total, consistent = plan.price(usage)
        den = plan.denominator
        if not consistent:
            self._log_once(
                "inconsistent",
                provider,
                name,
                "usage for %s/%s has more detail tokens than totals (%s); priced with the excess clamped",
                usage,
            )
        # int / int is correctly rounded, so these floats equal float() of the exact Decimals.
        return Price(inp / den, out / den, total / den, Decimal(total) / den, "genai-prices")

    def _slow(self, resolved: _Model, usage: Usage, at: datetime, provider: str, model: str) -> Price | None:
        counts = {k: v for k, v in ((k, _count(v)) for k, v in _all_counts(usage)) if v and k in _REPORTED_KEYS}
        try:
            calc = resolved.info.calc_price(gp_types.Usage(**counts), resolved.provider, genai_request_timestamp=at)
        except (ValueError, ArithmeticError) as e:
            self._log_once("slow", provider, model, "genai-prices cannot price %s/%s: %s", e)
            return None
        return Price(
            _float(calc.input_price),
            _float(calc.output_price),
            _float(calc.total_price),
            calc.total_price,
            "genai-prices",
        )

    def _resolve(self, provider: str, model: str) -> _Model | None:
        key = (provider, model)
        cached = self._models.get(key, _UNRESOLVED)
        if cached is not _UNRESOLVED:
            return cast("_Model | None", cached)
        snapshot = data_snapshot.get_snapshot()
        found: _Model | None
        try:
            p, info = snapshot.find_provider_model(model, None, provider or None, None)
            found = _Model(p, info)
        except LookupError:
            found = None
        with self._lock:
            if len(self._models) >= _MAX_CACHE:
                self._models.clear()  # model names come from traffic; keep the cache bounded
            self._models[key] = found
        return found

    def _override_for(self, provider: str, model: str) -> PriceOverride | None:
        ov = self._overrides.get(model)
        if ov is not None:
            return ov
        if "/" in model:
            ov = self._overrides.get(model.rsplit("/", 1)[1])
            if ov is not None:
                return ov
        # An override for "gpt-4o" also covers the dated names genai-prices knows as the same model
        # ("gpt-4o-2024-08-06"): providers answer with dated names, users configure the name they request.
        ids = self._override_model_ids(provider)
        if ids:
            resolved = self._resolve(provider, model)
            if resolved is not None:
                name = ids.get(resolved.info.id)
                if name is not None:
                    return self._overrides[name]
        return None

    def _override_model_ids(self, provider: str) -> dict[str, str]:
        """genai-prices model id -> override name, for the overrides genai-prices knows at this provider."""
        ids = self._override_ids.get(provider)
        if ids is None:
            ids = {}
            for name in self._overrides:
                resolved = self._resolve(provider, name)
                if resolved is not None:
                    ids.setdefault(resolved.info.id, name)
            self._override_ids[provider] = ids
        return ids

    def _log_once(self, kind: str, provider: str, model: str, msg: str, arg: object) -> None:
        key = (kind, provider, model)
        if key in self._logged:
            return
        with self._lock:
            if len(self._logged) >= _MAX_CACHE:
                return
            self._logged.add(key)
        text = msg % ((provider, model) if arg is None else (provider, model, arg))
        log_event(log, logging.WARNING, f"pricing_{kind}", provider=provider, model=model, message=text)


def _all_counts(usage: Usage) -> Sequence[tuple[str, Any]]:
    out: list[tuple[str, Any]] = [(k, getattr(usage, k, 0)) for k in sorted(_CORE_KEYS)]
    if isinstance(usage.details, Mapping):
        out.extend((k, v) for k, v in usage.details.items() if k not in _CORE_KEYS)
    return out


def _rate(value: float | None, default: Decimal) -> Decimal:
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return default
    return Decimal(repr(float(value)))


def _override_price(ov: PriceOverride, usage: Usage) -> Price:
    inp_rate = _rate(ov.input, _ZERO)
    out_rate = _rate(ov.output, _ZERO)
    read_rate = _rate(ov.cache_read, inp_rate)
    write_rate = _rate(ov.cache_write, inp_rate)
    total_in = _count(usage.input_tokens)
    read = min(_count(usage.cache_read_tokens), total_in)
    write = min(_count(usage.cache_write_tokens), total_in - read)
    plain = total_in - read - write
    inp = (inp_rate * plain + read_rate * read + write_rate * write) / _MILLION
    out = out_rate * _count(usage.output_tokens) / _MILLION
    total = inp + out
    return Price(_float(inp), _float(out), _float(total), total, "override")
