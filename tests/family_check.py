"""One family, checked end to end: a tiny random model of it, a steered and a plain vLLM engine,
and the reference oracle. Run in a process of its own (tests/test_families.py), so that each
family's two engines are freed when it ends:

    python tests/family_check.py gemma2 --out result.json [--compiled]

For each intervention kind, the max |engine - reference| log-prob over the greedy tokens
(teacher-forced by the reference on the engine's tokens) and, for steering kinds, over the
prompt rows; the tokens must agree as well. Then batch invariance (every spec in one batch,
beside an unsteered request, equals each alone) and bit identity of an unsteered request
with the plain engine. `python tests/family_check.py --table results/` prints README's table.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from steering.tiny_models import build_tiny_model, tiny_spec  # noqa: E402

KINDS = (
    "add",
    "ablate",
    "clamp",
    "head_mask",
    "query_mask",
    "head_vector",
    "fuse",
    "contrast",
    "readout",
    "experts",
    "experts_vectors",
)
MAX_TOKENS = 6
PROMPT = np.random.default_rng(7).integers(10, 500, size=20).tolist()


def _vec(seed: int, width: int, norm: float = 8.0) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(width)
    return (v * (norm / np.linalg.norm(v))).tolist()


def specs(shape) -> dict[str, dict]:
    """One spec per kind; head kinds use the model's attention layers (hybrids lack some)."""
    h, w = shape.hidden_size, shape.width("heads")
    attn = shape.head_layers
    a1, a2 = attn[min(1, len(attn) - 1)], attn[-1]
    moe = shape.moe_layers
    experts = {}
    if moe:
        m0, m1 = moe[0], moe[-1]
        masks = [
            {"layer": m0, "experts": [0], "scale": 0.0},
            {"layer": m1, "experts": [1, 2], "scale": 3.0, "positions": "generated"},
            {"layer": m1, "experts": [3], "scale": 0.25},
        ]
        experts = {
            "experts": {"experts": masks},
            # Router steering composed with vectors and a head mask (no peer composes them).
            "experts_vectors": {
                "experts": masks[:1],
                "vectors": [{"data": {"1": _vec(8, h)}}],
                "heads": [{"layer": a1, "heads": [0], "scale": 0.0}],
            },
        }
    return {
        **experts,
        "add": {"vectors": [{"data": {"1": _vec(1, h)}, "scale": 1.0}]},
        "ablate": {"vectors": [{"data": {"1": _vec(2, h), "2": _vec(2, h)}, "op": "ablate"}]},
        "clamp": {
            "vectors": [
                {"data": {"2": _vec(3, h)}, "op": "clamp", "value": 6.0, "positions": "generated"}
            ]
        },
        "head_mask": {
            "heads": [
                {"layer": a1, "heads": [1], "scale": 0.0},
                {"layer": a2, "heads": [0], "scale": 2.5},
            ]
        },
        "query_mask": {
            "heads": [
                {"layer": a1, "heads": [0, 1], "scale": 4.0, "target": "query"},
                {
                    "layer": a2,
                    "heads": [1],
                    "scale": 0.0,
                    "target": "query",
                    "positions": "from_last_prompt",
                },
            ]
        },
        "head_vector": {
            "vectors": [
                {"site": "heads", "data": {str(a1): _vec(4, w)}, "heads": [1], "scale": 1.5}
            ]
        },
        "fuse": {"decoding": {"mode": "fuse", "layer": "auto", "weight": 0.6}},
        "contrast": {"decoding": {"mode": "contrast", "layers": "high"}},
        "readout": {
            "vectors": [{"data": {"1": _vec(5, h)}, "scale": 2.0}],
            "readout": [
                {"data": _vec(6, h), "layer": 1, "prompt": True},
                {"data": _vec(7, h), "layer": shape.num_layers - 1},
            ],
        },
    }


