"""Label values: who a call is billed to, bounded so that no label can grow without limit.

Departments come from config (unknown → ``unassigned``); project and environment values are validated and capped
per department (overflow or invalid → ``other``); models are capped per provider. No key or prompt becomes a label.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import NamedTuple

from tokenfuse.config import UNASSIGNED, Config

__all__ = ["NONE", "OTHER", "CallLabels", "LabelBounds"]

log = logging.getLogger("tokenfuse.exporter")

OTHER = "other"
NONE = "none"
_VALUE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}$")
_MAX_MODELS_PER_PROVIDER = 200
_MAX_PROVIDERS = 50
_MAX_WARNED = 1000  # the names warned about come from callers: the memory of them is bounded too


class CallLabels(NamedTuple):
    """The five labels of every usage metric, already bounded.

    A named tuple: the meter keys its caches by it on every call, and a tuple hashes in C.
    """

    department: str
    project: str
    environment: str
    provider: str
    model: str

    def as_tuple(self) -> tuple[str, str, str, str, str]:
        return (self[0], self[1], self[2], self[3], self[4])


class LabelBounds:
    """Turns raw label values into bounded ones, remembering what it has admitted.

    Args:
        config: departments, the allowed projects and the caps come from here.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._warned: set[tuple[str, str]] = set()

    def department(self, name: str | None) -> str:
        """The department label of a call billed to ``name``.

        With departments configured, only they are labels: another name is ``unassigned`` (logged once per name).
        With none configured (an instrumented client on its own), a valid name given in code is the label, up to
        ``metering.max_departments`` of them, then ``other``.
        """
        if not name:
            return UNASSIGNED
        departments = self._config.departments
        if departments:
            if name in departments:
                return name
            self._warn_once("department", name[:63], f"department {name[:63]!r} is not configured; its calls "
                            "count as 'unassigned' (add it under departments: in the config)")  # fmt: skip
            return UNASSIGNED
        seen = self._seen.get(("department", "*"))
        if seen is not None and name in seen:
            return name
        if not _VALUE_RE.fullmatch(name):
            self._warn_once("department", name[:63], f"department label {name[:40]!r} is not a valid label value "
                            "(lowercase letters, digits, '_', '-', '.'); counted as 'unassigned'")  # fmt: skip
            return UNASSIGNED
        return self._capped("department", "*", name, self._config.metering.max_departments, None)

    def _capped(self, kind: str, scope: str, value: str | None, cap: int, allowed: list[str] | None) -> str:
        if value is None or value == "":
            return NONE
        v = value.strip().lower()
        if not _VALUE_RE.fullmatch(v):
            self._warn_once(kind, scope, f"{kind} label {value[:40]!r} is not a valid label value; counted as 'other'")
            return OTHER
        if allowed is not None:
            return v if v in allowed else OTHER
        key = (kind, scope)
        seen = self._seen.get(key)
        if seen is not None and v in seen:
            return v
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if v in seen:
                return v
            if len(seen) >= cap:
                self._warn_once(
                    kind, scope, f"more than {cap} {kind} values for {scope}; further ones count as 'other'"
                )
                return OTHER
            seen.add(v)
        return v

    def project(self, department: str, value: str | None) -> str:
        d = self._config.departments.get(department)
        allowed = d.projects if d is not None else None
        return self._capped("project", department, value, self._config.metering.max_projects, allowed)

    def environment(self, department: str, value: str | None) -> str:
        return self._capped("environment", department, value, self._config.metering.max_environments, None)

    def provider(self, value: str | None) -> str:
        return self._capped("provider", "*", value, _MAX_PROVIDERS, None)

    def model(self, provider: str, value: str | None) -> str:
        if not value:
            return "unknown"
        key = ("model", provider)
        seen = self._seen.get(key)
        if seen is not None and value in seen:
            return value
        if not _MODEL_RE.fullmatch(value):
            return OTHER
        with self._lock:
            seen = self._seen.setdefault(key, set())
            if value in seen:
                return value
            if len(seen) >= _MAX_MODELS_PER_PROVIDER:
                self._warn_once("model", provider, f"more than {_MAX_MODELS_PER_PROVIDER} models for {provider}")
                return OTHER
            seen.add(value)
        return value

    def labels(
        self,
        *,
        department: str | None,
        project: str | None,
        environment: str | None,
        provider: str | None,
        model: str | None,
    ) -> CallLabels:
        """Bound all five labels of one call."""
        dept = self.department(department)
        prov = self.provider(provider) if provider else "unknown"
        return CallLabels(
            department=dept,
            project=self.project(dept, project),
            environment=self.environment(dept, environment),
            provider=prov,
            model=self.model(prov, model),
        )

    def _warn_once(self, kind: str, scope: str, message: str) -> None:
        if (kind, scope) not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add((kind, scope))
            log.warning(message)
