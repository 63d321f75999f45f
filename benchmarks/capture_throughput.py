"""Capture throughput: activations for training vectors, against plain vLLM in the same run.

Scenarios, interleaved round by round (the protocol of `throughput.py`):

    plain-prefill      plain vLLM (extension off): the same prompts, 1 generated token each
    capture-last       steering.capture.Capturer, every layer, last prompt token
    capture-mean       ... every layer, mean over the prompt
    plain-generation   plain vLLM generating (32 requests x 64 tokens, greedy): what users
                       compare a tool's tokens/s with

Capture reads prompt tokens, so its tokens/s counts prompt tokens; its ratio is paired with
plain-prefill (the same work without capture) within each round.

    python benchmarks/capture_throughput.py            # the ~100M benchmark model
    python benchmarks/capture_throughput.py --smoke    # tiny model, seconds
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

from benchmarks import recording  # noqa: E402
from benchmarks.throughput import _quartiles  # noqa: E402
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

SCENARIOS = ("plain-prefill", "capture-last", "capture-mean", "plain-generation")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: build the ~100M random model)")
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-requests", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="measured rounds (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--smoke", action="store_true", help="tiny model, few prompts: seconds")
    p.add_argument("--out", help="JSON path (default: benchmarks/results/capture-<stamp>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.prompt_len, args.gen_requests, args.gen_len = 8, 8, 4, 8
        args.rounds, args.dtype = 1, "float32"
    spec = TinySpec() if args.smoke else BENCH_SPEC
    model = (
        Path(args.model)
        if args.model
        else build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec)
    )

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from steering.capture import Capturer

    engine_kw = dict(
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=max(args.prompt_len, 8) + args.gen_len + 16,
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        kv_cache_memory_bytes=1 << 30 if not args.smoke else 64 << 20,
        seed=0,
    )
    plain = LLM(
        str(model),
        enable_prefix_caching=False,
        additional_config={"steerserve": {"enabled": False}},
        **engine_kw,
    )
    capturer = Capturer(str(model), **engine_kw)
    layers = list(range(capturer.shape.num_layers))

    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 500, size=args.prompt_len).tolist() for _ in range(args.prompts)]
    gen_prompts = [{"prompt_token_ids": p} for p in prompts[: args.gen_requests]]
    one = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    gen = SamplingParams(
        max_tokens=args.gen_len, temperature=0.0, ignore_eos=True, detokenize=False
    )

    def run(scenario: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        if scenario == "plain-prefill":
            plain.generate([{"prompt_token_ids": p} for p in prompts], one, use_tqdm=False)
            tokens = args.prompts * args.prompt_len
        elif scenario == "plain-generation":
            outs = plain.generate(gen_prompts, gen, use_tqdm=False)
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        else:
            got = capturer.capture(prompts, layers, scenario.removeprefix("capture-"))
            assert len(got) == len(prompts) and got[0].shape[0] == len(layers)
            tokens = args.prompts * args.prompt_len
        return time.perf_counter() - t0, tokens

    times: dict[str, list[float]] = {s: [] for s in SCENARIOS}
    tokens: dict[str, int] = {}
    with tqdm(total=(args.rounds + 1) * len(SCENARIOS), desc="capture", unit="run") as bar:
        for r in range(args.rounds + 1):
            for s in SCENARIOS[r % len(SCENARIOS) :] + SCENARIOS[: r % len(SCENARIOS)]:
                dt, tokens[s] = run(s)
                if r > 0:
                    times[s].append(dt)
                bar.update()
    base = times["plain-prefill"]
    rows = []
    for s in SCENARIOS:
        med = statistics.median(times[s])
        paired = [b / t for b, t in zip(base, times[s], strict=True)]
        prefill = s != "plain-generation"  # generation is a different kind of work: no ratio
        rows.append(
            {
                "scenario": s,
                "tokens": tokens[s],
                "kind": "generated" if s == "plain-generation" else "prompt",
                "tok_per_s": tokens[s] / med,
                "ratio_vs_plain_prefill": statistics.median(paired) if prefill else None,
                "ratio_iqr": _quartiles(paired) if prefill else None,
                "runs_s": times[s],
            }
        )
    result = {**recording.header(str(model) if args.model else spec.slug, args), "results": rows}
    recording.write(result, args.out, "capture", markdown_table(result))
    return result


def markdown_table(result: dict) -> str:
    lines = [
        "| scenario | tokens/s | counts | ratio vs plain prefill (paired median) |",
        "|---|---:|---|---:|",
    ]
    for row in result["results"]:
        ratio = row["ratio_vs_plain_prefill"]
        shown = f"{ratio:.3f}x" if ratio is not None else "-"
        lines.append(f"| {row['scenario']} | {row['tok_per_s']:,.0f} | {row['kind']} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
