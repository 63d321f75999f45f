"""Batch invariance and bit-identity of unsteered requests."""

from __future__ import annotations

import numpy as np
from conftest import generate, generate_one, prompt_ids, random_vector, sampling

V = [random_vector(20 + i).tolist() for i in range(4)]
# o_proj input vectors of the Llama test model (4 query heads x 64).
W = [(np.random.default_rng(40 + i).standard_normal(256) * 0.5).tolist() for i in range(2)]

SPECS = [
    None,
    {"vectors": [{"data": {"1": V[0]}}]},
    {"vectors": [{"data": {"1": V[1]}, "scale": 2.0, "positions": "prompt"}]},
    None,
    {"vectors": [{"data": {"2": V[2]}, "op": "ablate"}]},
    {"vectors": [{"data": {"0": V[3], "3": V[0]}, "op": "clamp", "value": 3.0}]},
    {"vectors": [{"name": "happy", "scale": 1.5, "positions": "generated"}]},
    {"vectors": [{"data": {"1": V[0]}}, {"data": {"2": V[1]}, "op": "ablate"}]},
    None,
    {"vectors": [{"name": "happy", "layers": [2], "normalize": True, "scale": 5.0}]},
    # Every request below masks or edits different heads.
    {"heads": [{"layer": 1, "heads": [0, 3]}]},
    {"heads": [{"layer": 1, "heads": [1]}, {"layer": 2, "heads": [2], "scale": 2.0}]},
    {
        "heads": [
            {"layer": 3, "heads": [0, 1, 2], "scale": 0.5, "positions": "generated"},
            {"layer": 2, "heads": [3], "target": "query", "positions": "from_last_prompt"},
        ]
    },
    None,
    {
        "vectors": [
            {
                "site": "heads",
                "data": {"1": W[0]},
                "heads": [2],
                "positions": "from_last_prompt",
                "scale": 3.0,
            }
        ]
    },
    {
        "vectors": [
            {
                "site": "heads",
                "op": "mix",
                "weight": 0.7,
                "data": {"2": W[1]},
                "positions": "last_prompt",
            }
        ],
        "heads": [{"layer": 0, "heads": [3]}],
    },
]
# Mixed lengths: the long ones are chunked (max_num_batched_tokens=64) and share steps
# with other requests' decode tokens.
LENGTHS = [9, 30, 70, 12, 5, 90, 16, 40, 8, 25, 33, 7, 50, 11, 64, 20]
PROMPTS = [prompt_ids(100 + i, n) for i, n in enumerate(LENGTHS)]


def test_mixed_batch_equals_solo(engines):
    llm = engines.get("llama")
    assert len({repr(s) for s in SPECS if s}) >= 12
    batch = generate(llm, PROMPTS, [sampling(s, max_tokens=10) for s in SPECS])
    for i, (prompt, spec) in enumerate(zip(PROMPTS, SPECS, strict=True)):
        alone = generate_one(llm, prompt, sampling(spec, max_tokens=10))
        assert batch[i].tokens == alone.tokens, f"request {i} ({spec and 'steered'}) leaked"
        assert (
            max(abs(a - b) for a, b in zip(batch[i].logprobs, alone.logprobs, strict=True)) < 1e-4
        )


def test_unsteered_bit_identical_to_disabled_extension(engines):
    steered, plain = engines.get("llama"), engines.get("llama", "disabled")
    prompts = PROMPTS[:6]
    for spec_alone in (None, {}, {"vectors": []}):
        a = generate(steered, prompts, sampling(spec_alone, max_tokens=12))
        b = generate(plain, prompts, sampling(None, max_tokens=12))
        for x, y in zip(a, b, strict=True):
            assert x.tokens == y.tokens
            assert x.logprobs == y.logprobs  # exact, not approximate


def test_unsteered_rows_bit_identical_beside_steered_ones(engines):
    steered, plain = engines.get("llama"), engines.get("llama", "disabled")
    prompts = PROMPTS[:8]
    specs = [None, SPECS[1], None, SPECS[4], None, SPECS[10], SPECS[15], None]
    a = generate(steered, prompts, [sampling(s, max_tokens=12) for s in specs])
    b = generate(plain, prompts, sampling(None, max_tokens=12))
    for i, spec in enumerate(specs):
        if spec is None:
            assert a[i].tokens == b[i].tokens and a[i].logprobs == b[i].logprobs, i
        else:
            assert a[i].logprobs != b[i].logprobs  # steered rows did change