def _sampling(raw, prompt_logprobs: bool):
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        ignore_eos=True,
        logprobs=1,
        prompt_logprobs=1 if prompt_logprobs else None,
        extra_args={"steering": raw} if raw is not None else None,
    )


def _run(llm, raws: list, prompt_logprobs: list[bool]):
    outs = llm.generate(
        [{"prompt_token_ids": PROMPT}] * len(raws),
        [_sampling(r, p) for r, p in zip(raws, prompt_logprobs, strict=True)],
        use_tqdm=False,
    )
    runs = []
    for out in outs:
        c = out.outputs[0]
        tokens = list(c.token_ids)
        lps = [float(d[t].logprob) for d, t in zip(c.logprobs, tokens, strict=True)]
        prompt_lps = None
        if out.prompt_logprobs is not None:
            prompt_lps = [
                float(d[t].logprob)
                for d, t in zip(out.prompt_logprobs[1:], PROMPT[1:], strict=True)
            ]
        runs.append({"id": out.request_id, "tokens": tokens, "lps": lps, "prompt": prompt_lps})
    return runs


def _score_plain(llm, tokens: list[int]) -> list[float]:
    """The engine's unsteered log-probs of `tokens` after PROMPT (its prompt log-probs)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    [out] = llm.generate([{"prompt_token_ids": PROMPT + tokens}], params, use_tqdm=False)
    rows = out.prompt_logprobs[len(PROMPT) :]
    return [float(d[t].logprob) for d, t in zip(rows, tokens, strict=True)]


def _max_err(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want))))


def _engine(path: Path, compiled: bool, steered: bool):
    from vllm import LLM

    # allow_unverified: a family under study can be checked before it is on the list.
    mine = {"decoding": True, "readout": True, "allow_unverified": True}
    extra = {"steerserve": mine if steered else {"enabled": False}}
    return LLM(
        str(path),
        dtype="float32",
        kv_cache_memory_bytes=48 << 20,
        max_model_len=512,
        max_num_seqs=16,
        max_num_batched_tokens=64,
        block_size=32,
        seed=0,
        enforce_eager=not compiled,
        additional_config=extra,
    )


def check(family: str, model_dir: Path, compiled: bool = False) -> dict:
    from steering.engine.worker import readouts
    from steering.reference import ReferenceModel

    path = build_tiny_model(model_dir, tiny_spec(family))
    ref = ReferenceModel(path)
    result: dict = {
        "family": family,
        "architecture": ref.shape.architecture,
        "errors": {},
        "tokens_match": {},
        "effect_errors": {},
        "effects": {},
        "compiled": compiled,
    }
    raws = specs(ref.shape)
    kinds = [k for k in KINDS if k in raws]
    llm = _engine(path, compiled, steered=True)
    solo = {}
    for kind in kinds:
        raw = raws[kind]
        wants_prompt = "decoding" not in raw  # vLLM's prompt log-probs are pre-decoding
        [run] = _run(llm, [raw], [wants_prompt])
        solo[kind] = run
        spec = ref.spec(raw, max_readouts=4)
        scored = ref.score(PROMPT, run["tokens"], spec)
        ref_tokens, _ = ref.greedy(PROMPT, MAX_TOKENS, spec)
        errs = [_max_err(run["lps"], scored)]
        if wants_prompt:
            lp = ref.logprobs(PROMPT, len(PROMPT), spec)
            errs.append(
                _max_err(
                    run["prompt"], [float(lp[i, PROMPT[i + 1]]) for i in range(len(PROMPT) - 1)]
                )
            )
        if kind == "readout":
            got = readouts(llm, run["id"])[0]
            rows = ref.readout(PROMPT + run["tokens"][:-1], len(PROMPT), spec)
            p = len(PROMPT)
            errs.append(_max_err(got["generated"], rows[p - 1 : p - 1 + MAX_TOKENS]))
            errs.append(_max_err(np.asarray(got["prompt"])[:, 0], rows[:p, 0]))
        result["errors"][kind] = max(errs)
        result["tokens_match"][kind] = run["tokens"] == ref_tokens
        # The steering effect alone, (steered - unsteered) in the engine against the same in
        # the reference, on the same tokens: it cancels where vLLM's model itself differs
        # from HF's (GPT-OSS on CPU), so a steering error still shows.
        engine_plain = _score_plain(llm, run["tokens"])
        ref_plain = ref.score(PROMPT, run["tokens"], None)
        # That it did something (so the comparisons above can fail).
        result["effects"][kind] = _max_err(run["lps"], engine_plain)
        result["effect_errors"][kind] = _max_err(
            np.subtract(run["lps"], engine_plain), np.subtract(scored, ref_plain)
        )
    # Every spec in one batch beside an unsteered request: each row as it was alone.
    batch = _run(llm, [raws[k] for k in kinds] + [None], [False] * (len(kinds) + 1))
    result["not_invariant"] = [
        k
        for k, b in zip(kinds, batch, strict=False)
        if (b["tokens"], b["lps"]) != (solo[k]["tokens"], solo[k]["lps"])
    ]
    result["invariant"] = not result["not_invariant"]
    result["invariance_max_diff"] = max(
        _max_err(b["lps"], solo[k]["lps"]) if b["tokens"] == solo[k]["tokens"] else np.inf
        for k, b in zip(kinds, batch, strict=False)
    )
    [unsteered] = _run(llm, [None], [True])
    lp = ref.logprobs(PROMPT, len(PROMPT), None)
    result["unsteered_error"] = max(
        _max_err(unsteered["lps"], ref.score(PROMPT, unsteered["tokens"], None)),
        _max_err(unsteered["prompt"], [float(lp[i, t]) for i, t in enumerate(PROMPT[1:])]),
    )
    plain_llm = _engine(path, compiled, steered=False)
    [plain] = _run(plain_llm, [None], [True])
    strip = ("tokens", "lps", "prompt")
    result["bit_identical"] = all(unsteered[k] == plain[k] for k in strip) and all(
        batch[-1][k] == plain[k] for k in ("tokens", "lps")
    )
    return result


def table(results: list[dict]) -> str:
    """README's family x kind table: max |Δ log-prob| per cell, bit identity per family."""
    head = "| family | " + " | ".join(KINDS) + " | batch-invariant | unsteered = plain |"
    rows = [head, "|" + "---|" * (len(KINDS) + 3)]
    for r in results:
        if "errors" not in r:
            rows.append(
                f"| {r['family']} | "
                + " | ".join("—" for _ in KINDS)
                + f" | — | — ({r['skipped']}) |"
            )
            continue
        cells = [
            "—"
            if k not in r["errors"]
            else f"{r['errors'][k]:.1e}" + ("" if r["tokens_match"][k] else " (tokens differ)")
            for k in KINDS
        ]
        invariant = (
            "yes"
            if r["invariant"]
            else f"within {r['invariance_max_diff']:.0e} (plain vLLM varies too)"
        )
        rows.append(
            f"| {r['family']} | "
            + " | ".join(cells)
            + f" | {invariant}"
            + f" | {'bit-identical' if r['bit_identical'] else 'NO'} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", nargs="?")
    p.add_argument("--out", type=Path)
    p.add_argument("--compiled", action="store_true", help="torch.compile'd engines")
    p.add_argument("--table", type=Path, help="print the table of the results in this folder")
    args = p.parse_args(argv)
    if args.table is not None:
        from steering.tiny_models import ARCHITECTURES, FAMILIES

        paths = [args.table / f"{f}.json" for f in ARCHITECTURES + FAMILIES]
        found = [json.loads(p.read_text()) for p in paths if p.exists()]
        print(table(found))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = check(args.family, Path(tmp) / args.family, args.compiled)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
