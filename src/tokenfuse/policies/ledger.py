"""The local ledger: every metered call, the fuse states and the override audit, in one SQLite file (WAL).

Each call is its own committed transaction, so a ``kill -9`` loses nothing that was recorded (WAL with
``synchronous=NORMAL`` survives a process crash; only an OS crash or power loss may drop the last commits). The
rolling window and month-to-date sums live in memory and are rebuilt from the file on open.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from datetime import datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenfuse.policies.calendar import Period, month_of

if TYPE_CHECKING:
    from tokenfuse.exporter.meter import CallRecord

__all__ = ["Ledger", "LedgerError"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    department TEXT NOT NULL,
    project TEXT NOT NULL,
    environment TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_department_at ON usage (department, at);
CREATE INDEX IF NOT EXISTS usage_at ON usage (at);
CREATE TABLE IF NOT EXISTS fuse (
    department TEXT PRIMARY KEY,
    snapshot TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS override_log (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    department TEXT NOT NULL,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    ttl_seconds REAL,
    actor TEXT NOT NULL
);
"""
_SUMS = "COUNT(*), COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0.0)"


class LedgerError(RuntimeError):
    """The state file cannot be used (unreadable, not a tokenfuse ledger, or a newer schema)."""


class _Window:
    """One department's calls inside the rolling window, oldest first, with running sums."""

    __slots__ = ("at", "cost", "tokens", "tokens_sum")

    def __init__(self) -> None:
        self.at: deque[float] = deque()
        self.tokens: deque[int] = deque()
        self.cost: deque[float] = deque()
        self.tokens_sum = 0

    def add(self, at: float, tokens: int, cost: float) -> None:
        if not self.at or at >= self.at[-1]:
            self.at.append(at)
            self.tokens.append(tokens)
            self.cost.append(cost)
        else:
            # Threads may deliver records slightly out of order; keep the deque sorted so expiry stays exact.
            i = bisect.bisect_right(self.at, at)
            self.at.insert(i, at)
            self.tokens.insert(i, tokens)
            self.cost.insert(i, cost)
        self.tokens_sum += tokens

    def expire(self, horizon: float) -> None:
        at = self.at
        while at and at[0] <= horizon:
            at.popleft()
            self.tokens_sum -= self.tokens.popleft()
            self.cost.popleft()

    def since(self, t: float) -> tuple[int, float]:
        tokens, cost = 0, 0.0
        for i in range(len(self.at) - 1, -1, -1):
            if self.at[i] <= t:
                break
            tokens += self.tokens[i]
            cost += self.cost[i]
        return tokens, cost


