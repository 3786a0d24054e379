"""What a metered call asks of a policy, and what a refusal looks like on the wire, for both front doors.

The values (`Reservation`, `Admission`) and the `Policy` protocol live here, below the policy layer, so that the
exporter's `MeteredCall` is typed without importing `tokenfuse.policies` (dependencies point one way);
`tokenfuse.policies.PolicyEngine` is the implementation. `refusal` is the one place a refused call's status, error
body and headers are made: the gateway sends them, the instrumented client answers them as a synthetic response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

import orjson

if TYPE_CHECKING:
    from tokenfuse.exporter.meter import CallRecord

__all__ = ["Admission", "ErrorStyle", "Policy", "Refusal", "Reservation", "error_body", "refusal"]

ErrorStyle = Literal["openai", "anthropic", "google"]


@dataclass(frozen=True, slots=True)
class Reservation:
    """Worst-case usage set aside for one admitted request until it settles.

    Args:
        id: unique within the engine.
        department: whose limits it counts against.
        tokens: prompt estimate + max output tokens.
        cost_usd: those tokens priced.
        at: UNIX time of admission.
        probe_epoch: the fuse epoch when this was a HALF_OPEN probe, else None.
    """

    id: int
    department: str
    tokens: int
    cost_usd: float
    at: float
    probe_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """The policy's answer to "may this request go out?".

    Args:
        admitted: True to forward.
        department: the department asked about.
        state: the fuse state (``closed`` | ``open`` | ``half_open``; the engine passes its `FuseState`).
        reason: None when admitted, else ``fuse_open`` | ``insufficient_budget`` | ``token_limit``.
        retry_after: seconds until retrying can help; None when unknown or never.
        budget_remaining_usd: budget left after this reservation; None without a budget.
        tokens_remaining: window tokens left after this reservation; None without a limit.
        reservation: settle it with `Policy.settle`; None when nothing was reserved.
    """

    admitted: bool
    department: str
    state: str
    reason: str | None
    retry_after: float | None
    budget_remaining_usd: float | None
    tokens_remaining: int | None
    reservation: Reservation | None


class Policy(Protocol):
    """What a metered call needs of a policy engine (`tokenfuse.policies.PolicyEngine`)."""

    @property
    def default_max_tokens(self) -> int:
        """Worst-case output reserved for a request that sets no maximum (``policy.default_max_tokens``)."""
        ...

    def limited(self, department: str) -> bool:
        """Whether ``department`` has a limit, i.e. whether admission needs the prompt estimated at all."""
        ...

    def prompt_reservation(self, estimate: int) -> int:
        """Tokens to reserve for a prompt tiktoken estimates at ``estimate`` (the estimate plus a margin)."""
        ...

    def admit(
        self, department: str, *, input_tokens: int, max_output_tokens: int, provider: str, model: str
    ) -> Admission: ...

    def settle(self, reservation: Reservation | None, record: CallRecord | None) -> None: ...

    def refusal(self, admission: Admission) -> Exception:
        """The exception an app that opted in (``raise_on_block=True``) gets for a refused admission."""
        ...


# OpenAI error types → Anthropic's (https://docs.anthropic.com/en/api/errors); unknown ones pass unchanged.
_ANTHROPIC_TYPES = {"budget_exceeded": "rate_limit_error"}
_ANTHROPIC_BY_STATUS = {404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error"}


_GOOGLE_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 502: "UNAVAILABLE",
                  504: "DEADLINE_EXCEEDED"}  # fmt: skip


def error_body(status: int, message: str, type_: str, code: str, style: ErrorStyle = "openai") -> bytes:
    """A JSON error body: OpenAI's ``{"error": {message, type, param, code}}``, Anthropic's
    ``{"type": "error", "error": {type, message, code}}`` or Google's ``{"error": {code, message, status,
    details}}``, so that each SDK raises its own typed error."""
    if style == "google":
        return orjson.dumps({"error": {"code": status, "message": message,
                                       "status": _GOOGLE_STATUS.get(status, "INTERNAL"),
                                       "details": [{"reason": code, "type": type_}]}})  # fmt: skip
    if style == "anthropic":
        atype = _ANTHROPIC_BY_STATUS.get(status) or _ANTHROPIC_TYPES.get(type_, type_)
        return orjson.dumps({"type": "error", "error": {"type": atype, "message": message, "code": code}})
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


class Refusal(NamedTuple):
    """A refused call as an HTTP answer: 429, a stable code, its message and headers."""

    status: int
    code: str
    message: str
    headers: dict[str, str]

    def body(self, style: ErrorStyle = "openai") -> bytes:
        return error_body(self.status, self.message, "budget_exceeded", self.code, style)


def refusal(admission: Admission) -> Refusal:
    """The HTTP answer to a refused admission: ``department_fuse_open`` or ``insufficient_budget``, with
    ``Retry-After`` and ``x-should-retry: false`` so that no SDK retries it on its own."""
    dept = admission.department
    headers = {
        "x-should-retry": "false",
        "x-tokenfuse-department": dept,
        "x-tokenfuse-fuse-state": str(admission.state),
    }
    retry = admission.retry_after
    if retry is not None and math.isfinite(retry):
        headers["retry-after"] = str(max(1, math.ceil(retry)))
    if (admission.reason or "fuse_open") == "fuse_open":
        code = "department_fuse_open"
        message = f"Department '{dept}' is over its limit and its fuse is open; requests are refused until it closes."
    else:
        code = "insufficient_budget"
        message = (
            f"Department '{dept}' has not enough budget or tokens left for this request's worst case "
            "(prompt + max_tokens); lower max_tokens or wait."
        )
    return Refusal(429, code, message, headers)
