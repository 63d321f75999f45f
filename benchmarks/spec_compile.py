"""Host work per steered request, without an engine: what the front end spends validating a
spec (`parse`), folding it (`compile`), encoding the payload (`wire`), and what the engine
spends decoding it (`decode`, done twice: admission and the runner), for the requests of
throughput.py's scenarios on the benchmark model.

This is the part of a scenario's cost that does not shrink with a faster forward pass: at
batch 32 on a 1.5 s run, every 0.1 ms per request is 0.2% of throughput.

    python benchmarks/spec_compile.py                       # the default scenarios
    python benchmarks/spec_compile.py --scenarios distinct-conditional-specs --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import _specs  # noqa: E402
from steering.compile import CompiledSpec, compile_spec  # noqa: E402
from steering.spec import ModelShape, SpecContext, parse_spec  # noqa: E402
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

PHASES = ("parse", "compile", "wire", "decode")
DEFAULT = "distinct-specs-all-layers,distinct-conditional-specs,distinct-head-masks"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default=DEFAULT)
    p.add_argument("--requests", type=int, default=32, help="distinct specs per scenario")
    p.add_argument("--repeats", type=int, default=5, help="passes over them (first: warm-up)")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 passes")
    args = p.parse_args(argv)
    spec = TinySpec() if args.smoke else BENCH_SPEC
    if args.smoke:
        args.requests, args.repeats = 4, 2
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec))
    shape = ModelShape.from_hf_config(cfg)
    # As throughput.py's conditional engine: one condition, read at the middle layer.
    ctx = SpecContext(shape, max_conditions=1, condition_layers=(cfg.num_hidden_layers // 2,))
    out: dict[str, dict[str, float]] = {}
    print("| scenario | " + " | ".join(f"{k} (ms)" for k in PHASES) + " | total (ms) |")
    print("|---" + "|---:" * (len(PHASES) + 1) + "|")
    for scenario in (s.strip() for s in args.scenarios.split(",") if s.strip()):
        raws = [r for r in _specs(scenario, args.requests, cfg) if r is not None]
        spent: dict[str, list[float]] = {k: [] for k in PHASES}
        for rep in range(args.repeats):
            for raw in raws:
                t0 = time.perf_counter()
                parsed = parse_spec(raw, ctx)
                t1 = time.perf_counter()
                compiled = compile_spec(parsed, shape)
                t2 = time.perf_counter()
                wire = compiled.to_wire()
                t3 = time.perf_counter()
                CompiledSpec.from_payload(wire)
                t4 = time.perf_counter()
                if rep:  # the first pass warms caches and allocators
                    for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        spent[k].append(dt)
        med = {k: 1e3 * statistics.median(v) for k, v in spent.items()}
        out[scenario] = med
        total = sum(med.values()) + med["decode"]  # decoded twice on the engine side
        print(
            f"| {scenario} | " + " | ".join(f"{med[k]:.3f}" for k in PHASES) + f" | {total:.3f} |"
        )
    return out


if __name__ == "__main__":
    main()
