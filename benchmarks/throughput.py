"""Offline throughput: what steering costs next to plain vLLM, measured in the same run.

Protocol (docs/design.md#performance-protocol): the same model, requests and sampling
(greedy, ignore_eos, fixed lengths) for every scenario; scenarios interleaved round by
round (A B C A B C ...). The machine's speed drifts by 10-50% over minutes on a shared
2-core VM, in stretches that hit every scenario of a round alike, so a scenario's ratio to
plain vLLM is taken within each round (plain time / scenario time, same batch size) and
summarised by the median over rounds, with the interquartile range; the ratio of the two
medians is kept in the JSON too.
--lockstep goes further: a round's engines run side by side, one engine step each in turn
(about 0.1 s a step at batch 32), so that drift over seconds hits them alike; scenarios that
share an engine run in groups of their own, each beside plain vLLM again.
The engines are built in an order drawn for each run (--engine-seed): two instances differ by
a percent or two for their whole life, which only independent runs pooled by
benchmarks/replicates.py cover.
Engines run in-process and side by side: "plain" is an engine with the extension switched
off (`additional_config={"steerserve": {"enabled": False}}`: vLLM's own code path).
"hf-hooks" is HF transformers' generate with steering hooks (benchmarks/hf_hooks.py) on
the requests of "distinct-specs-all-layers": the alternative users have today.

    python benchmarks/throughput.py                  # the ~100M model, batches 1-64
    python benchmarks/throughput.py --smoke          # seconds, tiny model (run by the tests)
    python benchmarks/throughput.py --moe            # the ~100M MoE model (MOE_SCENARIOS)
    python benchmarks/throughput.py --control        # + a second plain engine (A/A noise floor)
    python benchmarks/throughput.py --lockstep       # engines stepped in turn (not hf-hooks)
    python benchmarks/throughput.py --gpu --model DIR   # CUDA: compiled, CUDA graphs on

Writes JSON, a markdown table (.md) and a plot (.png) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import itertools
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import in_process  # noqa: E402, F401 (before numpy, torch and vllm)

# isort: split
import numpy as np  # noqa: E402

from benchmarks import recording  # noqa: E402
from steering.tiny_models import (  # noqa: E402
    BENCH_MOE_SPEC,
    BENCH_SPEC,
    TinySpec,
    build_tiny_model,
    tiny_spec,
)

DECODING_SCENARIOS = ("fuse-fixed", "contrast-high")
READOUT_SCENARIOS = ("distinct-readouts",)
# On an engine with SAE feature ops on (max_features = FEATURES_PER_LAYER), random SAEs of
# width 8 x hidden at two layers (FEATURE_LAYERS of the depth).
FEATURE_SCENARIOS = ("features-unsteered", "distinct-feature-clamps")
# The same on an engine that runs feature ops only at the SAEs' layers (feature_layers).
FEATURE_AT_SCENARIOS = ("features-at-unsteered", "distinct-feature-clamps-at")
FEATURES_PER_LAYER = 8
# On an engine with a top-k SAE (the first bench SAE, width 8 x hidden): its cost when no
# request asks (one stream copy per step), and every request reading its top TOPK_K
# features per generated token (the full encoder on those rows at the sampler step).
TOPK_SCENARIOS = ("topk-unsteered", "topk-readouts")
TOPK_K = 16
# On an engine with conditions on (max_conditions 1, no dynamic adds: a gated constant add
# folds into the constants; condition_layers the middle layer unless --condition-layers
# all): its cost unsteered, and a distinct conditional
# spec per request (CAST: one condition on the prompt's mean at
# the middle layer, a behaviour vector at every layer gated by it, always met here so that
# every generated token pays the whole cost).
CONDITIONAL_SCENARIOS = ("conditional-unsteered", "distinct-conditional-specs")
HF_SCENARIOS = ("hf-hooks",)
# An A/A control (--control): a second engine with the extension off, measured like every
# scenario against the first. Its ratio should be 1.00x; how far it strays is the run's
# noise floor (drift, and one engine instance placed worse than another).
CONTROL_SCENARIOS = ("plain-control",)
# The engines with the extension switched off (vLLM's own code path).
PLAIN_ENGINES = ("plain", "control")
# On the MoE benchmark model (--moe): residual and head steering as on the dense model, and
# router steering.
MOE_SCENARIOS = (
    "plain",
    "unsteered",
    "distinct-specs-all-layers",
    "distinct-head-masks",
    "distinct-expert-masks",
    "distinct-experts-and-vectors",
)
SCENARIOS = (
    "plain",
    "unsteered",
    "same-spec-one-layer",
    "same-spec-all-layers",
    "distinct-specs-all-layers",
    "three-vectors-all-layers",
    "distinct-head-masks",
    "distinct-head-vectors",
    "fuse-fixed",
    "contrast-high",
    "distinct-readouts",
    "hf-hooks",
)
# What each scenario gives every request, for the table.
DESCRIPTIONS = {
    "plain": "plain vLLM (extension disabled)",
    "plain-control": "plain vLLM again, a second engine (A/A control)",
    "unsteered": "extension enabled, unsteered",
    "same-spec-one-layer": "one residual vector at one layer, all requests",
    "same-spec-all-layers": "one residual vector at all layers, all requests",
    "distinct-specs-all-layers": "a distinct residual vector per request, all layers",
    "three-vectors-all-layers": "3 distinct residual vectors per request, all layers",
    "distinct-head-masks": "a distinct pair of masked heads per request and layer",
    "distinct-head-vectors": "a distinct head-site (ITI) vector per request, all layers",
    "fuse-fixed": "layer-fused decoding, fixed layer",
    "contrast-high": 'contrastive decoding, "high" bucket',
    "distinct-readouts": "reading 2 distinct directions per request",
    "features-unsteered": "feature ops on (8 per layer), unsteered",
    "distinct-feature-clamps": "8 distinct SAE feature clamps per request at each of 2 layers",
    "features-at-unsteered": "feature ops on at the SAEs' 2 layers only, unsteered",
    "distinct-feature-clamps-at": "8 distinct SAE clamps per request at each of 2 layers, "
    "feature ops at those layers only",
    "topk-unsteered": "top-k readout SAE loaded (width 8 x hidden), no request asks",
    "topk-readouts": f"every request reads its top {TOPK_K} SAE features per token",
    "hf-hooks": "HF transformers + hooks, distinct vectors, all layers",
    "conditional-unsteered": "conditions on (1 per request), unsteered",
    "distinct-conditional-specs": "a distinct condition + gated vector per request, all layers",
    "distinct-expert-masks": "a distinct expert masked out per request and MoE layer",
    "distinct-experts-and-vectors": "distinct expert masks and residual vectors, all layers",
}


def _specs(scenario: str, n: int, cfg) -> list[dict | None]:
    """Per-request steering specs of a scenario (None = unsteered)."""
    if scenario in ("plain", "plain-control", "unsteered"):
        return [None] * n
    rng = np.random.default_rng(0)
    num_layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    num_heads = cfg.num_attention_heads
    width = num_heads * (getattr(cfg, "head_dim", None) or hidden // num_heads)

    def entry(seed: int, layers: range) -> dict:
        vecs = np.random.default_rng(seed).standard_normal((num_layers, hidden)) * 0.05
        return {"data": {str(i): vecs[i].tolist() for i in layers}}

    def spec(seed: int) -> dict:
        return {"vectors": [entry(seed, range(num_layers))]}

    if scenario == "same-spec-one-layer":
        return [{"vectors": [entry(0, range(num_layers // 2, num_layers // 2 + 1))]}] * n
    if scenario == "same-spec-all-layers":
        return [spec(0)] * n
    if scenario in ("distinct-specs-all-layers", "hf-hooks"):
        return [spec(int(s)) for s in rng.integers(1, 1 << 30, size=n)]
    if scenario == "three-vectors-all-layers":
        seeds = rng.integers(1, 1 << 30, size=(n, 3))
        return [{"vectors": [entry(int(s), range(num_layers)) for s in row]} for row in seeds]
    if scenario == "distinct-head-masks":
        # Every request masks its own pair of heads at every layer (PH3-style pruning).
        def masks() -> list[dict]:
            pairs = (
                sorted(rng.choice(num_heads, 2, replace=False).tolist()) for _ in range(num_layers)
            )
            return [{"layer": i, "heads": pair} for i, pair in enumerate(pairs)]

        return [{"heads": masks()} for _ in range(n)]
    if scenario in ("distinct-expert-masks", "distinct-experts-and-vectors"):
        from steering.spec import ModelShape

        shape = ModelShape.from_hf_config(cfg)

        def experts() -> list[dict]:
            return [
                {"layer": i, "experts": [int(rng.integers(shape.experts_of(i)))]}
                for i in shape.moe_layers
            ]

        if scenario == "distinct-expert-masks":
            return [{"experts": experts()} for _ in range(n)]
        return [{"experts": experts(), **spec(int(s))} for s in rng.integers(1, 1 << 30, size=n)]
    if scenario == "fuse-fixed":
        # Layer Fused Decoding with a fixed layer: one extra lm_head row per request.
        return [{"decoding": {"mode": "fuse", "layer": num_layers * 2 // 3, "weight": 0.5}}] * n
    if scenario == "contrast-high":
        # DoLa, the "high" bucket: N/4 extra lm_head rows per request and token.
        return [{"decoding": {"mode": "contrast", "layers": "high"}}] * n
    if scenario == "distinct-head-vectors":
        # ITI-style: a distinct o_proj-input direction added at every layer, per request.
        return [
            {
                "vectors": [
                    {
                        "site": "heads",
                        "scale": 0.05,
                        "data": {
                            str(i): rng.standard_normal(width).tolist() for i in range(num_layers)
                        },
                    }
                ]
            }
            for _ in range(n)
        ]
    if scenario == "distinct-readouts":
        # Monitoring: each request reads its own 2 directions (middle and 2/3 depth) on
        # every generated token, unsteered otherwise.
        def readout(layer: int) -> dict:
            return {"data": rng.standard_normal(hidden).tolist(), "layer": layer}

        return [
            {"readout": [readout(num_layers // 2), readout(num_layers * 2 // 3)]} for _ in range(n)
        ]
    if scenario == "distinct-conditional-specs":
        out = []
        for s in rng.integers(1, 1 << 30, size=n):
            behaviour = entry(int(s), range(num_layers)) | {"positions": "generated", "when": "c"}
            condition = {
                "name": "c",
                "data": np.random.default_rng(int(s) + 1).standard_normal(hidden).tolist(),
                "layer": num_layers // 2,
                "threshold": -1.0,  # cosine > -1: met, so the gated vector always acts
            }
            out.append({"conditions": [condition], "vectors": [behaviour]})
        return out
    if scenario in (
        "features-unsteered",
        "features-at-unsteered",
        "topk-unsteered",
        "conditional-unsteered",
    ):
        return [None] * n
    if scenario == "topk-readouts":
        sae = f"bench{feature_layers(num_layers)[0]}"
        return [{"readout": [{"sae": sae, "top_k": TOPK_K}]}] * n
    if scenario in ("distinct-feature-clamps", "distinct-feature-clamps-at"):
        width = 8 * hidden
        return [
            {
                "features": [
                    {"sae": f"bench{layer}", "feature": int(f), "op": "clamp", "value": float(v)}
                    for layer in feature_layers(num_layers)
                    for f, v in zip(
                        rng.choice(width, FEATURES_PER_LAYER, replace=False),
                        rng.uniform(0.0, 4.0, FEATURES_PER_LAYER),
                        strict=True,
                    )
                ]
            }
            for _ in range(n)
        ]
    raise ValueError(f"unknown scenario {scenario!r}")


def engine_for(scenario: str) -> str:
    """The engine a scenario runs on. Layer-reading decoding, readout, SAE features, top-k
    and conditions are opt-in per engine (they cost every request), so their scenarios run
    on engines of their own; the others measure them switched off."""
    for scenarios, engine in (
        (("plain",), "plain"),
        (CONTROL_SCENARIOS, "control"),
        (DECODING_SCENARIOS, "decode"),
        (READOUT_SCENARIOS, "readout"),
        (FEATURE_SCENARIOS, "features"),
        (FEATURE_AT_SCENARIOS, "features-at"),
        (TOPK_SCENARIOS, "topk"),
        (CONDITIONAL_SCENARIOS, "conditional"),
        (HF_SCENARIOS, "hf"),
    ):
        if scenario in scenarios:
            return engine
    return "steer"


def engine_settings(
    name: str, cfg, max_projections: int | None = None, condition_layers: str = "used"
) -> dict:
    """additional_config.steerserve of a benchmark engine (engine_for's names)."""
    settings: dict = {
        "enabled": name not in PLAIN_ENGINES,
        "decoding": name == "decode",
        "readout": name == "readout",
    }
    if name not in PLAIN_ENGINES and max_projections is not None:
        settings["max_projections"] = max_projections
    if name in ("features", "features-at", "topk"):
        saes = write_bench_saes(
            Path(tempfile.mkdtemp(prefix="bench-saes-")), cfg.hidden_size, cfg.num_hidden_layers
        )
        settings["saes_dir"] = str(saes)
    if name in ("features", "features-at"):
        settings["max_features"] = FEATURES_PER_LAYER
        if name == "features-at":
            settings["feature_layers"] = list(feature_layers(cfg.num_hidden_layers))
    if name == "topk":
        settings["topk_sae"] = f"bench{feature_layers(cfg.num_hidden_layers)[0]}"
    if name == "conditional":
        settings["max_conditions"] = 1
        if condition_layers == "used":  # the one layer the conditions read
            settings["condition_layers"] = [cfg.num_hidden_layers // 2]
    return settings


def feature_layers(num_layers: int) -> tuple[int, int]:
    return num_layers // 3, 2 * num_layers // 3


def write_bench_saes(directory: Path, hidden: int, num_layers: int) -> Path:
    """Random ReLU SAEs (width 8 x hidden) at feature_layers(), named bench<layer>."""
    from steering.sae import SparseAutoencoder, save_sae

    rng = np.random.default_rng(3)
    width = 8 * hidden
    for layer in feature_layers(num_layers):
        w_dec = rng.standard_normal((width, hidden)).astype(np.float32)
        w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
        sae = SparseAutoencoder(
            (w_dec.T * 0.5).copy(),
            np.zeros(width, np.float32),
            w_dec,
            np.zeros(hidden, np.float32),
            layer=layer,
        )
        save_sae(sae, directory / f"bench{layer}.safetensors")
    return directory


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: build the ~100M random model)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="requests per run, comma-separated")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8, help="measured rounds (after one warm-up)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: compiled)")
    p.add_argument(
        "--condition-layers",
        choices=("used", "all"),
        default="used",
        help="the conditional engine sums prompt rows at the layer its conditions read "
        "(condition_layers, the default) or at every layer",
    )
    p.add_argument("--gpu", action="store_true", help="CUDA defaults (CUDA graphs on)")
    p.add_argument("--scenarios", default=None, help="default: every scenario of the model")
    p.add_argument(
        "--max-projections",
        type=int,
        default=None,
        help="additional_config.steerserve.max_projections of the steered engine",
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="add plain-control: a second plain engine, whose ratio is the run's noise floor",
    )
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="run a round's engines side by side, one engine step each in turn (lockstep())",
    )
    p.add_argument(
        "--engine-seed",
        type=int,
        default=None,
        help="seed of the order the engines are built in (default: a fresh one, recorded)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, few tokens: seconds")
    p.add_argument(
        "--moe",
        action="store_true",
        help="the ~100M MoE model and MOE_SCENARIOS (unless --scenarios is given)",
    )
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)
    if args.lockstep and args.scenarios and set(HF_SCENARIOS) & set(args.scenarios.split(",")):
        p.error("--lockstep steps vLLM engines: hf-hooks cannot run in it")

    if args.smoke:
        args.batch_sizes, args.output_len, args.prompt_len, args.rounds = "1,4", 8, 8, 1
        args.dtype, args.eager = "float32", True
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()})
    cache = ROOT / ".cache" / "models"
    if args.moe:
        spec = tiny_spec("qwen3_moe") if args.smoke else BENCH_MOE_SPEC
    else:
        spec = TinySpec() if args.smoke else BENCH_SPEC
    if args.scenarios is None:
        default = MOE_SCENARIOS if args.moe else SCENARIOS
        args.scenarios = ",".join(s for s in default if not (args.lockstep and s in HF_SCENARIOS))
    model = Path(args.model) if args.model else build_tiny_model(cache / spec.slug, spec)

    import torch
    from tqdm import tqdm
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from benchmarks.hf_hooks import HFSteeredGeneration, vectors_of

    cfg = AutoConfig.from_pretrained(model)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.control and "plain-control" not in scenarios:
        scenarios.append("plain-control")
    most = max(batch_sizes)
    engine_of = {s: engine_for(s) for s in scenarios}
    # Where an engine is built among the others shows in its speed for as long as it lives
    # (the A/A control read 1.013-1.018x in three runs with plain vLLM always built last), so
    # the order is drawn afresh for every run: across runs (benchmarks/replicates.py) it is
    # part of the engines' spread that the interval covers, not a bias.
    if args.engine_seed is None:
        args.engine_seed = secrets.randbits(32)
    vllm_engines = build_order(set(engine_of.values()) - {"hf"}, args.engine_seed)
    engine_kw: dict = dict(
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=args.prompt_len + args.output_len + 16,
        max_num_seqs=most,
        max_num_batched_tokens=max(2048, args.prompt_len * most),
        enable_prefix_caching=False,  # every round re-runs the same prompts
        seed=0,
    )
    if args.gpu:  # the engines share the device
        engine_kw["gpu_memory_utilization"] = 0.85 / max(len(vllm_engines), 1)
    else:
        engine_kw["kv_cache_memory_bytes"] = 1 << 30 if not args.smoke else 64 << 20
    engines: dict = {}
    for name in vllm_engines:
        settings = engine_settings(name, cfg, args.max_projections, args.condition_layers)
        engines[name] = LLM(str(model), additional_config={"steerserve": settings}, **engine_kw)
    if "hf" in engine_of.values():
        hf_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            args.dtype, torch.float32
        )
        hf = HFSteeredGeneration(model, hf_dtype, device="cuda" if args.gpu else "cpu")

    rng = np.random.default_rng(1)
    prompts = [rng.integers(10, 500, size=args.prompt_len).tolist() for _ in range(most)]
    specs = {s: _specs(s, most, cfg) for s in scenarios}
    params = {
        s: [
            SamplingParams(
                max_tokens=args.output_len,
                temperature=0.0,
                ignore_eos=True,
                detokenize=False,
                extra_args={"steering": sp} if sp else None,
            )
            for sp in specs[s]
        ]
        for s in scenarios
    }

    def check(outs: list) -> None:
        assert all(len(o) == args.output_len for o in outs)

    def run(s: str, b: int) -> float:
        t0 = time.perf_counter()
        if engine_of[s] == "hf":
            vectors = vectors_of(specs[s][:b], cfg.num_hidden_layers, cfg.hidden_size)
            outs = hf.generate(prompts[:b], vectors, args.output_len)
        else:
            got = engines[engine_of[s]].generate(
                [{"prompt_token_ids": p} for p in prompts[:b]], params[s][:b], use_tqdm=False
            )
            outs = [o.outputs[0].token_ids for o in got]
        dt = time.perf_counter() - t0
        check(outs)
        return dt

    cells = [(s, b) for b in batch_sizes for s in scenarios]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    # The plain time each scenario's run is paired with, round by round.
    base_times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    groups = lockstep_groups(scenarios, engine_of) if args.lockstep else [scenarios]
    runs_per_round = sum(len(g) for g in groups) * len(batch_sizes)
    with tqdm(total=(args.rounds + 1) * runs_per_round, desc="throughput", unit="run") as bar:
        for r in range(args.rounds + 1):
            for b in batch_sizes:
                for group in groups:
                    # Rotate the order each round so that no scenario always runs first.
                    k = r % len(group)
                    order = group[k:] + group[:k]
                    if args.lockstep:
                        spent, outs = lockstep(
                            {
                                s: stepped(engines[engine_of[s]], prompts[:b], params[s][:b])
                                for s in order
                            }
                        )
                        for s in order:
                            check(outs[s])
                        bar.update(len(order))
                    else:
                        spent = {}
                        for s in order:
                            spent[s] = run(s, b)
                            bar.update()
                    if r == 0:  # round 0 warms caches and allocators
                        continue
                    for s in group:
                        if s == "plain" and group is not groups[0]:
                            continue  # plain's own row: its first group's runs
                        times[s, b].append(spent[s])
                        if "plain" in spent:
                            base_times[s, b].append(spent["plain"])
    rows = []
    for s, b in cells:
        mine, base = times[s, b], base_times[s, b]
        med = statistics.median(mine)
        paired = [p / t for p, t in zip(base, mine, strict=True)] if base else None
        rows.append(
            {
                "scenario": s,
                "batch_size": b,
                "median_s": med,
                "tok_per_s": b * args.output_len / med,
                "ratio_vs_plain": statistics.median(paired) if paired else None,
                "ratio_iqr": _quartiles(paired) if paired else None,
                "ratio_ci95": median_ci(paired) if paired else None,
                "ratio_of_medians": statistics.median(base) / med if base else None,
                "runs_s": mine,
            }
        )
    result = {
        **recording.header(str(model) if args.model else spec.slug, args, engines=vllm_engines),
        "results": rows,
    }
    recording.write(result, args.out, "throughput", markdown_table(result), plot)
    return result


