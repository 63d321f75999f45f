"""Offline throughput: what steering costs next to plain vLLM, measured in the same run.

Protocol (DESIGN.md): the same model, requests and sampling (greedy, ignore_eos, fixed
lengths) for every scenario; scenarios interleaved round by round (A B C A B C ...). The
machine's speed drifts by 10-50% over minutes on a shared 2-core VM, in stretches that hit
every scenario of a round alike, so a scenario's ratio to plain vLLM is taken within each
round (plain time / scenario time) and summarised by the median over rounds, with the
interquartile range; the ratio of the two medians is kept in the JSON too.
Engines run in-process and side by side: "plain" is an engine with the extension switched
off (`additional_config={"steerserve": {"enabled": False}}`: vLLM's own code path).

    python benchmarks/throughput.py                  # the ~100M model, 32 x 64 tokens
    python benchmarks/throughput.py --smoke          # seconds, tiny model (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# vLLM trims torch to one thread for an in-process engine unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

DECODING_SCENARIOS = ("fuse-fixed", "contrast-high")
SCENARIOS = (
    "plain",
    "unsteered",
    "same-spec-all-layers",
    "distinct-specs-all-layers",
    "distinct-head-masks",
    "distinct-head-vectors",
    "fuse-fixed",
    "contrast-high",
    "distinct-readouts",
)
READOUT_SCENARIOS = ("distinct-readouts",)


def _specs(scenario: str, n: int, cfg) -> list[dict | None]:
    """Per-request steering specs of a scenario (None = unsteered)."""
    if scenario in ("plain", "unsteered"):
        return [None] * n
    rng = np.random.default_rng(0)
    num_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    num_heads = cfg.num_attention_heads
    width = num_heads * (getattr(cfg, "head_dim", None) or hidden // num_heads)

    def spec(seed: int) -> dict:
        vecs = np.random.default_rng(seed).standard_normal((num_layers, hidden)) * 0.05
        return {"vectors": [{"data": {str(i): vecs[i].tolist() for i in range(num_layers)}}]}

    if scenario == "same-spec-all-layers":
        return [spec(0)] * n
    if scenario == "distinct-specs-all-layers":
        return [spec(int(s)) for s in rng.integers(1, 1 << 30, size=n)]
    if scenario == "distinct-head-masks":
        # Every request masks its own pair of heads at every layer (PH3-style pruning).
        def masks() -> list[dict]:
            pairs = (
                sorted(rng.choice(num_heads, 2, replace=False).tolist()) for _ in range(num_layers)
            )
            return [{"layer": i, "heads": pair} for i, pair in enumerate(pairs)]

        return [{"heads": masks()} for _ in range(n)]
    if scenario == "fuse-fixed":
        # Layer Fused Decoding with a fixed layer: one extra lm_head row per request.
        return [{"decoding": {"mode": "fuse", "layer": num_layers * 2 // 3, "weight": 0.5}}] * n
    if scenario == "contrast-high":
        # DoLa, the "high" bucket: N/4 extra lm_head rows per request and token.
        return [{"decoding": {"mode": "contrast", "layers": "high"}}] * n
    if scenario == "distinct-head-vectors":
        # ITI-style: a distinct o_proj-input direction added at every layer, per request.
        return [
            {"vectors": [{"site": "heads", "scale": 0.05,
                          "data": {str(i): rng.standard_normal(width).tolist()
                                   for i in range(num_layers)}}]}
            for _ in range(n)
        ]  # fmt: skip
    if scenario == "distinct-readouts":
        # Monitoring: each request reads its own 2 directions (middle and 2/3 depth) on
        # every generated token, unsteered otherwise.
        def readout(layer: int) -> dict:
            return {"data": rng.standard_normal(hidden).tolist(), "layer": layer}

        return [{"readout": [readout(num_layers // 2), readout(num_layers * 2 // 3)]}
                for _ in range(n)]  # fmt: skip
    raise ValueError(f"unknown scenario {scenario!r}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: build the ~100M random model)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="measured rounds (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument(
        "--max-projections",
        type=int,
        default=None,
        help="additional_config.steerserve.max_projections of the steered engine",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens: seconds")
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)

    if args.smoke:
        args.requests, args.output_len, args.prompt_len, args.rounds = 4, 8, 8, 1
        args.dtype, args.eager = "float32", True
    cache = ROOT / ".cache" / "models"
    spec = TinySpec() if args.smoke else BENCH_SPEC
    model = Path(args.model) if args.model else build_tiny_model(cache / spec.slug, spec)

    from tqdm import tqdm
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    cfg = AutoConfig.from_pretrained(model)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    engine_kw = dict(
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=max(args.requests, 1),
        max_num_batched_tokens=max(2048, args.prompt_len * args.requests),
        kv_cache_memory_bytes=1 << 30 if not args.smoke else 64 << 20,
        enable_prefix_caching=False,  # every round re-runs the same prompts
        seed=0,
    )
    # Layer-reading decoding is opt-in per engine (its capture costs every request), so
    # its scenarios run on an engine of their own and the others measure it switched off.
    engine_of = {
        s: "plain" if s == "plain" else "decode" if s in DECODING_SCENARIOS
        else "readout" if s in READOUT_SCENARIOS else "steer"
        for s in scenarios
    }  # fmt: skip
    engines = {}
    for name in sorted(set(engine_of.values())):
        settings: dict = {"enabled": name != "plain", "decoding": name == "decode",
                          "readout": name == "readout"}  # fmt: skip
        if name != "plain" and args.max_projections is not None:
            settings["max_projections"] = args.max_projections
        engines[name] = LLM(str(model), additional_config={"steerserve": settings}, **engine_kw)

    rng = np.random.default_rng(1)
    prompts = [
        {"prompt_token_ids": rng.integers(10, 500, size=args.prompt_len).tolist()}
        for _ in range(args.requests)
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
            for sp in _specs(s, args.requests, cfg)
        ]
        for s in scenarios
    }
    times: dict[str, list[float]] = {s: [] for s in scenarios}
    total = (args.rounds + 1) * len(scenarios)
    with tqdm(total=total, desc="throughput", unit="run") as bar:
        for r in range(args.rounds + 1):
            # Rotate the order each round so that no scenario always runs first.
            for s in scenarios[r % len(scenarios) :] + scenarios[: r % len(scenarios)]:
                llm = engines[engine_of[s]]
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params[s], use_tqdm=False)
                dt = time.perf_counter() - t0
                assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
                if r > 0:  # round 0 warms caches and allocators
                    times[s].append(dt)
                bar.update()
    tokens = args.requests * args.output_len
    base = times.get("plain")
    rows = []
    for s in scenarios:
        med = statistics.median(times[s])
        paired = [p / t for p, t in zip(base, times[s], strict=True)] if base else None
        rows.append(
            {
                "scenario": s,
                "median_s": med,
                "tok_per_s": tokens / med,
                "ratio_vs_plain": statistics.median(paired) if paired else None,
                "ratio_iqr": _quartiles(paired) if paired else None,
                "ratio_of_medians": statistics.median(base) / med if base else None,
                "runs_s": times[s],
            }
        )
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model": str(model) if args.model else spec.slug,
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "results": rows,
    }
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{_stamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    print(f"\nwrote {out}")
    return result


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def markdown_table(result: dict) -> str:
    lines = [
        "| scenario | output tok/s | ratio vs plain vLLM (paired median) | interquartile range |",
        "|---|---:|---:|---:|",
    ]
    for row in result["results"]:
        ratio, iqr = "-", "-"
        if row["ratio_vs_plain"]:
            ratio = f"{row['ratio_vs_plain']:.3f}x"
            iqr = "{:.3f}-{:.3f}".format(*row["ratio_iqr"])
        lines.append(f"| {row['scenario']} | {row['tok_per_s']:.0f} | {ratio} | {iqr} |")
    return "\n".join(lines)


def _stamp() -> str:
    return "throughput-" + datetime.now().strftime("%Y%m%d-%H%M%S")


if __name__ == "__main__":
    main()
