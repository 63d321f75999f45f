"""Prefix cache stays on and never mixes KV computed under different interventions."""

from __future__ import annotations

import numpy as np
from conftest import BLOCK_SIZE, generate_one, prompt_ids, random_vector, sampling

V = random_vector(31).tolist()
X = {"vectors": [{"data": {"1": V}, "scale": 1.0, "positions": "prompt"}]}
Y = {"vectors": [{"data": {"1": V}, "scale": -1.0, "positions": "prompt"}]}


def _prefix_hits(llm) -> float:
    for metric in llm.get_metrics():
        if metric.name == "vllm:prefix_cache_hits":
            return float(metric.value)
    raise AssertionError("vllm:prefix_cache_hits not reported")


def _check(ref, prompt, raw, run):
    spec = ref.spec(raw) if raw else None
    want = ref.score(prompt, run.tokens, spec)
    assert np.max(np.abs(np.array(run.logprobs) - want)) <= 1e-4
    assert run.tokens == ref.greedy(prompt, len(run.tokens), spec)[0]


def test_prefix_cache_salted_by_spec(engines):
    llm, ref = engines.get("llama", "metrics"), engines.reference("llama")
    prompt = prompt_ids(7, 3 * BLOCK_SIZE + 5)

    plain = generate_one(llm, prompt, sampling(None))  # warms the unsalted cache
    _check(ref, prompt, None, plain)

    x1 = generate_one(llm, prompt, sampling(X))
    assert x1.num_cached_tokens == 0, "steered request reused unsteered KV"
    _check(ref, prompt, X, x1)

    y1 = generate_one(llm, prompt, sampling(Y))
    assert y1.num_cached_tokens == 0, "request reused KV computed under another spec"
    _check(ref, prompt, Y, y1)

    hits_before = _prefix_hits(llm)
    x2 = generate_one(llm, prompt, sampling(X))
    assert x2.num_cached_tokens >= 3 * BLOCK_SIZE, "same spec twice: the cache was not reused"
    assert _prefix_hits(llm) - hits_before >= 3 * BLOCK_SIZE
    _check(ref, prompt, X, x2)
    assert x2.tokens == x1.tokens and x2.logprobs == x1.logprobs

    plain2 = generate_one(llm, prompt, sampling(None))
    assert plain2.num_cached_tokens >= 3 * BLOCK_SIZE
    assert plain2.tokens == plain.tokens and plain2.logprobs == plain.logprobs


def test_chunked_prefill_matches_reference(engines):
    """Prompts several times longer than max_num_batched_tokens (64) are prefilled in chunks."""
    llm, ref = engines.get("llama"), engines.reference("llama")
    prompt = prompt_ids(8, 200)
    for raw in (
        {"vectors": [{"data": {"1": V}, "positions": "prompt"}]},
        {"vectors": [{"data": {"2": V}, "op": "clamp", "value": 1.0, "positions": "generated"}]},
        {"vectors": [{"data": {"0": V}, "scale": 0.5}, {"data": {"2": V}, "op": "ablate"}]},
    ):
        run = generate_one(llm, prompt, sampling(raw, max_tokens=6))
        _check(ref, prompt, raw, run)
