"""Steer sentiment only when the question is about food (CAST on the demo model, offline).

    python examples/conditional_food.py [--samples 64] [--scale 1.5]

A condition `food` compares the prompt's mean residual stream at layer 0 with the shipped
`food` vector (CAST's cosine, docs/spec.md#conditions); the `positive` vector is added to
generated tokens only `when: "food"`. The threshold is calibrated first on other questions
(the midpoint of the two groups' mean values, read back from the engine's condition
reports; the op points at the food side). Then food and non-food questions are answered
unsteered, always steered and conditionally steered (temperature 1, one seed per sample),
and the table gives the share of positive answers (demo.corpus.sentiment_of) and how often
the condition fired.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

from demo.corpus import sentiment_of  # noqa: E402
from demo.tasks import questions  # noqa: E402

# Layer 0's prompt mean separates the groups best on the demo model (try --layer/--reduce).
LAYER = 0


def split(n: int, seed: int) -> tuple[list[str], list[str]]:
    """`n` questions naming a food noun and `n` naming another topic's."""
    food, other = [], []
    for q in questions(40 * n, seed, kind="named"):
        (food if q.topic == "food" else other).append(q.text)
    return food[:n], other[:n]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=64, help="questions per group")
    p.add_argument("--scale", type=float, default=1.5, help="strength of 'positive'")
    p.add_argument("--layer", type=int, default=LAYER, help="the condition's layer")
    p.add_argument("--reduce", default="prompt_mean", choices=("prompt_mean", "last_prompt"))
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    from steering.engine.memory import SMALL_KV_BYTES
    from steering.engine.worker import conditions

    llm = LLM(
        str(ROOT / "demo" / "model"),
        max_model_len=512,
        kv_cache_memory_bytes=SMALL_KV_BYTES,
        enforce_eager=True,
        additional_config={
            "steerserve": {
                "vectors_dir": str(ROOT / "vectors"),
                "max_dynamic": 2,
                "max_conditions": 2,
            }
        },
    )

    def condition(threshold: float, op: str = ">") -> dict:
        return {
            "name": "food",
            "vector": "food",
            "layer": args.layer,
            "reduce": args.reduce,
            "op": op,
            "threshold": threshold,
        }

    def run(texts: list[str], spec: dict | None) -> tuple[list[str], list[dict]]:
        params = [
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=40,
                extra_args={"steering": spec} if spec else None,
            )
            for i in range(len(texts))
        ]
        outs = llm.chat([[{"role": "user", "content": t}] for t in texts], params, use_tqdm=False)
        reports = [(conditions(llm, o.request_id) or {}).get(0) for o in outs]
        return [o.outputs[0].text for o in outs], reports

    # Calibration on other questions: the condition's value on each, then the midpoint.
    cal_food, cal_other = split(args.samples, seed=1)
    probe = {"conditions": [condition(0.0)]}
    means = []
    for group in (cal_food, cal_other):
        _, reports = run(group, probe)
        values = [r[0]["value"] for r in reports]
        means.append(sum(values) / len(values))
    threshold = (means[0] + means[1]) / 2
    op = ">" if means[0] > means[1] else "<"
    print(
        f"calibration: mean cosine {means[0]:.4f} on food questions, {means[1]:.4f} on "
        f"others; condition: cosine {op} {threshold:.4f}\n"
    )

    positive = {"name": "positive", "scale": args.scale, "positions": "generated"}
    specs = {
        "unsteered": None,
        f"`positive` x{args.scale} always": {"vectors": [positive]},
        f"`positive` x{args.scale} when food": {
            "conditions": [condition(threshold, op)],
            "vectors": [positive | {"when": "food"}],
        },
    }
    food, other = split(args.samples, seed=2)
    print("| questions | steering | positive answers | condition fired |")
    print("|---|---|---:|---:|")
    for group_name, group in (("about food", food), ("about another topic", other)):
        for name, spec in specs.items():
            texts, reports = run(group, spec)
            share = sum(sentiment_of(t) == "positive" for t in texts) / len(texts)
            fired = (
                f"{sum(r[0]['fired'] for r in reports) / len(reports):.2f}"
                if spec and "conditions" in spec
                else "-"
            )
            print(f"| {group_name} ({len(group)}) | {name} | {share:.2f} | {fired} |")


if __name__ == "__main__":
    main()
