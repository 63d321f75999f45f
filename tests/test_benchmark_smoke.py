"""The throughput benchmark runs end to end (tiny model, seconds) so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import SCENARIOS, main  # noqa: E402


def test_throughput_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    result = main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["scenario"]: r for r in result["results"]}
    assert set(rows) == set(SCENARIOS)
    assert rows["plain"]["ratio_vs_plain"] == 1.0
    assert all(r["tok_per_s"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())


def test_capture_throughput_smoke(tmp_path):
    from benchmarks.capture_throughput import SCENARIOS as CAPTURE_SCENARIOS
    from benchmarks.capture_throughput import main as capture_main

    out = tmp_path / "capture.json"
    result = capture_main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    rows = {r["scenario"]: r for r in result["results"]}
    assert set(rows) == set(CAPTURE_SCENARIOS)
    assert rows["plain-prefill"]["ratio_vs_plain_prefill"] == 1.0
    assert rows["plain-generation"]["ratio_vs_plain_prefill"] is None
    assert all(r["tok_per_s"] > 0 for r in rows.values())
