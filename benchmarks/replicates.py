"""Pool independent runs of benchmarks/throughput.py: each run is one sample of a scenario's
ratio to plain vLLM, and the interval is taken across runs.

Why runs and not rounds (docs/design.md#performance-protocol): each run builds its engines
afresh, and two engines of the same kind differ by a percent or two for as long as they live
(the A/A control reads 0.97-1.02x from run to run while its own rounds agree far more
closely). Every round of a run shares that run's engine draw, so the rounds' interval
(`ratio_ci95`) does not cover it. Taken across runs, the interval covers both the rounds'
noise and the engines'.

Per scenario and batch size: each run's ratio (its median of paired per-round ratios), their
geometric mean, and a 95% Student-t interval on the log ratios (n - 1 degrees of freedom).

    python benchmarks/replicates.py benchmarks/results/replicates-issue21-22/
    python benchmarks/replicates.py run1.json run2.json --target 0.97 --out pooled.json

Writes JSON, a markdown table (.md) and a plot (.png), as the other benchmarks do.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import recording  # noqa: E402
from benchmarks.throughput import (  # noqa: E402
    CONTROL_SCENARIOS,
    DESCRIPTIONS,
    engine_for,
    lockstep_groups,
)

# What makes two runs measure the same thing. Batch sizes, rounds, scenarios and the
# control may differ: a (scenario, batch size) cell pools the runs that have it.
SAME_PROTOCOL = (
    "model",
    "prompt_len",
    "output_len",
    "dtype",
    "eager",
    "lockstep",
    "condition_layers",
    "max_projections",
    "moe",
    "gpu",
    "smoke",
)


class IncompatibleRuns(ValueError):
    """Runs that differ in protocol, machine or versions cannot be pooled."""


def is_throughput_run(result: object) -> bool:
    return isinstance(result, dict) and "config" in result and "results" in result


def load_runs(paths: list[Path]) -> list[tuple[Path, dict]]:
    """The throughput results at `paths`. A directory gives every throughput result in it, in
    name order (other JSON there, such as this script's own output, is passed over); a file
    named outright must be one."""
    runs: list[tuple[Path, dict]] = []
    for p in paths:
        if p.is_dir():
            found = ((f, json.loads(f.read_text())) for f in sorted(p.glob("*.json")))
            runs.extend((f, r) for f, r in found if is_throughput_run(r))
            continue
        result = json.loads(p.read_text())
        if not is_throughput_run(result):
            raise IncompatibleRuns(f"{p}: not a benchmarks/throughput.py result")
        runs.append((p, result))
    if not runs:
        raise IncompatibleRuns("no throughput.py results found in " + ", ".join(map(str, paths)))
    return runs


def check_protocol(runs: list[tuple[Path, dict]]) -> None:
    """Raise IncompatibleRuns naming the first setting that differs from the first run's."""
    first_path, first = runs[0]

    def facts(result: dict) -> dict:
        config = result.get("config", {})
        return {
            "result.model": result.get("model"),
            "cpu": result.get("cpu"),
            "versions": result.get("versions"),
            **{f"config.{k}": config.get(k) for k in SAME_PROTOCOL},
        }

    want = facts(first)
    for path, result in runs[1:]:
        got = facts(result)
        for key, value in want.items():
            if got[key] != value:
                raise IncompatibleRuns(
                    f"{path.name}: {key} is {got[key]!r}, but {value!r} in {first_path.name}; "
                    "only runs of the same protocol on the same machine pool"
                )


def t_interval(ratios: list[float], level: float = 0.95) -> list[float] | None:
    """The Student-t interval of the geometric mean of `ratios` (None for fewer than 2)."""
    from scipy.stats import t

    n = len(ratios)
    if n < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean, sd = statistics.fmean(logs), statistics.stdev(logs)
    half = t.ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return [math.exp(mean - half), math.exp(mean + half)]


REFERENCES = ("plain", "control", "mean")


def run_ratio(result: dict, row: dict, reference: str) -> float | None:
    """A run's ratio for `row` against `reference`: its plain engine (the run's own
    `ratio_vs_plain`), its A/A control engine, or the mean time of the two. Against the
    latter two, the median over rounds of per-round ratios, rounds paired by index from
    `runs_s`; None when the run has no control at that batch size, or when the row's
    rounds did not run beside the control's (beside_control)."""
    if reference == "plain":
        return row.get("ratio_vs_plain")
    here = {r["scenario"]: r for r in result["results"] if r["batch_size"] == row["batch_size"]}
    if CONTROL_SCENARIOS[0] not in here or not beside_control(result, row["scenario"]):
        return None
    control = here[CONTROL_SCENARIOS[0]]["runs_s"]
    plain = here["plain"]["runs_s"]
    bases = (
        control
        if reference == "control"
        else [(p + c) / 2.0 for p, c in zip(plain, control, strict=True)]
    )
    return statistics.median(b / t for b, t in zip(bases, row["runs_s"], strict=True))


def beside_control(result: dict, scenario: str) -> bool:
    """Whether `scenario`'s rounds ran beside the control's. In lockstep, scenarios that
    share an engine run in groups of their own, each beside plain vLLM again
    (throughput.lockstep_groups); the control and plain's own row are in the first group, so
    pairing another group's rounds with theirs by index would pair runs that were not
    stepped together. The groups follow from the rows, which are in scenario order."""
    if not result["config"].get("lockstep"):
        return True
    scenarios = list(dict.fromkeys(r["scenario"] for r in result["results"]))
    groups = lockstep_groups(scenarios, {s: engine_for(s) for s in scenarios})
    return any(scenario in g and CONTROL_SCENARIOS[0] in g for g in groups)


def pool(
    runs: list[tuple[Path, dict]], target: float | None = None, reference: str = "plain"
) -> dict:
    """One row per (scenario, batch size) that has a ratio in at least one run."""
    check_protocol(runs)
    cells: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for path, result in runs:
        for row in result["results"]:
            if row["scenario"] in ("plain", *CONTROL_SCENARIOS) and reference != "plain":
                continue  # the references themselves
            ratio = None if row["scenario"] == "plain" else run_ratio(result, row, reference)
            if ratio is None:
                continue
            key = (row["scenario"], row["batch_size"])
            cells.setdefault(key, []).append((path.name, ratio))
    rows = []
    for (scenario, batch), found in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratios = [r for _, r in found]
        ci = t_interval(ratios)
        rows.append(
            {
                "scenario": scenario,
                "batch_size": batch,
                "runs": len(ratios),
                "run_ratios": ratios,
                "run_files": [name for name, _ in found],
                "geomean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
                "ci95": ci,
                "above_target": None
                if target is None or ci is None or scenario in CONTROL_SCENARIOS
                else ci[0] >= target,
            }
        )
    first = runs[0][1]
    return {
        "protocol": {k: first["config"].get(k) for k in SAME_PROTOCOL},
        "model": first.get("model"),
        "machine": first.get("machine"),
        "cpu": first.get("cpu"),
        "versions": first.get("versions"),
        "sources": [str(p) for p, _ in runs],
        "target": target,
        "reference": reference,
        "results": rows,
    }


def markdown_table(pooled: dict) -> str:
    target = pooled["target"]
    head = (
        f"| scenario (against {pooled['reference']}) | batch | runs | each run | geometric mean "
        "| 95% CI across runs |"
    )
    rule = "|---|---:|---:|---|---:|---|"
    if target is not None:
        head += f" CI above {target:.2f}x |"
        rule += "---|"
    lines = [head, rule]
    for row in pooled["results"]:
        each = ", ".join(f"{r:.3f}" for r in row["run_ratios"])
        ci = "{:.3f}-{:.3f}".format(*row["ci95"]) if row["ci95"] else "(one run)"
        line = (
            f"| {DESCRIPTIONS.get(row['scenario'], row['scenario'])} | {row['batch_size']} "
            f"| {row['runs']} | {each} | **{row['geomean']:.3f}x** | {ci} |"
        )
        if target is not None:
            above = row["above_target"]
            line += " n/a |" if above is None else (" yes |" if above else " no |")
        lines.append(line)
    return "\n".join(lines)


def plot(pooled: dict, path: Path) -> None:
    """Each run's ratio as a dot, the geometric mean with its interval as a bar, per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pooled["results"]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(rows)), 5.0))
    for i, row in enumerate(rows):
        ratios = row["run_ratios"]
        ax.scatter([i + 0.15] * len(ratios), ratios, s=14, color="grey", zorder=2)
        lo, hi = row["ci95"] or (row["geomean"], row["geomean"])
        ax.errorbar(
            [i],
            [row["geomean"]],
            yerr=[[row["geomean"] - lo], [hi - row["geomean"]]],
            marker="o",
            capsize=4,
            color="C0",
            zorder=3,
        )
    labels = [
        textwrap.fill(DESCRIPTIONS.get(r["scenario"], r["scenario"]), 24)
        + f"\nbatch {r['batch_size']}"
        for r in rows
    ]
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    if pooled["target"] is not None:
        ax.axhline(pooled["target"], color="C3", lw=0.8, ls=":", label="target")
        ax.legend(fontsize=7)
    reference = {"plain": "plain vLLM", "control": "the A/A control", "mean": "mean of both"}
    ax.set_ylabel(
        f"throughput / {reference[pooled['reference']]}\n(runs; geometric mean, 95% CI across runs)"
    )
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{pooled['model']}: {len(pooled['sources'])} independent runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="throughput.py JSON files or directories")
    p.add_argument("--target", type=float, default=None, help="say whether each CI clears it")
    p.add_argument(
        "--reference",
        choices=REFERENCES,
        default="plain",
        help="each run's ratio against its plain engine (the protocol's), its A/A control "
        "engine, or the mean time of the two (runs without --control are left out)",
    )
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)
    try:
        pooled = pool(load_runs(args.runs), args.target, args.reference)
    except IncompatibleRuns as e:
        p.error(str(e))
    recording.write(pooled, args.out, "replicates", markdown_table(pooled), plot)
    return pooled


if __name__ == "__main__":
    main()
