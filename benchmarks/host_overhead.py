"""Where a steered run's extra time goes: the extension's host work, timed per run.

Runs plain vLLM and the steering engine side by side on the benchmark model (as
throughput.py does) and, for each scenario, reports the run's time, its ratio to plain, and
the time spent in the extension's host-side hooks during the run:

    compile_request   validating and compiling each request's spec (front end, per request)
    prepare_step      filling the per-token slot/class/gain buffers (runner, per step)

Everything else the extension costs is inside the forward pass (the per-layer gathers and
multiply-adds), i.e. the ratio's remaining gap to 1.

    python benchmarks/host_overhead.py --batch-size 32 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import in_process  # noqa: E402, F401 (before numpy, torch and vllm)

# isort: split
import numpy as np  # noqa: E402

from benchmarks.throughput import _specs  # noqa: E402
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

HOOKS = ("compile_request", "prepare_step")


def _timed(owner: type, name: str, spent: dict[str, float]) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--eager", action="store_true")
    p.add_argument(
        "--scenarios",
        default="unsteered,same-spec-all-layers,distinct-specs-all-layers,distinct-head-masks",
    )
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    spec = TinySpec() if args.smoke else BENCH_SPEC
    if args.smoke:
        args.batch_size, args.output_len, args.rounds, args.eager = 2, 4, 1, True
    model = build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec)

    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from steering.engine.frontend import SteeringFrontend
    from steering.engine.runtime import SteeringRuntime

    spent: dict[str, float] = {}
    _timed(SteeringFrontend, "compile_request", spent)
    _timed(SteeringRuntime, "prepare_step", spent)

    cfg = AutoConfig.from_pretrained(model)
    scenarios = ["plain", *[s.strip() for s in args.scenarios.split(",") if s.strip()]]
    kw = dict(
        dtype="float32" if args.smoke else "bfloat16",
        enforce_eager=args.eager,
        max_model_len=32 + args.output_len + 16,
        max_num_seqs=args.batch_size,
        max_num_batched_tokens=2048,
        enable_prefix_caching=False,
        seed=0,
        kv_cache_memory_bytes=(64 << 20) if args.smoke else 1 << 30,
    )
    engines = {
        "plain": LLM(str(model), additional_config={"steerserve": {"enabled": False}}, **kw),
        "steer": LLM(str(model), **kw),
    }
    rng = np.random.default_rng(1)
    prompts = [
        {"prompt_token_ids": rng.integers(10, 500, size=32).tolist()}
        for _ in range(args.batch_size)
    ]
    params = {
        s: [
            SamplingParams(
                max_tokens=args.output_len,
                temperature=0.0,
                ignore_eos=True,
                detokenize=False,
                extra_args={"steering": sp} if sp else None,
            )
            for sp in _specs(s, args.batch_size, cfg)
        ]
        for s in scenarios
    }
    times: dict[str, list[float]] = {s: [] for s in scenarios}
    hooks: dict[str, list[dict[str, float]]] = {s: [] for s in scenarios}
    for r in range(args.rounds + 1):
        for s in scenarios:
            spent.clear()
            t0 = time.perf_counter()
            engines["plain" if s == "plain" else "steer"].generate(
                prompts, params[s], use_tqdm=False
            )
            if r:
                times[s].append(time.perf_counter() - t0)
                hooks[s].append(dict(spent))
    print(
        "| scenario | run (s) | ratio vs plain | "
        + " | ".join(f"{h} (ms)" for h in HOOKS)
        + " |\n|---|---:|---:|"
        + "---:|" * len(HOOKS)
    )
    for s in scenarios:
        ratio = statistics.median(p / t for p, t in zip(times["plain"], times[s], strict=True))
        cells = [f"{1e3 * statistics.median(h.get(k, 0.0) for h in hooks[s]):.1f}" for k in HOOKS]
        print(
            f"| {s} | {statistics.median(times[s]):.3f} | {ratio:.3f}x | "
            + " | ".join(cells)
            + " |"
        )


if __name__ == "__main__":
    main()
