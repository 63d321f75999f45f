"""Per-arm statistics of one experiment version, as JSON, text and a plot.

For each arm: requests, units, errors, feedback count, completion tokens, TTFT and latency
(p50/p95 of served requests), and for each metric the mean with a 95% interval and, against
the control arm, the difference with its 95% interval and a two-sided p-value:

- numeric metrics: t interval of the mean; Welch's t-test (unequal variances) and its
  Welch–Satterthwaite interval for the difference;
- boolean metrics: Wilson score interval of the rate; the pooled two-proportion z-test
  (equal to Pearson's chi-square without continuity correction) and the unpooled Wald
  interval for the difference.

A quantity that the data cannot define (a mean of nothing, an interval from one value,
a test against an empty arm) is null, never NaN: JSON has no NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
_Z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))


@dataclass(frozen=True)
class ArmData:
    """The stored rows of one arm (served requests only for tokens and times)."""

    name: str
    requests: int
    units: int
    errors: int
    completion_tokens: np.ndarray
    latency: np.ndarray
    ttft: np.ndarray
    feedback: dict[str, np.ndarray] = field(default_factory=dict)


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p95": None, "mean": None}
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": _num(p50), "p95": _num(p95), "mean": _num(values.mean())}


def _interval(lo: Any, hi: Any) -> list[float] | None:
    lo, hi = _num(lo), _num(hi)
    return None if lo is None or hi is None else [lo, hi]


def _summary(values: np.ndarray, kind: str) -> dict[str, Any]:
    n = int(values.size)
    out: dict[str, Any] = {"kind": kind, "n": n, "mean": None, "ci95": None}
    if n == 0:
        return out
    mean = float(values.mean())
    out["mean"] = mean
    if kind == "boolean":
        out["successes"] = int(values.sum())
        ci = stats.binomtest(int(values.sum()), n).proportion_ci(CONFIDENCE, method="wilson")
        out["ci95"] = _interval(ci.low, ci.high)
    else:
        out["std"] = _num(values.std(ddof=1)) if n > 1 else None
        if n > 1:
            lo, hi = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(values))
            out["ci95"] = _interval(lo, hi)
    return out


def _versus(values: np.ndarray, control: np.ndarray, kind: str) -> dict[str, Any]:
    """Difference to the control arm, its interval and the test's p-value."""
    out: dict[str, Any] = {
        "test": "two_proportion_z" if kind == "boolean" else "welch_t",
        "diff": None,
        "diff_ci95": None,
        "p_value": None,
    }
    n1, n0 = values.size, control.size
    if n1 == 0 or n0 == 0:
        return out
    diff = float(values.mean() - control.mean())
    out["diff"] = diff
    if kind == "boolean":
        p1, p0 = values.mean(), control.mean()
        pooled = (values.sum() + control.sum()) / (n1 + n0)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
        if se > 0:
            out["p_value"] = _num(2 * stats.norm.sf(abs(diff) / se))
        se_diff = math.sqrt(p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0)
        out["diff_ci95"] = _interval(diff - _Z * se_diff, diff + _Z * se_diff)
    elif n1 > 1 and n0 > 1:
        res = stats.ttest_ind(values, control, equal_var=False)
        out["p_value"] = _num(res.pvalue)
        ci = res.confidence_interval(CONFIDENCE)
        out["diff_ci95"] = _interval(ci.low, ci.high)
    return out


def build_report(
    name: str, version: int, control: str, arms: list[ArmData], kinds: dict[str, str]
) -> dict[str, Any]:
    """The report of one experiment version, arms in the definition's order."""
    by_name = {a.name: a for a in arms}
    base = by_name[control]
    out_arms = []
    for arm in arms:
        metrics = {}
        for metric, kind in kinds.items():
            values = arm.feedback.get(metric, np.empty(0))
            summary = _summary(values, kind)
            if arm.name == control:
                summary.update(test=None, diff=None, diff_ci95=None, p_value=None)
            else:
                summary.update(_versus(values, base.feedback.get(metric, np.empty(0)), kind))
            metrics[metric] = summary
        out_arms.append(
            {
                "name": arm.name,
                "control": arm.name == control,
                "requests": arm.requests,
                "units": arm.units,
                "errors": arm.errors,
                "feedback": int(sum(v.size for v in arm.feedback.values())),
                "completion_tokens": _quantiles(arm.completion_tokens),
                "ttft_seconds": _quantiles(arm.ttft),
                "latency_seconds": _quantiles(arm.latency),
                "metrics": metrics,
            }
        )
    return {
        "object": "experiment.report",
        "experiment": name,
        "version": version,
        "control": control,
        "confidence": CONFIDENCE,
        "metrics": dict(kinds),
        "arms": out_arms,
    }


