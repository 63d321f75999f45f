"""Batch invariance and bit-identity of unsteered requests."""

from __future__ import annotations

from conftest import generate, generate_one, prompt_ids, random_vector, sampling

V = [random_vector(20 + i).tolist() for i in range(4)]

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
]
# Mixed lengths: the long ones are chunked (max_num_batched_tokens=64) and share steps
# with other requests' decode tokens.
PROMPTS = [prompt_ids(100 + i, n) for i, n in enumerate([9, 30, 70, 12, 5, 90, 16, 40, 8, 25])]


def test_mixed_batch_equals_solo(engines):
    llm = engines.get("llama")
    assert len({repr(s) for s in SPECS if s}) >= 6
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
    prompts = PROMPTS[:6]
    specs = [None, SPECS[1], None, SPECS[4], None, SPECS[5]]
    a = generate(steered, prompts, [sampling(s, max_tokens=12) for s in specs])
    b = generate(plain, prompts, sampling(None, max_tokens=12))
    for i, spec in enumerate(specs):
        if spec is None:
            assert a[i].tokens == b[i].tokens and a[i].logprobs == b[i].logprobs, i
        else:
            assert a[i].logprobs != b[i].logprobs  # steered rows did change
