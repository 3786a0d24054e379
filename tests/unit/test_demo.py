"""`tokenfuse demo`: runs with nothing configured, stops by itself, and shows every department's traffic."""

from __future__ import annotations

import io
import re
import subprocess
import sys


def test_demo_runs_for_duration_and_prints_table() -> None:
    """The demo serves traffic from three departments and prints a final table with their numbers."""
    from tokenfuse.demo import run_demo

    out = io.StringIO()
    assert run_demo(duration=4.0, out=out) == 0
    text = out.getvalue()
    assert "/metrics" in text
    final = text.split("final:", 1)[1]
    rows = {
        m.group(1): m for m in re.finditer(r"^(marketing|engineering|support)\s+(\d+)\s+(\d+)\s+(\d+)", final, re.M)
    }
    assert set(rows) == {"marketing", "engineering", "support"}
    for m in rows.values():
        assert int(m.group(2)) > 0  # requests
        assert int(m.group(4)) > 0  # tokens


def test_demo_cli_exits_cleanly() -> None:
    """`tokenfuse demo --duration` exits 0 on its own (the README's first command, scripted)."""
    r = subprocess.run([sys.executable, "-m", "tokenfuse.cli", "demo", "--duration", "2"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "final:" in r.stdout


def test_demo_stops_cleanly_on_ctrl_c() -> None:
    """Ctrl-C (SIGINT) ends the demo with exit 0, the final table and no traceback."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "tokenfuse.cli", "demo"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if "Ctrl-C stops" in line:
                break
        time.sleep(1.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "final:" in out
    assert "Traceback" not in err