def build_order(engines: set[str], seed: int) -> list[str]:
    """The order the engines are built in: a shuffle drawn from `seed`."""
    order = sorted(engines)
    random.Random(seed).shuffle(order)
    return order


def lockstep_groups(scenarios: list[str], engine_of: dict[str, str]) -> list[list[str]]:
    """Scenarios in groups that run side by side: plain in each, no engine twice in one."""
    groups: list[list[str]] = []
    for s in scenarios:
        if s == "plain":
            continue
        for g in groups:
            if all(engine_of[o] != engine_of[s] for o in g):
                g.append(s)
                break
        else:
            groups.append(["plain", s] if "plain" in scenarios else [s])
    return groups or [["plain"]]


_REQUEST_IDS = itertools.count()  # unique across the engines stepped()'s requests go to


def stepped(llm, prompts: list[list[int]], params: list) -> Iterator[None]:
    """llm.generate() as a generator: it yields once its requests are added and after each
    engine step, and returns the generated token ids, in request order."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    ids = [f"lockstep-{next(_REQUEST_IDS)}" for _ in prompts]
    for rid, prompt, sp in zip(ids, prompts, params, strict=True):
        sp.output_kind = RequestOutputKind.FINAL_ONLY  # as generate() sets it
        engine.add_request(rid, {"prompt_token_ids": prompt}, sp)
    yield
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        yield
    return [done[rid] for rid in ids]


def lockstep(runs: dict[str, Iterator[None]]) -> tuple[dict[str, float], dict[str, list]]:
    """Advance each run by one step in turn until all are done; each run's time is the sum
    of its own steps. The machine's speed drifts over seconds (docs/design.md#performance-
    protocol): a step takes ~0.1 s, so runs timed step by step side by side see the same
    drift, where whole runs one after another (~10 s each) do not."""
    spent = dict.fromkeys(runs, 0.0)
    outs: dict[str, list] = {}
    live = list(runs)
    while live:
        for name in list(live):
            t0 = time.perf_counter()
            try:
                next(runs[name])
            except StopIteration as stop:
                outs[name] = stop.value
                live.remove(name)
            spent[name] += time.perf_counter() - t0
    return spent, outs


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def median_ci(values: list[float], level: float = 0.95) -> list[float] | None:
    """A distribution-free confidence interval for the median: the order statistics
    x_(k) and x_(n+1-k) with k the largest such that P(Binomial(n, 1/2) < k) <= (1 - level)/2.
    Unlike the IQR (the spread of single rounds), it narrows as rounds are added, so it says
    whether a median is above a line. None below 6 values (no 95% interval exists)."""
    from scipy.stats import binom

    n = len(values)
    k = int(binom.ppf((1.0 - level) / 2.0, n, 0.5))  # P(B <= k) >= alpha/2: B < k is below
    if k < 1:
        return None
    x = sorted(values)
    return [x[k - 1], x[n - k]]


def markdown_table(result: dict) -> str:
    """One row per scenario: tok/s and the ratio to plain vLLM (IQR, and the median's 95%
    confidence interval where there are enough rounds) per batch size."""
    rows = result["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    head = " | ".join(f"batch {b}" for b in sizes)
    lines = [f"| scenario | {head} |", "|---" + "|---:" * len(sizes) + "|"]
    for s in dict.fromkeys(r["scenario"] for r in rows):
        cells = []
        for b in sizes:
            (r,) = [r for r in rows if r["scenario"] == s and r["batch_size"] == b]
            cell = f"{r['tok_per_s']:,.0f} tok/s"
            if r["ratio_vs_plain"] is not None and s != "plain":
                lo, hi = r["ratio_iqr"]
                cell += f"<br>**{r['ratio_vs_plain']:.3f}x** ({lo:.2f}-{hi:.2f})"
                if r.get("ratio_ci95"):
                    cell += " CI {:.3f}-{:.3f}".format(*r["ratio_ci95"])
            cells.append(cell)
        lines.append(f"| {DESCRIPTIONS.get(s, s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Ratio to plain vLLM against batch size, one line per scenario (HF on its own panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[2, 1])
    for s in dict.fromkeys(r["scenario"] for r in rows):
        mine = sorted((r for r in rows if r["scenario"] == s), key=lambda r: r["batch_size"])
        if s == "plain" or mine[0]["ratio_vs_plain"] is None:
            continue
        ax = right if s in HF_SCENARIOS else left
        ratios = [r["ratio_vs_plain"] for r in mine]
        lo = [r["ratio_vs_plain"] - r["ratio_iqr"][0] for r in mine]
        hi = [r["ratio_iqr"][1] - r["ratio_vs_plain"] for r in mine]
        ax.errorbar(
            [r["batch_size"] for r in mine],
            ratios,
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            label=DESCRIPTIONS.get(s, s),
        )
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size (requests)")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    left.set_ylabel("throughput / plain vLLM (median, IQR)")
    left.legend(fontsize=7, loc="lower left")
    right.set_title("HF transformers + hooks", fontsize=9)
    right.set_ylim(0, 1.1)
    title = (
        f"{result['model']}, {result['machine'].split(',')[0]}, "
        f"{result['config']['output_len']} output tokens per request"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
