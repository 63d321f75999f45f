"""HTTP serving: `steerserve serve` against `vllm serve` on the same model and flags, both
loaded by vLLM's own `vllm bench serve` (a client nobody here wrote).

Both servers are up side by side; every round runs each condition at each request rate,
in an order rotated per round, so that the machine's drift hits all alike:

    vllm                 `vllm serve`, unsteered requests
    steerserve           `steerserve serve`, unsteered requests
    steerserve-steered   `steerserve serve`, every request steered by a vector at all layers
                         (`--extra-body '{"steering": {"vectors": [{"name": "bench"}]}}'`)

For each (condition, rate): output tokens/s, median and p99 TTFT, median and p99
inter-token latency (the median over rounds), and the output throughput's ratio to `vllm`
taken within each round (median over rounds, interquartile range). JSON, a markdown table
and a PNG plot go to benchmarks/results/.

    python benchmarks/serving.py                         # benchmark model, CPU
    python benchmarks/serving.py --smoke                 # tiny model, about a minute
    python benchmarks/serving.py --gpu --model DIR       # CUDA: compiled, CUDA graphs on
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import recording  # noqa: E402
from benchmarks.server_process import (  # noqa: E402
    free_port,
    running_server,
    steerserve_command,
    vllm_command,
)
from steering.tiny_models import BENCH_SPEC, TinySpec, build_tiny_model  # noqa: E402

CONDITIONS = ("vllm", "steerserve", "steerserve-steered")
STEERING = {"vectors": [{"name": "bench", "scale": 1.0}]}
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The same engine for both servers."""
    flags = [
        "--served-model-name",
        "bench",
        "--seed",
        "0",
        "--max-model-len",
        str(args.input_len + args.output_len + 16),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--no-enable-prefix-caching",  # every round sends the same prompts
    ]
    if args.gpu:
        return flags  # vLLM's defaults: compiled, CUDA graphs, memory by utilisation
    flags += [
        "--dtype",
        args.dtype,
        "--kv-cache-memory-bytes",
        str(args.kv_cache_bytes),
        "--max-num-batched-tokens",
        "2048",
    ]
    return [*flags, "--enforce-eager"] if args.eager else flags


def write_bench_vector(model: Path, directory: Path) -> None:
    """A random unit-scale direction at every layer, registered as `bench`."""
    from transformers import AutoConfig

    from steering.vectors import SteeringVector, save_vector

    cfg = AutoConfig.from_pretrained(model)
    rng = np.random.default_rng(0)
    dirs = {
        i: (v / np.linalg.norm(v)).astype(np.float32)
        for i, v in enumerate(rng.standard_normal((cfg.num_hidden_layers, cfg.hidden_size)))
    }
    vector = SteeringVector(
        directions=dirs,
        hidden_size=cfg.hidden_size,
        architecture=cfg.architectures[0],
        num_layers=cfg.num_hidden_layers,
        method="random",
    )
    save_vector(vector, directory / "bench.safetensors")


