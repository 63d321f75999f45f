"""What readout costs over HTTP: the values' transport (one batched worker pull per step
for all streaming requests) on top of the engine's per-layer dot products.

One `steerserve serve --enable-steering-readout` on the benchmark model; a round sends the
same concurrent requests in each condition (interleaved, order rotated per round):

    steered             each request its own vector at one layer, streamed
    steered+readout     the same, reading two directions per token, streamed
    steered+readout/whole   the same, not streamed (values fetched once, at the end)

and reports output tokens/s per condition and its ratio to `steered` within each round
(median over rounds, interquartile range).

    python benchmarks/readout_http.py                  # benchmark model, 32 x 64 tokens
    python benchmarks/readout_http.py --smoke          # tiny model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import recording  # noqa: E402
from benchmarks.server_process import free_port, running_server, steerserve_command  # noqa: E402
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

CONDITIONS = ("steered", "steered+readout", "steered+readout/whole")


def _bodies(condition: str, args, hidden: int, layers: int) -> list[dict]:
    # Separate draws, so that every condition has the same prompts and steering.
    rng, read_rng = np.random.default_rng(7), np.random.default_rng(8)
    bodies = []
    for _ in range(args.requests):
        vec = rng.standard_normal(hidden)
        data = {str(layers // 2): (4 * vec / np.linalg.norm(vec)).tolist()}
        steering: dict = {"vectors": [{"data": data}]}
        if condition != "steered":
            steering["readout"] = [
                {"data": read_rng.standard_normal(hidden).tolist(), "layer": layers // 3},
                {"data": read_rng.standard_normal(hidden).tolist(), "layer": layers - 1},
            ]
        bodies.append(
            {
                "model": "bench",
                "prompt": rng.integers(10, 500, size=args.prompt_len).tolist(),
                "max_tokens": args.output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": not condition.endswith("/whole"),
                "stream_options": {"include_usage": True},
                "steering": steering,
            }
        )
        if condition.endswith("/whole"):
            del bodies[-1]["stream_options"]
    return bodies


async def _one(http: httpx.AsyncClient, body: dict, want_readout: bool) -> int:
    """Output tokens of one request (checking the values came, when asked for)."""
    if not body["stream"]:
        r = await http.post("/v1/completions", json=body)
        r.raise_for_status()
        data = r.json()
        if want_readout:
            assert len(data["choices"][0]["readout"][0]["values"]) == body["max_tokens"]
        return data["usage"]["completion_tokens"]
    tokens, values = 0, 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if "readout" in choice:
                    values += len(choice["readout"][0]["values"])
    if want_readout:
        assert values == body["max_tokens"], values
    return tokens


async def _round(base: str, bodies: list[dict], want_readout: bool) -> tuple[float, int]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(_one(http, b, want_readout) for b in bodies))
        return time.perf_counter() - t0, sum(tokens)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6, help="measured rounds (after one warm-up)")
    p.add_argument("--eager", action="store_true", help="--enforce-eager (default: compiled)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens: seconds")
    p.add_argument("--out", help="JSON results path")
    args = p.parse_args(argv)
    if args.smoke:
        args.requests, args.output_len, args.prompt_len, args.rounds = 4, 8, 8, 1
        args.eager = True
    spec = TinySpec() if args.smoke else BENCH_SPEC
    model = build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec)
    flags = [
        "--model",
        str(model),
        "--served-model-name",
        "bench",
        "--enable-steering-readout",
        "--dtype",
        "float32" if args.smoke else "bfloat16",
        "--seed",
        "0",
        "--max-model-len",
        str(args.prompt_len + args.output_len + 16),
        "--max-num-seqs",
        str(max(args.requests, 1)),
        "--max-num-batched-tokens",
        str(max(2048, args.prompt_len * args.requests)),
        "--kv-cache-memory-bytes",
        str(1 << 30 if not args.smoke else 64 << 20),
        "--no-enable-prefix-caching",
        *(["--enforce-eager"] if args.eager else []),
    ]
    bodies = {c: _bodies(c, args, spec.hidden_size, spec.num_layers) for c in CONDITIONS}
    times: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        env = {"STEERSERVE_DATABASE_URL": f"sqlite:///{Path(tmp) / 'ab.db'}"}
        from tqdm import tqdm

        server = running_server(steerserve_command(flags, port), port, log, env, timeout=900)
        bar = tqdm(total=(args.rounds + 1) * len(CONDITIONS), desc="rounds")
        with server as (base, _), bar:
            for r in range(args.rounds + 1):
                order = CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]
                for c in order:
                    dt, tokens = asyncio.run(_round(base, bodies[c], c != "steered"))
                    assert tokens == args.requests * args.output_len, tokens
                    if r > 0:
                        times[c].append(dt)
                    bar.update()
    tokens = args.requests * args.output_len
    rows = []
    for c in CONDITIONS:
        paired = [b / t for b, t in zip(times["steered"], times[c], strict=True)]
        q = np.percentile(paired, [25, 75]).tolist()
        rows.append(
            {
                "condition": c,
                "tok_per_s": tokens / statistics.median(times[c]),
                "ratio_vs_steered": statistics.median(paired),
                "ratio_iqr": q,
                "runs_s": times[c],
            }
        )
    result = {**recording.header(spec.slug, args), "results": rows}
    lines = ["| condition | output tokens/s | ratio vs steered (IQR) |", "|---|---:|---:|"]
    for row in rows:
        lo, hi = row["ratio_iqr"]
        lines.append(
            f"| {row['condition']} | {row['tok_per_s']:,.0f} | "
            f"{row['ratio_vs_steered']:.3f}x ({lo:.3f}-{hi:.3f}) |"
        )
    recording.write(result, args.out, "readout-http", "\n".join(lines))
    return result


if __name__ == "__main__":
    main()
