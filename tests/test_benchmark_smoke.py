"""The benchmarks run end to end (tiny model, seconds) so they cannot rot.

Each runs in a process of its own: a benchmark drops its engines when it ends, and tearing
an in-process vLLM engine down destroys the process-wide parallel groups that the test
session's engines run on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.capture_throughput import SCENARIOS as CAPTURE_SCENARIOS  # noqa: E402
from benchmarks.readout_http import CONDITIONS as READOUT_CONDITIONS  # noqa: E402
from benchmarks.serving import CONDITIONS as SERVING_CONDITIONS  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    HF_SCENARIOS,
    MOE_SCENARIOS,
    SCENARIOS,
    lockstep,
    lockstep_groups,
    median_ci,
)


def _smoke(script: str, out: Path, *flags: str) -> dict:
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *flags],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_throughput_smoke(tmp_path):
    result = _smoke("throughput.py", tmp_path / "smoke.json")
    rows = {(r["scenario"], r["batch_size"]): r for r in result["results"]}
    assert set(rows) == {(s, b) for s in SCENARIOS for b in (1, 4)}
    assert rows["plain", 4]["ratio_vs_plain"] == 1.0
    assert all(r["tok_per_s"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())
    assert (tmp_path / "smoke.png").stat().st_size > 10_000
    assert "HF transformers + hooks" in (tmp_path / "smoke.md").read_text()


def test_moe_throughput_smoke(tmp_path):
    """--moe: the MoE scenarios (expert masks included) on the tiny Qwen3-MoE model."""
    result = _smoke("throughput.py", tmp_path / "moe.json", "--moe", "--control")
    rows = {r["scenario"]: r for r in result["results"]}
    assert set(rows) == {*MOE_SCENARIOS, "plain-control"}
    # The A/A control is a second plain engine, paired with the first like any scenario.
    assert rows["plain-control"]["ratio_vs_plain"] > 0
    table = (tmp_path / "moe.md").read_text()
    assert "expert" in table and "A/A control" in table


def test_lockstep_throughput_smoke(tmp_path):
    """--lockstep: every scenario but HF's, stepped beside plain vLLM; scenarios on one
    engine (unsteered and the steered ones) in groups of their own, each with plain."""
    result = _smoke("throughput.py", tmp_path / "lock.json", "--lockstep", "--control")
    rows = {(r["scenario"], r["batch_size"]): r for r in result["results"]}
    scenarios = {s for s in SCENARIOS if s not in HF_SCENARIOS} | {"plain-control"}
    assert set(rows) == {(s, b) for s in scenarios for b in (1, 4)}
    assert rows["plain", 4]["ratio_vs_plain"] == 1.0
    assert all(r["ratio_vs_plain"] > 0 and len(r["runs_s"]) == 1 for r in rows.values())
    assert result["config"]["lockstep"] is True


def test_lockstep_interleaves_steps_and_times_each_run_alone() -> None:
    import time

    order: list[str] = []

    def run(name: str, steps: int, seconds: float):
        for i in range(steps):
            order.append(f"{name}{i}")
            time.sleep(seconds)
            yield
        return [name] * steps

    spent, outs = lockstep({"a": run("a", 3, 0.02), "b": run("b", 1, 0.06)})
    assert order == ["a0", "b0", "a1", "a2"]  # one step each in turn; b ends after its one
    assert outs == {"a": ["a"] * 3, "b": ["b"]}
    assert 0.055 <= spent["a"] < 0.09 and 0.055 <= spent["b"] < 0.09


def test_lockstep_groups_put_plain_beside_every_engine_once() -> None:
    engine_of = {"plain": "plain", "u": "steer", "v": "steer", "c": "cond", "k": "control"}
    groups = lockstep_groups(["plain", "u", "v", "c", "k"], engine_of)
    assert groups == [["plain", "u", "c", "k"], ["plain", "v"]]
    assert lockstep_groups(["plain"], {"plain": "plain"}) == [["plain"]]


def test_serving_smoke(tmp_path):
    # Both servers, loaded by vLLM's own `vllm bench serve`.
    result = _smoke("serving.py", tmp_path / "serving.json")
    rows = {r["condition"]: r for r in result["results"]}
    assert set(rows) == set(SERVING_CONDITIONS)
    assert rows["vllm"]["ratio_vs_vllm"] == 1.0
    assert all(r["output_throughput"] > 0 and r["median_ttft_ms"] > 0 for r in rows.values())
    assert (tmp_path / "serving.png").stat().st_size > 10_000


def test_readout_http_smoke(tmp_path):
    result = _smoke("readout_http.py", tmp_path / "readout.json")
    assert [r["condition"] for r in result["results"]] == list(READOUT_CONDITIONS)
    assert all(r["tok_per_s"] > 0 for r in result["results"])


def test_capture_throughput_smoke(tmp_path):
    result = _smoke("capture_throughput.py", tmp_path / "capture.json")
    rows = {r["scenario"]: r for r in result["results"]}
    assert set(rows) == set(CAPTURE_SCENARIOS)
    assert rows["plain-prefill"]["ratio_vs_plain_prefill"] == 1.0
    assert rows["plain-generation"]["ratio_vs_plain_prefill"] is None
    assert all(r["tok_per_s"] > 0 for r in rows.values())


def test_host_overhead_smoke():
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "host_overhead.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| plain",
        "| unsteered",
        "| same-spec-all-layers",
        "| distinct-specs-all-layers",
        "| distinct-head-masks",
    ]


def test_steering_effect_smoke(tmp_path):
    # The shipped demo model and vectors, a few samples per cell.
    result = _smoke("steering_effect.py", tmp_path / "effect.json")
    cells = {(r["vector"], r["scale"]) for r in result["vectors"]}
    names = ("positive", "negative", "animals", "food", "weather", "sports")
    assert cells == {(n, s) for n in names for s in (0.0, 1.0)}
    assert all(0 <= r["rate_ci"][0] <= r["rate"] <= r["rate_ci"][1] <= 1 for r in result["vectors"])
    assert len(result["heads"]["scan"]) == 16
    conditions = list(result["heads"]["conditions"])
    assert conditions[:3] == ["none", "top 1 copy head", "top 2 copy heads"]
    assert result["decoding"][0]["decoding"] == "greedy" and "9-16" in result["decoding"][0]
    assert (tmp_path / "effect.png").stat().st_size > 10_000
    assert "Head masks" in (tmp_path / "effect.md").read_text()


def test_soak_smoke(tmp_path):
    """Concurrent mixed streams (with disconnects) each equal to their solo run; slots back
    to zero once idle (the script exits non-zero otherwise)."""
    result = _smoke("soak.py", tmp_path / "soak.json", "--max-rss-growth", "256")
    c = result["counts"]
    assert c["completed"] > 50 and c["dropped"] > 0 and c["mismatched"] == c["errors"] == 0
    assert result["end"]["slots_active"] == 0 and result["peak_running"] > 1


def test_median_ci_is_the_order_statistic_interval() -> None:
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # no 95% interval from 5 values
    assert median_ci([float(v) for v in range(6, 0, -1)]) == [1.0, 6.0]
    assert median_ci([float(v) for v in range(1, 21)]) == [6.0, 15.0]
    # It covers the true median about 95% of the time, and narrows with more rounds.
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (12, 30):
        draws = [median_ci(rng.standard_normal(n).tolist()) for _ in range(2000)]
        covered = sum(lo <= 0.0 <= hi for lo, hi in draws) / len(draws)
        assert 0.94 <= covered <= 0.99, (n, covered)
    wide = np.median(
        [hi - lo for lo, hi in (median_ci(rng.random(10).tolist()) for _ in range(500))]
    )
    narrow = np.median(
        [hi - lo for lo, hi in (median_ci(rng.random(40).tolist()) for _ in range(500))]
    )
    assert narrow < 0.7 * wide


def test_spec_compile_times_every_phase() -> None:
    from benchmarks import spec_compile

    got = spec_compile.main(["--smoke"])
    assert set(got) == set(spec_compile.DEFAULT.split(","))
    for phases in got.values():
        assert set(phases) == set(spec_compile.PHASES)
        assert all(ms > 0.0 for ms in phases.values())
