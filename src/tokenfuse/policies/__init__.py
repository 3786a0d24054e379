"""The policy engine: per-department fuses, the local ledger, rate sources, admission with reservations, overrides.

`PolicyEngine` is what the gateway and the instrumented client use; the rest is exported for tests and tools.
"""

from __future__ import annotations

from tokenfuse.policies.calendar import Period, month_of, parse_period
from tokenfuse.policies.engine import Admission, BudgetExceeded, PolicyEngine, Reservation
from tokenfuse.policies.fuse import Fuse, FuseLimits, FuseState, OpenCause, Override, Reading, Transition
from tokenfuse.policies.ledger import Ledger, LedgerError
from tokenfuse.policies.sources import LocalSource, PrometheusSource, RateSource, Readings, SourceError

__all__ = [
    "Admission",
    "BudgetExceeded",
    "Fuse",
    "FuseLimits",
    "FuseState",
    "Ledger",
    "LedgerError",
    "LocalSource",
    "OpenCause",
    "Override",
    "Period",
    "PolicyEngine",
    "PrometheusSource",
    "RateSource",
    "Reading",
    "Readings",
    "Reservation",
    "SourceError",
    "Transition",
    "month_of",
    "parse_period",
]