def bench_serve(base: str, model: Path, rate: str, args, out: Path, steered: bool) -> dict:
    """One `vllm bench serve` run; its saved result."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "vllm_cli.py"),
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        base,
        "--endpoint",
        "/v1/completions",
        "--model",
        "bench",
        "--tokenizer",
        str(model),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--random-range-ratio",
        "0",
        "--num-prompts",
        str(args.num_prompts),
        "--request-rate",
        rate,
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        "0",
        "--disable-tqdm",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    if steered:
        cmd += ["--extra-body", json.dumps({"steering": STEERING})]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result["completed"] != args.num_prompts or result.get("failed"):
        raise RuntimeError(f"{result['completed']}/{args.num_prompts} requests completed")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: build the ~100M random model)")
    p.add_argument("--rates", default="4,12,inf", help="request rates (req/s), comma-separated")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    p.add_argument("--eager", action="store_true", help="--enforce-eager (default: compiled)")
    p.add_argument("--gpu", action="store_true", help="CUDA defaults (CUDA graphs on)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests")
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rates, args.num_prompts, args.output_len, args.input_len = "inf", 4, 8, 8
        args.rounds, args.dtype, args.eager, args.kv_cache_bytes = 1, "float32", True, 64 << 20
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    spec = TinySpec() if args.smoke else BENCH_SPEC
    model = (
        Path(args.model)
        if args.model
        else build_tiny_model(ROOT / ".cache" / "models" / spec.slug, spec)
    )

    from tqdm import tqdm

    runs: dict[tuple[str, str], list[dict]] = {(c, r): [] for c in CONDITIONS for r in rates}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "vectors").mkdir()
        write_bench_vector(model, tmp / "vectors")
        flags = engine_flags(args)
        ports = {"vllm": free_port(), "steerserve": free_port()}
        env = {"STEERSERVE_DATABASE_URL": f"sqlite:///{tmp / 'ab.db'}"}
        vllm = running_server(
            vllm_command(str(model), flags, ports["vllm"]),
            ports["vllm"],
            tmp / "vllm.log",
            timeout=1800,
        )
        ours = running_server(
            steerserve_command(
                ["--model", str(model), "--vectors-dir", str(tmp / "vectors"), *flags],
                ports["steerserve"],
            ),
            ports["steerserve"],
            tmp / "steerserve.log",
            env,
            timeout=1800,
        )
        bar = tqdm(total=(args.rounds + 1) * len(rates) * len(CONDITIONS), desc="bench serve")
        with vllm as (vllm_base, _), ours as (ours_base, _), bar:
            base = {"vllm": vllm_base, "steerserve": ours_base, "steerserve-steered": ours_base}
            for rnd in range(args.rounds + 1):
                order = CONDITIONS[rnd % 3 :] + CONDITIONS[: rnd % 3]
                for rate in rates:
                    for c in order:
                        out = tmp / f"{c}-{rate}-{rnd}.json"
                        result = bench_serve(base[c], model, rate, args, out, c.endswith("steered"))
                        if rnd > 0:  # round 0 warms both servers
                            runs[c, rate].append(result)
                        bar.update()
    rows = []
    for rate in rates:
        plain = [r["output_throughput"] for r in runs["vllm", rate]]
        for c in CONDITIONS:
            mine = runs[c, rate]
            paired = [r["output_throughput"] / v for r, v in zip(mine, plain, strict=True)]
            q = np.percentile(paired, [25, 75]).tolist()
            rows.append(
                {
                    "condition": c,
                    "request_rate": rate,
                    **{m: statistics.median(r[m] for r in mine) for m in METRICS},
                    "ratio_vs_vllm": statistics.median(paired),
                    "ratio_iqr": q,
                    "runs": [{m: r[m] for m in METRICS} for r in mine],
                }
            )
    client = "vllm bench serve (random dataset, fixed lengths, ignore_eos, greedy)"
    result = {
        **recording.header(str(args.model) if args.model else spec.slug, args, client=client),
        "results": rows,
    }
    recording.write(result, args.out, "serving", markdown_table(result), plot)
    return result


def markdown_table(result: dict) -> str:
    lines = [
        "| server, requests | rate (req/s) | output tok/s | ratio vs vllm serve (IQR) | "
        "TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lo, hi = r["ratio_iqr"]
        lines.append(
            f"| {r['condition']} | {r['request_rate']} | {r['output_throughput']:,.0f} | "
            f"{r['ratio_vs_vllm']:.3f}x ({lo:.3f}-{hi:.3f}) | "
            f"{r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
            f"{r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["request_rate"] for r in result["results"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for c in CONDITIONS:
        rows = [r for r in result["results"] if r["condition"] == c]
        x = np.arange(len(rows))
        for ax, key, label in zip(
            axes,
            ("output_throughput", "median_ttft_ms", "median_itl_ms"),
            ("output tokens/s", "TTFT p50 (ms)", "ITL p50 (ms)"),
            strict=True,
        ):
            ax.plot(x, [r[key] for r in rows], marker="o", label=c)
            ax.set_xticks(x, rates)
            ax.set_xlabel("request rate (req/s)")
            ax.set_title(label)
    axes[0].legend()
    fig.suptitle(
        f"steerserve vs vllm serve, {result['model']} ({result['machine'].split(',')[0]},"
        f" {result['config']['num_prompts']} prompts per run)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