# -- text and plot ---------------------------------------------------------------------


def _f(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _ci(ci: list[float] | None) -> str:
    return "-" if ci is None else f"[{_f(ci[0])}, {_f(ci[1])}]"


def _p(p: float | None) -> str:
    return "-" if p is None else ("<0.001" if p < 0.001 else f"{p:.3f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return [line.format(*header), *(line.format(*r) for r in rows)]


def format_report(rep: dict[str, Any]) -> str:
    """The report as plain-text tables: one for traffic, one per metric."""
    lines = [
        f"experiment {rep['experiment']} v{rep['version']} ({rep.get('status', '?')}), "
        f"control: {rep['control']}",
        "",
    ]
    rows = []
    for a in rep["arms"]:
        rows.append(
            [
                a["name"] + (" *" if a["control"] else ""),
                str(a["requests"]),
                str(a["units"]),
                str(a["errors"]),
                str(a["feedback"]),
                _f(a["completion_tokens"]["p50"]),
                _f(a["ttft_seconds"]["p50"]),
                _f(a["latency_seconds"]["p50"]),
                _f(a["latency_seconds"]["p95"]),
            ]
        )
    header = [
        "arm",
        "requests",
        "units",
        "errors",
        "feedback",
        "tokens p50",
        "ttft p50 s",
        "latency p50 s",
        "latency p95 s",
    ]
    lines += _table(header, rows)
    for metric, kind in rep["metrics"].items():
        lines += ["", f"{metric} ({kind}; {int(rep['confidence'] * 100)}% intervals)"]
        rows = []
        for a in rep["arms"]:
            m = a["metrics"][metric]
            rows.append(
                [
                    a["name"] + (" *" if a["control"] else ""),
                    str(m["n"]),
                    _f(m["mean"]),
                    _ci(m["ci95"]),
                    _f(m["diff"], "+.3g") if m["diff"] is not None else "-",
                    _ci(m["diff_ci95"]),
                    _p(m["p_value"]),
                ]
            )
        lines += _table(["arm", "n", "mean", "ci95", "diff", "diff ci95", "p"], rows)
    lines += ["", "* control arm"]
    return "\n".join(lines)


def plot_report(rep: dict[str, Any], path: str) -> None:
    """One panel per metric: each arm's mean with its 95% interval, control highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(rep["metrics"]) or [None]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3.2 + 2.6 * len(metrics), 3.6), squeeze=False
    )
    names = [a["name"] for a in rep["arms"]]
    for ax, metric in zip(axes[0], metrics, strict=True):
        if metric is None:
            ax.text(0.5, 0.5, "no feedback yet", ha="center", va="center")
            ax.set_axis_off()
            continue
        for i, a in enumerate(rep["arms"]):
            m = a["metrics"][metric]
            if m["mean"] is None:
                continue
            color = "tab:gray" if a["control"] else f"C{i}"
            lo, hi = m["ci95"] or (m["mean"], m["mean"])
            ax.errorbar(
                i,
                m["mean"],
                yerr=[[m["mean"] - lo], [hi - m["mean"]]],
                fmt="o",
                color=color,
                capsize=6,
                markersize=7,
            )
            label = f"n={m['n']}"
            if m["p_value"] is not None:
                label += f"\np={_p(m['p_value'])}"
            ax.annotate(
                label, (i, hi), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
            )
        ax.set_xticks(range(len(names)), names)
        ax.set_xlim(-0.6, len(names) - 0.4)
        kind = rep["metrics"][metric]
        ax.set_title(f"{metric} ({'rate' if kind == 'boolean' else 'mean'})")
        ax.margins(y=0.25)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{rep['experiment']} v{rep['version']}: mean and {int(rep['confidence'] * 100)}% "
        f"interval per arm (control: {rep['control']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
