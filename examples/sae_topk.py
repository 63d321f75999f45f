"""Read the demo SAE's most active features per token, unsteered and with a feature pinned.

    python examples/sae_topk.py [--k 3] [--prompt "how was your day?"]

Greedy answers of the demo model with a top-k readout entry ({"sae": "demo", "top_k": K})
on every generated token; prints each token with its K most active features (labels from
the SAE file, where the corpus gave one) and activations, unsteered and with the SAE's
"positive" feature pinned at its typical activation.
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

from steering.sae import load_sae  # noqa: E402

SAE = ROOT / "demo" / "saes" / "demo.safetensors"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--prompt", default="how was your day?")
    p.add_argument("--tokens", type=int, default=12)
    args = p.parse_args()
    from vllm import LLM, SamplingParams

    from steering.engine.memory import SMALL_KV_BYTES
    from steering.engine.worker import readouts

    sae = load_sae(SAE)
    positive = next(f for f, name in sae.labels.items() if name == "positive")
    llm = LLM(
        str(ROOT / "demo" / "model"),
        max_model_len=512,
        kv_cache_memory_bytes=SMALL_KV_BYTES,
        enforce_eager=True,
        additional_config={
            "steerserve": {"saes_dir": str(SAE.parent), "max_features": 8, "topk_sae": "demo"}
        },
    )
    tokenizer = llm.get_tokenizer()
    read = {"readout": [{"sae": "demo", "top_k": args.k}]}
    pin = {"sae": "demo", "feature": positive, "op": "clamp", "value": float(sae.typical[positive])}
    conditions = {"unsteered": read, "pin `positive`": {**read, "features": [pin]}}
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
    )
    for name, spec in conditions.items():
        params = SamplingParams(
            max_tokens=args.tokens, temperature=0.0, extra_args={"steering": spec}
        )
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        values = readouts(llm, out.request_id)[0]["generated"]
        print(f"\n{name}: {out.outputs[0].text!r}\n")
        # A generated token's values are those of the row that chose it (as its log-prob).
        print(f"| token | top {args.k} features where it was chosen (activation) |\n|---|---|")
        for token, (pairs,) in zip(out.outputs[0].token_ids, values, strict=True):
            shown = ", ".join(
                f"{sae.labels.get(f, f)} ({a:.1f})" if f in sae.labels else f"#{f} ({a:.1f})"
                for f, a in pairs
            )
            print(f"| `{tokenizer.decode([token])}` | {shown} |")


if __name__ == "__main__":
    main()
