"""Where a steered run's extra time goes, phase by phase, on one engine.

Each scenario runs on the engine throughput.py runs it on, alternating run by run with that
same engine's unsteered requests: one engine instance, so none of the few percent by which
two instances differ (docs/design.md#performance-protocol). vLLM's methods and the
extension's hooks are timed in place, per run:

    process_inputs    front end, per request: vLLM's input processing, and in it ...
    compile_request   ... the extension's validation and compilation of the spec
    admission         engine core, per request: the payload decoded and checked to fit
    prepare_inputs    runner, per step: vLLM's step inputs, and in it ...
    prepare_step      ... the extension's slot loads and per-token buffers
    forward           the model's forward pass (every steering op runs inside it)
    sample            sampling, with captures, readouts and layer-reading decoding

Writes JSON and a markdown table (.md) to benchmarks/results/.

    python benchmarks/host_overhead.py --dtype float32 --rounds 4 \\
        --scenarios distinct-conditional-specs,distinct-feature-clamps-at
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import in_process  # noqa: E402, F401 (before numpy, torch and vllm)

# isort: split
import numpy as np  # noqa: E402

from benchmarks import recording  # noqa: E402
from benchmarks.throughput import _specs, engine_for, engine_settings, stepped  # noqa: E402
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

PHASES = (
    "process_inputs",
    "compile_request",
    "admission",
    "prepare_inputs",
    "prepare_step",
    "forward",
    "sample",
)


def _where() -> dict[str, tuple[type, str]]:
    """Each phase's method, imported once the engines exist (and the plugin has hooked
    vLLM's: the timers wrap the hooked methods, so they include the extension's work)."""
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from steering.engine.frontend import SteeringFrontend
    from steering.engine.runtime import SteeringRuntime

    return {
        "process_inputs": (InputProcessor, "process_inputs"),
        "compile_request": (SteeringFrontend, "compile_request"),
        "admission": (EngineCore, "preprocess_add_request"),
        "prepare_inputs": (GPUModelRunner, "_prepare_inputs"),
        "prepare_step": (SteeringRuntime, "prepare_step"),
        "forward": (GPUModelRunner, "_model_forward"),
        "sample": (GPUModelRunner, "_sample"),
    }


def _timed(owner: type, name: str, phase: str, spent: dict[str, float]) -> Callable[[], None]:
    """Time owner.name into spent[phase]; returns the undo."""
    original = owner.__dict__[name]

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[phase] = spent.get(phase, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)
    return lambda: setattr(owner, name, original)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="runs of each (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true")
    p.add_argument(
        "--scenarios",
        default="distinct-specs-all-layers,distinct-conditional-specs,distinct-feature-clamps-at",
        help="throughput.py's steered scenarios",
    )
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)
    spec = TinySpec() if args.smoke else BENCH_SPEC
    if args.smoke:
        args.batch_size, args.output_len, args.rounds = 2, 4, 1
        args.dtype, args.eager = "float32", True
    model = build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec)

    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    cfg = AutoConfig.from_pretrained(model)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if not any(_specs(s, 1, cfg)):
            p.error(f"--scenarios: {s!r} sends no steering; this tool compares steered runs")
    kw = dict(
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=32 + args.output_len + 16,
        max_num_seqs=args.batch_size,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        seed=0,
        kv_cache_memory_bytes=(64 << 20) if args.smoke else 1 << 30,
    )
    engines = {
        name: LLM(str(model), additional_config={"steerserve": engine_settings(name, cfg)}, **kw)
        for name in dict.fromkeys(engine_for(s) for s in scenarios)
    }
    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 500, size=32).tolist() for _ in range(args.batch_size)]

    def params(scenario: str | None) -> list:
        specs = _specs(scenario, args.batch_size, cfg) if scenario else [None] * args.batch_size
        return [
            SamplingParams(
                max_tokens=args.output_len,
                temperature=0.0,
                ignore_eos=True,
                detokenize=False,
                extra_args={"steering": sp} if sp else None,
            )
            for sp in specs
        ]

    spent: dict[str, float] = {}
    undo = [_timed(owner, name, phase, spent) for phase, (owner, name) in _where().items()]
    rows = []
    try:
        for s in scenarios:
            llm = engines[engine_for(s)]
            runs: dict[str, list[dict[str, float]]] = {"unsteered": [], "steered": []}
            # Built once, outside the timed runs: generating the specs is not steering's cost.
            requests = {"unsteered": params(None), "steered": params(s)}
            for r in range(args.rounds + 1):
                # Alternate which goes first, so neither always follows the other.
                for which in ["unsteered", "steered"] if r % 2 else ["steered", "unsteered"]:
                    spent.clear()
                    t0 = time.perf_counter()
                    for _ in stepped(llm, prompts, requests[which]):
                        pass
                    spent["run"] = time.perf_counter() - t0
                    if r:  # round 0 warms caches and allocators
                        runs[which].append(dict(spent))
            for k in ("run", *PHASES):
                a = [run.get(k, 0.0) * 1e3 for run in runs["unsteered"]]
                b = [run.get(k, 0.0) * 1e3 for run in runs["steered"]]
                diffs = [y - x for x, y in zip(a, b, strict=True)]
                rows.append(
                    {
                        "scenario": s,
                        "engine": engine_for(s),
                        "phase": k,
                        "unsteered_ms": statistics.median(a),
                        "steered_ms": statistics.median(b),
                        "paired_diff_ms": statistics.median(diffs),
                        "paired_diffs_ms": diffs,
                    }
                )
    finally:
        for u in undo:
            u()
    result = {**recording.header(spec.slug, args), "results": rows}
    recording.write(result, args.out, "host-overhead", markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"ms per {cfg['batch_size']}-request run, median of {cfg['rounds']} "
        f"({cfg['dtype']}); the difference is the median of paired runs"
    ]
    for s in dict.fromkeys(r["scenario"] for r in result["results"]):
        rows = [r for r in result["results"] if r["scenario"] == s]
        lines += [
            "",
            f"{s} (engine {rows[0]['engine']!r}), against its engine's unsteered requests:",
            "",
            "| phase | unsteered | steered | difference |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['phase']} | {r['unsteered_ms']:,.1f} | {r['steered_ms']:,.1f} "
            f"| {r['paired_diff_ms']:+,.1f} |"
            for r in rows
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
