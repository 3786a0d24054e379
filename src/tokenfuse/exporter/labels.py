"""Label values: who a call is billed to, bounded so that no label can grow without limit.

Departments come from config (unknown → ``unassigned``); project and environment values are validated and capped
per department (overflow or invalid → ``other``); models are capped per provider. No key or prompt becomes a label.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import NamedTuple

from tokenfuse.config import UNASSIGNED, Config
from tokenfuse.logs import log_event

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

    def __init__(self, config: Config, on_overflow: Callable[[str], None] | None = None) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], set[str]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._sets: dict[str, set[tuple[str, str, str, str]]] = {}
        self._on_overflow = on_overflow

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
        """Bound all five labels of one call; then the department's label sets as a whole (see `_label_set`)."""
        dept = self.department(department)
        prov = self.provider(provider) if provider else "unknown"
        key = (self.project(dept, project), self.environment(dept, environment), prov, self.model(prov, model))
        proj, env, prov, mod = self._label_set(dept, key)
        return CallLabels(department=dept, project=proj, environment=env, provider=prov, model=mod)

    def _label_set(self, dept: str, key: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
        """Cap a department's distinct (project, environment, provider, model) sets at
        ``metering.max_label_sets_per_department``: the per-label caps alone allow projects × environments × models.

        Beyond the cap a new set is folded to project and environment ``other`` (the model kept while room is
        reserved for such folds, then ``other`` too); the provider always stays (it prices the call).
        """
        seen = self._sets.get(dept)
        if seen is not None and key in seen:
            return key
        cap = self._config.metering.max_label_sets_per_department
        reserve = min(max(cap // 10, 1), 50)  # room kept for folded sets, so the total stays within the cap
        with self._lock:
            seen = self._sets.setdefault(dept, set())
            if key in seen:
                return key
            if len(seen) < cap - reserve:
                seen.add(key)
                return key
            folded = (OTHER, OTHER, key[2], key[3])
            if folded not in seen:
                if len(seen) < cap - 1:
                    seen.add(folded)
                else:
                    folded = (OTHER, OTHER, key[2], OTHER)
                    seen.add(folded)
        self._warn_once("label_sets", dept, f"department {dept!r} has more than {cap - reserve} label sets "
                        "(project × environment × provider × model); new ones count as project/environment 'other'")  # fmt: skip
        if self._on_overflow is not None:
            self._on_overflow(dept)
        return folded

    def _warn_once(self, kind: str, scope: str, message: str) -> None:
        if (kind, scope) not in self._warned and len(self._warned) < _MAX_WARNED:
            self._warned.add((kind, scope))
            log_event(log, logging.WARNING, f"label_{kind}_bounded", scope=scope, message=message)
