"""How far the tiktoken prompt estimate (what admission reserves) is below what providers bill, on the recorded
payloads in tests/fixtures/provider-payloads: chooses the default of ``policy.prompt_margin``.

    python bench/prompt_margin.py

Files whose request text was cut when recorded, or whose input is mostly media (video, images), are listed but not
used: their reported input is not the text the estimate sees.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from tokenfuse.metering.estimate import estimate_prompt_tokens
from tokenfuse.metering.extract import request_model, usage_from_root
from tokenfuse.metering.types import Api

FIXTURES = Path(__file__).resolve().parents[1] / "tests/fixtures/provider-payloads"
API: dict[str, Api] = {"chat.completions": "openai.chat", "responses": "openai.responses",
                       "messages": "anthropic.messages", "generateContent": "google.generate_content"}  # fmt: skip


def main() -> int:
    rows = []
    for f in sorted(FIXTURES.glob("*.json")):
        d = json.loads(f.read_text())
        api, body = API[d["api"]], d["request_body"]
        u = usage_from_root(api, {"usage": d["provider_usage"], "usageMetadata": d["provider_usage"]})
        reported = u.input_tokens if u else None
        model = request_model(api, body, d.get("request_path", ""))
        est = estimate_prompt_tokens(api, body, model)
        note = (d.get("note") or "").lower()
        cut = "shortened" in note or ("cut to" in note and "request" in note)
        skip = cut or "video" in f.name or not reported or not est
        rows.append((f.name, est, reported, None if skip else reported / est))
    print("| file | tiktoken estimate | billed input | billed / estimate |")
    print("|---|---:|---:|---:|")
    for name, est, rep, ratio in rows:
        print(f"| {name} | {est} | {rep} | {'not used' if ratio is None else f'{ratio:.2f}'} |")
    used = [r for *_, r in rows if r is not None]
    if not used:
        print("no usable payloads", file=sys.stderr)
        return 1
    worst = max(used)
    print(f"\nused {len(used)} payloads: median billed/estimate {statistics.median(used):.2f}, max {worst:.2f}; "
          f"a margin of {math.ceil((worst - 1) * 20) / 20:.2f} covers every one")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
