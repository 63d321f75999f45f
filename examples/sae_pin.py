"""Pin a demo-SAE feature and watch the answers change (offline, the demo model).

    python examples/sae_pin.py [--samples 96]

Asks the demo model "how was your day?" `--samples` times (temperature 1, one seed per
sample) unsteered and with the SAE's "positive" or "negative" feature clamped (pinned) or
turned off, and prints the share of positive / negative answers (demo.corpus.sentiment_of,
the grammar's own words) with the features' mean activation read out at layer 2.
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
from steering.sae import load_sae  # noqa: E402

SAE = ROOT / "demo" / "saes" / "demo.safetensors"


def feature_of(label: str) -> int:
    return next(f for f, name in load_sae(SAE).labels.items() if name == label)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--pin", type=float, default=3.0, help="clamp value, x typical activation")
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    from steering.engine.memory import SMALL_KV_BYTES

    sae = load_sae(SAE)
    pos, neg = feature_of("positive"), feature_of("negative")
    llm = LLM(
        str(ROOT / "demo" / "model"),
        max_model_len=512,
        kv_cache_memory_bytes=SMALL_KV_BYTES,
        enforce_eager=True,
        additional_config={
            "steerserve": {"saes_dir": str(SAE.parent), "max_features": 8, "readout": True}
        },
    )
    read = [{"sae": "demo", "feature": f} for f in (pos, neg)]

    def pin(f: int) -> dict:
        value = args.pin * float(sae.typical[f])
        return {"sae": "demo", "feature": f, "op": "clamp", "value": value}

    conditions = {
        "unsteered": [],
        f"pin 'positive' (feature {pos})": [pin(pos)],
        f"pin 'negative' (feature {neg})": [pin(neg)],
        f"'positive' off (feature {pos}, scale 0)": [
            {"sae": "demo", "feature": pos, "op": "scale", "factor": 0.0}
        ],
    }
    messages = [[{"role": "user", "content": "how was your day?"}]] * args.samples
    print("| condition | positive | negative | mean a(positive) | mean a(negative) |")
    print("|---|---:|---:|---:|---:|")
    from steering.engine.worker import readouts

    for name, features in conditions.items():
        params = [
            SamplingParams(
                temperature=1.0,
                seed=i,
                max_tokens=40,
                extra_args={"steering": {"features": features, "readout": read}},
            )
            for i in range(args.samples)
        ]
        outs = llm.chat(messages, params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        moods = [sentiment_of(t) for t in texts]
        acts = [readouts(llm, o.request_id)[0]["generated"] for o in outs]
        mean = [sum(sum(row[k] for row in a) / len(a) for a in acts) / len(acts) for k in (0, 1)]
        share = [moods.count(m) / len(moods) for m in ("positive", "negative")]
        print(f"| {name} | {share[0]:.2f} | {share[1]:.2f} | {mean[0]:.1f} | {mean[1]:.1f} |")
        print(f"<!-- {name}: {texts[0]!r} -->")


if __name__ == "__main__":
    main()
