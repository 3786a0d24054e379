"""Dependencies point one way: metering ← exporter ← policies ← gateway / cli (and the generators above exporter)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "tokenfuse"
# A layer may import only from the layers listed for it (and itself, and the leaf modules config / logs).
ALLOWED = {
    "metering": {"metering"},
    "exporter": {"metering", "exporter"},
    "policies": {"metering", "exporter", "policies"},
    "alerting": {"metering", "exporter", "alerting"},
    "dashboards": {"metering", "exporter", "dashboards"},
}
LEAVES = {"config", "logs"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tokenfuse."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("tokenfuse."))
    return out


def test_layers_import_only_downwards() -> None:
    """No module of a lower layer imports a higher one (e.g. exporter never imports policies or gateway)."""
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in (SRC / layer).rglob("*.py"):
            for used in _imports(path) - allowed - LEAVES:
                wrong.append(f"{path.relative_to(SRC)} imports tokenfuse.{used}")
    assert wrong == []


def test_the_check_sees_imports() -> None:
    """The import scan finds what a module imports (so an empty result above means something)."""
    assert {"exporter", "metering"} <= _imports(SRC / "exporter" / "call.py")
    assert "exporter" in _imports(SRC / "policies" / "engine.py")