_INSERT_USAGE = (
    "INSERT INTO usage (at, department, project, environment, provider, model, input_tokens, output_tokens, cost_usd,"
    " outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class _GroupCommit:
    """Commits the usage rows queued during one event-loop iteration in one transaction.

    A commit per call costs ~50 µs of SQLite on the event loop; under load many calls finish in the same loop
    iteration, so their rows share one transaction. Each row's future completes once it is durable, and the gateway
    answers only then. (A writer thread was measured slower: it adds a thread wake-up to every call and competes
    for the GIL.)
    """

    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop) -> None:
        self._ledger = ledger
        self._loop = loop
        self._rows: list[tuple[Any, ...]] = []
        self._futures: list[asyncio.Future[None]] = []
        self._scheduled = False

    def submit(self, row: tuple[Any, ...]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        self._rows.append(row)
        self._futures.append(fut)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        """Commit every queued row now."""
        self._scheduled = False
        rows, futures = self._rows, self._futures
        if not rows:
            return
        self._rows, self._futures = [], []
        error: BaseException | None = None
        try:
            with self._ledger._lock:
                db = self._ledger._conn()
                db.execute("BEGIN")
                try:
                    db.executemany(_INSERT_USAGE, rows)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except Exception as e:  # the futures carry it to whoever waits for durability
            error = e
        for f in futures:
            if f.done():
                continue
            if error is None:
                f.set_result(None)
            else:
                f.set_exception(error)


class Ledger:
    """Usage rows, fuse snapshots and override audit of one process, persisted in SQLite.

    Args:
        path: the SQLite file (``policy.state_path``); ``:memory:`` keeps nothing.
        zone: the budget time zone; months are calendar months here.
        window_seconds: the rolling window of the hourly token limit (``policy.token_window``).
    """

    def __init__(self, path: str | os.PathLike[str], *, zone: tzinfo, window_seconds: float) -> None:
        self.path = str(path)
        self.zone = zone
        self.window_seconds = float(window_seconds)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._windows: dict[str, _Window] = {}
        self._months: dict[tuple[str, str], list[float]] = {}
        self._period: Period | None = None
        self._writer: _GroupCommit | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def open(self, now: float) -> None:
        """Open (creating if needed) the state file and rebuild the rolling window from it.

        Args:
            now: UNIX time; calls older than ``now - window_seconds`` are not loaded into the window.

        Raises:
            LedgerError: the file cannot be opened or has a newer schema.
        """
        with self._lock:
            if self._db is not None:
                return
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            try:
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                db.execute("PRAGMA busy_timeout = 5000")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if self.path != ":memory:" and str(mode).lower() != "wal":
                    raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); use a local file system")
                db.execute("PRAGMA synchronous = NORMAL")
                version = int(db.execute("PRAGMA user_version").fetchone()[0])
                if version > _SCHEMA_VERSION:
                    raise LedgerError(
                        f"{self.path}: ledger schema {version} is newer than this tokenfuse ({_SCHEMA_VERSION}); "
                        "upgrade tokenfuse or point policy.state_path at another file"
                    )
                db.executescript(_SCHEMA)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            except sqlite3.DatabaseError as e:
                raise LedgerError(f"{self.path}: cannot open the policy state file: {e}") from None
            self._db = db
            self._rebuild(now)

    def flush(self) -> None:
        """Wait until every queued row is committed (reads that scan the file call this first)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close the file; everything recorded is committed first."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.flush()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def reconfigure(self, *, zone: tzinfo, window_seconds: float, now: float) -> None:
        """Adopt a new time zone or window; the in-memory sums are rebuilt from the file.

        Args:
            zone: the budget time zone.
            window_seconds: the rolling window.
            now: UNIX time.
        """
        self.flush()
        with self._lock:
            changed = zone != self.zone or float(window_seconds) != self.window_seconds
            self.zone = zone
            self.window_seconds = float(window_seconds)
            if changed and self._db is not None:
                self._rebuild(now)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError("the ledger is not open: call PolicyEngine.open() (or Ledger.open()) first")
        return self._db

    def _rebuild(self, now: float) -> None:
        self._windows.clear()
        self._months.clear()
        self._period = None
        rows = self._conn().execute(
            "SELECT department, at, input_tokens + output_tokens, cost_usd FROM usage WHERE at > ? ORDER BY at",
            (now - self.window_seconds,),
        )
        for dept, at, tokens, cost in rows:
            self._window(dept).add(float(at), int(tokens), float(cost))

    def _window(self, department: str) -> _Window:
        w = self._windows.get(department)
        if w is None:
            w = self._windows[department] = _Window()
        return w

    def _period_of(self, at: float) -> Period:
        p = self._period
        if p is None or not (p.start <= at < p.end):
            p = month_of(at, self.zone)
            self._period = p
        return p

    # -- writing -----------------------------------------------------------------------------------------

    def record(self, rec: CallRecord) -> bool:
        """Store one metered call (what the meter passes to its listeners) and commit it.

        Args:
            rec: the call; one without usage consumed nothing and is not stored.

        Returns:
            True when a row was written.
        """
        if rec.usage is None:
            return False
        self._record(rec, wait=True)
        return True

    def record_queued(self, rec: CallRecord) -> asyncio.Future[None] | None:
        """Store one metered call through the group commit: in memory now, on disk within milliseconds.

        Args:
            rec: the call; one without usage consumed nothing and is not stored.

        Must run on an event loop: the rows queued during one loop iteration commit together.

        Returns:
            A future that completes when the row is durable, or None when nothing was stored.
        """
        if rec.usage is None:
            return None
        return self._record(rec, wait=False)

    def _record(self, rec: CallRecord, *, wait: bool) -> asyncio.Future[None] | None:
        if rec.usage is None:
            return None
        lab = rec.labels
        fut = self.add(
            at=rec.at,
            department=lab.department,
            project=lab.project,
            environment=lab.environment,
            provider=lab.provider,
            model=lab.model,
            input_tokens=max(int(rec.usage.input_tokens), 0),
            output_tokens=max(int(rec.usage.output_tokens), 0),
            cost_usd=rec.cost_usd,
            outcome=rec.outcome,
            wait=wait,
        )
        return fut

    def add(
        self,
        *,
        at: float,
        department: str,
        input_tokens: int,
        output_tokens: int,
        cost_usd: float,
        project: str = "none",
        environment: str = "none",
        provider: str = "unknown",
        model: str = "unknown",
        outcome: str = "success",
        wait: bool = True,
    ) -> asyncio.Future[None] | None:
        """Store one call's usage and commit it (or queue it for the group commit).

        Args:
            at: UNIX time of the call.
            department: department label.
            input_tokens: billable input tokens.
            output_tokens: billable output tokens.
            cost_usd: cost in USD.
            project: project label.
            environment: environment label.
            provider: provider label.
            model: model label.
            outcome: request outcome.
            wait: commit before returning (default); False queues the row and returns a future that completes
                when it is durable.

        Returns:
            The durability future when ``wait`` is False, else None.
        """
        cost = cost_usd if math.isfinite(cost_usd) and cost_usd > 0 else 0.0
        row = (at, department, project, environment, provider, model, input_tokens, output_tokens, cost, outcome)
        fut: asyncio.Future[None] | None = None
        if not wait:
            loop = asyncio.get_running_loop()
            if self._writer is None or self._writer._loop is not loop:
                self._conn()  # raises LedgerError when not open
                self.flush()
                self._writer = _GroupCommit(self, loop)
            # Load the month's sums before the row can be in flight: a later load from the file would miss a row
            # still queued, so every month with queued rows must already be cached (this row is added below).
            self.month_usage(department, self._period_of(at))
            fut = self._writer.submit(row)
        with self._lock:
            if wait:
                self._conn().execute(_INSERT_USAGE, row)
            tokens = input_tokens + output_tokens
            self._window(department).add(at, tokens, cost)
            key = (self._period_of(at).name, department)
            month = self._months.get(key)
            # A month not yet cached is loaded from the file on first read, and that read includes this row.
            if month is not None:
                month[0] += tokens
                month[1] += cost
        return fut

    def save_fuse(self, department: str, snapshot: dict[str, Any], now: float) -> None:
        """Persist a fuse's state.

        Args:
            department: whose fuse.
            snapshot: `Fuse.snapshot` output.
            now: UNIX time.
        """
        with self._lock:
            self._conn().execute(
                "INSERT INTO fuse (department, snapshot, updated_at) VALUES (?, ?, ?) ON CONFLICT (department) "
                "DO UPDATE SET snapshot = excluded.snapshot, updated_at = excluded.updated_at",
                (department, json.dumps(snapshot, separators=(",", ":")), now),
            )

    def load_fuses(self) -> dict[str, dict[str, Any]]:
        """Every persisted fuse snapshot, by department."""
        with self._lock:
            rows = self._conn().execute("SELECT department, snapshot FROM fuse").fetchall()
        out: dict[str, dict[str, Any]] = {}
        for dept, text in rows:
            try:
                snap = json.loads(text)
            except ValueError:
                continue
            if isinstance(snap, dict):
                out[str(dept)] = snap
        return out

    def audit_override(
        self, *, at: float, department: str, action: str, reason: str, ttl_seconds: float | None, actor: str
    ) -> None:
        """Append an operator override to the audit log.

        Args:
            at: UNIX time.
            department: whose fuse.
            action: open | close | auto.
            reason: the operator's reason.
            ttl_seconds: how long it holds; None = until changed.
            actor: who.
        """
        with self._lock:
            self._conn().execute(
                "INSERT INTO override_log (at, department, action, reason, ttl_seconds, actor) VALUES (?,?,?,?,?,?)",
                (at, department, action, reason, ttl_seconds, actor),
            )

    def overrides(self, department: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest override audit entries first.

        Args:
            department: only this department's; None = all.
            limit: at most this many.
        """
        sql = "SELECT at, department, action, reason, ttl_seconds, actor FROM override_log"
        args: tuple[Any, ...] = ()
        if department is not None:
            sql += " WHERE department = ?"
            args = (department,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._conn().execute(sql, (*args, limit)).fetchall()
        keys = ("at", "department", "action", "reason", "ttl_seconds", "actor")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- reading (hot path: O(1) amortised) ---------------------------------------------------------------

    def window_tokens(self, department: str, now: float) -> int:
        """Tokens the department used in ``(now - window_seconds, now]`` (and any recorded later).

        Args:
            department: department label.
            now: UNIX time.
        """
        with self._lock:
            w = self._windows.get(department)
            if w is None:
                return 0
            w.expire(now - self.window_seconds)
            return w.tokens_sum

    def window_since(self, department: str, since: float) -> tuple[int, float]:
        """Tokens and cost the department used after ``since`` (within the rolling window).

        Args:
            department: department label.
            since: UNIX time.
        """
        with self._lock:
            w = self._windows.get(department)
            return (0, 0.0) if w is None else w.since(since)

    def window_wait(self, department: str, now: float, tokens: int) -> float | None:
        """Seconds until ``tokens`` of the department's usage have left the window; None if they never will.

        Args:
            department: department label.
            now: UNIX time.
            tokens: how many tokens must leave.
        """
        if tokens <= 0:
            return 0.0
        with self._lock:
            w = self._windows.get(department)
            if w is None:
                return None
            w.expire(now - self.window_seconds)
            freed = 0
            for at, n in zip(w.at, w.tokens, strict=True):
                freed += n
                if freed >= tokens:
                    return max(at + self.window_seconds - now, 0.0)
            return None

    def month_usage(self, department: str, period: Period) -> tuple[int, float]:
        """Tokens and cost of the department in the month ``period``.

        Args:
            department: department label.
            period: a month from `month_of` / `parse_period` in this ledger's zone.
        """
        key = (period.name, department)
        with self._lock:
            m = self._months.get(key)
            if m is None:
                row = (
                    self._conn()
                    .execute(
                        f"SELECT {_SUMS} FROM usage WHERE department = ? AND at >= ? AND at < ?",
                        (department, period.start, period.end),
                    )
                    .fetchone()
                )
                m = self._months[key] = [float(row[1] + row[2]), float(row[3])]
            return int(m[0]), m[1]

    def month_spent(self, department: str, period: Period) -> float:
        """Month-to-date cost of the department in USD.

        Args:
            department: department label.
            period: the month.
        """
        return self.month_usage(department, period)[1]

    # -- reports -----------------------------------------------------------------------------------------

    def _query(self, sql: str, args: Iterable[Any]) -> list[Any]:
        self.flush()  # report queries must see rows still queued for the group commit
        with self._lock:
            return self._conn().execute(sql, tuple(args)).fetchall()

    def month_totals(self, period: Period) -> list[dict[str, Any]]:
        """Per department, project, environment, provider and model sums of a month (the chargeback rows).

        Args:
            period: the month.
        """
        rows = self._query(
            f"SELECT department, project, environment, provider, model, {_SUMS} FROM usage "
            "WHERE at >= ? AND at < ? GROUP BY department, project, environment, provider, model "
            "ORDER BY department, project, environment, provider, model",
            (period.start, period.end),
        )
        keys = ("department", "project", "environment", "provider", "model")
        return [{**dict(zip(keys, r[:5], strict=True)), **_sums(r[5:])} for r in rows]

    def usage(self, department: str | None, period: Period) -> dict[str, Any]:
        """Tokens and cost of a month by project and by model (and by department when ``department`` is None).

        Args:
            department: one department, or None for all.
            period: the month.
        """
        where = "at >= ? AND at < ?"
        args: list[Any] = [period.start, period.end]
        if department is not None:
            where += " AND department = ?"
            args.append(department)

        def group(cols: str) -> list[dict[str, Any]]:
            names = [c.strip() for c in cols.split(",")]
            rows = self._query(
                f"SELECT {cols}, {_SUMS} FROM usage WHERE {where} GROUP BY {cols} ORDER BY {len(names) + 4} DESC, {cols}",
                args,
            )
            return [{**dict(zip(names, r[: len(names)], strict=True)), **_sums(r[len(names) :])} for r in rows]

        total = self._query(f"SELECT {_SUMS} FROM usage WHERE {where}", args)[0]
        out: dict[str, Any] = {
            "period": period.name,
            "from": datetime.fromtimestamp(period.start, self.zone).isoformat(),
            "to": datetime.fromtimestamp(period.end, self.zone).isoformat(),
            "department": department,
            "total": _sums(total),
            "by_project": group("department, project") if department is None else group("project"),
            "by_model": group("provider, model"),
        }
        if department is None:
            out["by_department"] = group("department")
        return out


def _sums(r: Iterable[Any]) -> dict[str, Any]:
    requests, inp, out, cost = r
    return {
        "requests": int(requests),
        "input_tokens": int(inp),
        "output_tokens": int(out),
        "tokens": int(inp) + int(out),
        "cost_usd": float(cost),
    }
