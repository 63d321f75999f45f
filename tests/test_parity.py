"""Engine vs reference oracle (HF + hooks, float32): every op and position mode, 3 archs.

Head-site cases run on GQA models whose o_proj input is wider than the residual (Llama,
Qwen3: 4 query heads x 64 over 2 KV heads, hidden 128) and on one where they are equal
(Qwen2: 2 x 64), so a confusion of the two widths cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_matches_reference,
    generate_one,
    prompt_ids,
    random_vector,
    sampling,
)

from steering.tiny_models import ARCHITECTURES

V1 = random_vector(11).tolist()
V2 = random_vector(12).tolist()


def head_vector(seed: int, width: int, norm: float = 8.0) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(width)
    return (v * (norm / np.linalg.norm(v))).tolist()


# Head-site cases depend on the model's o_proj input width: filled in per architecture.
HEAD_CASES = {
    "mask-zero": lambda w: {
        "heads": [{"layer": 1, "heads": [1], "scale": 0.0}, {"layer": 2, "heads": [0]}]
    },
    "mask-amplify-generated": lambda w: {
        "heads": [{"layer": 2, "heads": [0, 1], "scale": 2.5, "positions": "generated"}]
    },
    "mask-decode-only": lambda w: {
        "heads": [{"layer": 3, "heads": [1], "scale": 0.0, "positions": "from_last_prompt"}]
    },
    "query-uniform-decode": lambda w: {
        "heads": [
            {"layer": 2, "heads": [1], "target": "query", "positions": "from_last_prompt"},
            {"layer": 3, "heads": [0], "target": "query", "positions": "from_last_prompt"},
        ]
    },
    "query-sharpen-and-output-mask": lambda w: {
        "heads": [
            {"layer": 1, "heads": [0, 1], "scale": 4.0, "target": "query"},
            {"layer": 1, "heads": [1], "scale": 0.0},
            {"layer": 0, "heads": [1], "scale": 0.5, "target": "query", "positions": "prompt"},
        ]
    },
    "iti-add-restricted": lambda w: {
        "vectors": [
            {
                "site": "heads",
                "data": {"1": head_vector(1, w), "2": head_vector(2, w)},
                "heads": [1],
                "scale": 1.5,
                "positions": "from_last_prompt",
            }
        ]
    },
    "iti-add-normalized": lambda w: {
        "vectors": [
            {"site": "heads", "data": {"0": head_vector(3, w)}, "normalize": True, "scale": 6.0}
        ]
    },
    "mix-all": lambda w: {
        "vectors": [
            {
                "site": "heads",
                "op": "mix",
                "weight": 0.6,
                "heads": [0],
                "data": {"2": head_vector(4, w)},
            }
        ]
    },
    "mix-last-prompt": lambda w: {
        "vectors": [
            {
                "site": "heads",
                "op": "mix",
                "weight": 0.8,
                "positions": "last_prompt",
                "data": {"1": head_vector(5, w), "3": head_vector(6, w)},
            }
        ]
    },
    "heads-and-residual": lambda w: {
        "heads": [
            {"layer": 1, "heads": [0], "scale": 0.0},
            {"layer": 2, "heads": [1], "scale": 1.8, "positions": "prompt"},
        ],
        "vectors": [
            {"data": {"1": V1}, "scale": 0.7},
            {"site": "heads", "data": {"1": head_vector(7, w)}, "heads": [0]},
            {"site": "heads", "op": "mix", "weight": 0.4, "data": {"2": head_vector(8, w)}},
            {"data": {"2": V2}, "op": "ablate", "positions": "generated"},
        ],
    },
}

CASES = {
    "add-all": {"vectors": [{"data": {"1": V1}, "scale": 1.0}]},
    "add-prompt": {"vectors": [{"data": {"1": V1}, "positions": "prompt"}]},
    "add-generated": {"vectors": [{"data": {"2": V1}, "positions": "generated"}]},
    "add-normalize-two-layers": {
        "vectors": [{"data": {"0": V1, "2": V2}, "normalize": True, "scale": 6.0}]
    },
    "ablate-all": {"vectors": [{"data": {"1": V1, "2": V1}, "op": "ablate"}]},
    "ablate-half-prompt": {
        "vectors": [{"data": {"1": V2}, "op": "ablate", "scale": 0.5, "positions": "prompt"}]
    },
    "clamp-generated": {
        "vectors": [{"data": {"1": V2}, "op": "clamp", "value": 6.0, "positions": "generated"}]
    },
    "clamp-last-layer": {"vectors": [{"data": {"3": V2}, "op": "clamp", "value": -4.0}]},
    "add-last-prompt": {"vectors": [{"data": {"2": V1}, "scale": 2.0, "positions": "last_prompt"}]},
    "clamp-from-last-prompt": {
        "vectors": [
            {"data": {"1": V2}, "op": "clamp", "value": 5.0, "positions": "from_last_prompt"}
        ]
    },
    # Order matters here: add then clamp along the same direction, then further ops.
    "ordered-mix": {
        "vectors": [
            {"data": {"1": V1}, "scale": 0.5},
            {"data": {"1": V1, "2": V1}, "op": "clamp", "value": 2.0},
            {"data": {"1": V2, "2": V2}, "positions": "generated"},
            {"data": {"2": V2}, "op": "ablate", "positions": "prompt"},
        ]
    },
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("case", sorted(CASES) + sorted(HEAD_CASES))
def test_parity_with_reference(engines, arch, case):
    llm, ref = engines.get(arch), engines.reference(arch)
    prompt = prompt_ids(seed=sum(map(ord, case)) % 1000, length=12)
    raw = CASES[case] if case in CASES else HEAD_CASES[case](ref.shape.width("heads"))
    spec = ref.spec(raw)

    run = generate_one(llm, prompt, sampling(raw, max_tokens=8, prompt_logprobs=True))
    plain = generate_one(llm, prompt, sampling(None, max_tokens=8, prompt_logprobs=True))

    # Greedy continuation (the same tokens and log-probs) and every prompt row's log-prob.
    assert_matches_reference(run, ref, prompt, spec, f"{arch}/{case}")
    # Teacher-forced on the engine's tokens (robust even if a near-tie were to flip).
    assert_close(run.logprobs, ref.score(prompt, run.tokens, spec), f"{arch}/{case} scored")

    # The intervention did something (so these comparisons can fail).
    changed = np.abs(np.array(run.logprobs) - np.array(plain.logprobs)).max()
    assert run.tokens != plain.tokens or changed > 1e-3, f"{case} had no effect"
    entries = raw.get("vectors", []) + raw.get("heads", [])
    if len(entries) == 1 and entries[0].get("positions") in ("generated", "last_prompt"):
        # Steering the last prompt row or later leaves every other prompt row untouched
        # (the last one's log-prob is not among the prompt log-probs).
        assert run.prompt_logprobs == plain.prompt_logprobs
