"""Shared test helpers: configs pointing at a fake upstream, and the CI rule for missing binaries."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tokenfuse.config import DEFAULT_FORWARD_HEADERS, Config, hash_key, parse_config

KEYS = {"marketing": "tf-test-marketing", "engineering": "tf-test-engineering", "support": "tf-test-support"}
FIXTURES = Path(__file__).resolve().parent / "fixtures"
"""Test data kept in the repository (recorded provider payloads), so a fresh clone passes on its own."""


def fake_config(upstream_url: str, tmp_path: Path | None = None, **sections: Any) -> Config:
    """A config whose upstreams all point at the fake upstream, with three departments and test keys.

    Args:
        upstream_url: the fake upstream's URL (no /v1).
        tmp_path: where the policy state file goes.
        sections: top-level sections merged over the defaults (``departments`` replaces, others update).
    """
    data: dict[str, Any] = {
        "timezone": "UTC",
        "upstreams": [
            {
                "name": "fake-openai",
                "base_url": upstream_url + "/v1",
                "api_key_env": "TOKENFUSE_TEST_UPSTREAM_KEY",
                "provider": "openai",
                "models": ["gpt-*", "o3*", "text-embedding-*"],
            },
            {
                "name": "fake-anthropic",
                "base_url": upstream_url + "/v1",
                "api_key_env": "TOKENFUSE_TEST_ANTHROPIC_KEY",
                "provider": "anthropic",
                "models": ["claude-*"],
            },
            {
                "name": "fake-deepseek",
                "base_url": upstream_url + "/v1",
                "provider": "deepseek",
                "models": ["deepseek-*"],
            },
        ],
        "departments": {
            "marketing": {
                "monthly_budget_usd": 500,
                "hourly_token_limit": 500000,
                "keys": [hash_key(KEYS["marketing"])],
            },
            "engineering": {"monthly_budget_usd": 1000, "keys": [hash_key(KEYS["engineering"])]},
            "support": {"keys": [hash_key(KEYS["support"])]},
        },
        "policy": {"state_path": str((tmp_path or Path("/tmp")) / "tokenfuse-test.db"), "interval": "1s"},
        # The fake upstream takes its instructions (usage, faults, latency) in x-fake-* headers.
        "gateway": {"forward_headers": [*DEFAULT_FORWARD_HEADERS, "x-fake-*"]},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict) and k != "departments":
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return parse_config(data)


def require_binary(name: str) -> str:
    """Return the path of an executable, or end the test: fail when ``CI=true``, skip otherwise.

    Args:
        name: the executable, e.g. ``prometheus``, ``promtool``, ``amtool``, ``prometheus-alertmanager``.
    """
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is None:
        message = f"{name} not found: install it (Debian: apt-get install prometheus prometheus-alertmanager)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
