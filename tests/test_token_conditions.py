"""Token-level conditions (reduce "token"): each token's own row at the condition's layer
gates that token's steering at later layers, against the reference oracle.

Thresholds are the median of the reference's values over the rows, so that some tokens
fire and some do not (asserted), and the engine must agree on every row's gate: the
log-probs, and the reported value and decision at each generated token's sampling row.
They run on the `features` engines (conftest.FEATURES: max_dynamic 2, max_conditions 2).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate, prompt_ids, sampling
from test_conditions import (
    C1,
    C2,
    TOL,
    B,
    _run,
    _spec,
    _with_threshold,
    assert_each_as_alone,
)

PROBES = {
    "cosine": {"name": "tok", "data": C1, "layer": 1, "reduce": "token"},
    "projection-below": {
        "name": "tok",
        "data": C2,
        "layer": 0,
        "reduce": "token",
        "measure": "projection",
        "op": "<",
    },
    "feature": {"name": "tok", "sae": "gs_layer_2", "feature": 1, "reduce": "token", "op": ">="},
}


def _after(layer: int) -> dict:
    """The behaviour vector at every layer after `layer` (of the model's 4)."""
    return {str(i): B for i in range(layer + 1, 4)}


def _gated(when: str, positions: str = "all", data: dict | None = None, **extra) -> dict:
    data = data or _after(1)
    return {"data": data, "scale": 0.7, "positions": positions, "when": when} | extra


def _median_threshold(engines, prompt, cond, max_tokens=8, sampled_only=False):
    """`cond` with its threshold at the median of its values over the prompt and the
    unsteered continuation, or over the rows that sample it (the values at a layer do not
    depend on later layers' steering, only on the tokens chosen)."""
    ref = engines.reference("llama")
    probe = _spec(engines, {"conditions": [cond | {"threshold": 0.0}]})
    tokens, _ = ref.greedy(prompt, max_tokens, None)
    values = ref.token_conditions(prompt + tokens, len(prompt), probe)[cond["name"]]
    if sampled_only:
        values = values[len(prompt) - 1 :]
    positive = values[values > 0] if "sae" in cond else values  # a feature is 0 where off
    return cond | {"threshold": float(np.median(positive))}


def _expected_report(engines, prompt, tokens, raw):
    """The reference's value and decision at each generated token's sampling row."""
    ref = engines.reference("llama")
    spec = _spec(engines, raw)
    values = ref.token_conditions(prompt + tokens, len(prompt), spec)
    out = {}
    for c in spec.conditions:
        if c.per_token:
            rows = values[c.name][len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
            out[c.name] = (rows, [bool(c.met(v)) for v in rows])
    return out


def _check_report(report, want):
    got = {r["name"]: r for r in report}
    for name, (values, fired) in want.items():
        r = got[name]
        assert r["reduce"] == "token"
        np.testing.assert_allclose(r["values"], values, atol=TOL)
        assert r["fired"] == fired
        assert r["fired_rate"] == pytest.approx(sum(fired) / len(fired))


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
@pytest.mark.parametrize("probe", sorted(PROBES))
def test_token_gates_equal_the_reference(engines, variant, probe):
    llm, ref = engines.get("llama", variant), engines.reference("llama")
    prompt = prompt_ids(seed=sum(map(ord, probe)) % 997, length=24)
    cond = _median_threshold(engines, prompt, PROBES[probe])
    layer = 2 if probe == "feature" else cond["layer"]  # gs_layer_2 reads layer 2
    raw = {"conditions": [cond], "vectors": [_gated("tok", data=_after(layer))]}
    spec = _spec(engines, raw)
    (tokens, lps, report), (plain_tokens, plain_lps, _) = _run(llm, [prompt, prompt], [raw, None])
    ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
    assert tokens == ref_tokens
    np.testing.assert_allclose(lps, ref_lps, atol=TOL)
    want = _expected_report(engines, prompt, tokens, raw)
    _check_report(report, want)
    # Both ways on the prompt's rows, so the gate really is per token.
    prompt_values = ref.token_conditions(prompt, len(prompt), spec)["tok"][:-1]
    prompt_fired = [bool(spec.conditions[0].met(v)) for v in prompt_values]
    assert any(prompt_fired) and not all(prompt_fired), prompt_fired
    assert tokens != plain_tokens or np.abs(np.subtract(lps, plain_lps)).max() > 1e-3


def test_token_and_request_conditions_compose(engines):
    """`topic and tok` / `not tok`: a request-level and a token-level condition in one
    expression (generated tokens), and a token-only gate on every row, beside each other."""
    llm, ref = engines.get("llama", "features"), engines.reference("llama")
    prompt = prompt_ids(seed=71, length=30)
    tok = _median_threshold(engines, prompt, PROBES["cosine"], sampled_only=True)
    topic = {"name": "topic", "data": C2, "layer": 2, "measure": "projection"}
    vectors = [
        _gated("topic and tok", positions="generated"),
        _gated("not tok", data={"2": B, "3": B}, scale=-0.5),
    ]
    # The prompt's rows at layer 2 include the `not tok` add: decide topic with it.
    probe = _spec(engines, {"conditions": [topic | {"threshold": 0.0}, tok], "vectors": vectors})
    value = ref.conditions(prompt, probe)["topic"][0]
    raws = [
        {"conditions": [_with_threshold(topic, value, fire), tok], "vectors": vectors}
        for fire in (True, False)
    ]
    runs = _run(llm, [prompt, prompt], raws)
    for raw, (tokens, lps, report) in zip(raws, runs, strict=True):
        spec = _spec(engines, raw)
        ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=TOL)
        assert report[0]["fired"] == ref.conditions(prompt, spec)["topic"][1] == (raw is raws[0])
        _check_report(report, _expected_report(engines, prompt, tokens, raw))
    assert runs[0][0] != runs[1][0] or runs[0][1] != runs[1][1]


def test_chunked_prompt_and_batch_invariance(engines):
    """A 150-token prompt gated per token on every row across three prefill chunks, beside
    plain, unconditional, request-conditional and other token-conditional requests: each
    equals the reference and what it gets alone."""
    llm, ref = engines.get("llama", "features"), engines.reference("llama")
    rng = np.random.default_rng(9)
    prompts = [[int(x) for x in rng.integers(10, 480, n)] for n in (150, 12, 40, 17, 70)]
    tok = _median_threshold(engines, prompts[0], PROBES["cosine"], max_tokens=6)
    feat = _median_threshold(engines, prompts[4], PROBES["feature"], max_tokens=6)
    topic = {"name": "topic", "data": C1, "layer": 1, "threshold": -1.0}
    raws = [
        {"conditions": [tok], "vectors": [_gated("tok")]},
        None,
        {"conditions": [topic], "vectors": [_gated("topic", positions="generated")]},
        {"vectors": [{"data": {"1": B}, "scale": 0.5}]},
        {
            "conditions": [feat, topic],
            "vectors": [_gated("tok and topic", positions="generated", data=_after(2))],
        },
    ]
    together = _run(llm, prompts, raws, max_tokens=6)
    for i in (0, 2, 4):
        spec = _spec(engines, raws[i])
        tokens, lps = ref.greedy(prompts[i], 6, spec)
        assert together[i][0] == tokens, f"request {i}"
        np.testing.assert_allclose(together[i][1], lps, atol=TOL)
    _check_report(together[0][2], _expected_report(engines, prompts[0], together[0][0], raws[0]))
    assert_each_as_alone(llm, prompts, raws, together, max_tokens=6)


def test_prefix_cache_serves_token_conditions(engines):
    """A token-level gate depends on the row alone, so a cached prompt row's gate is what
    it would be again: the second request hits the prefix cache and gets the same output."""
    llm = engines.get("llama", "features")
    prompt = prompt_ids(seed=80, length=100)
    raw = {
        "conditions": [_median_threshold(engines, prompt, PROBES["cosine"], max_tokens=4)],
        "vectors": [_gated("tok")],
    }
    first = generate(llm, [prompt], sampling(raw, max_tokens=4))[0]
    second = generate(llm, [prompt], sampling(raw, max_tokens=4))[0]
    assert second.num_cached_tokens > 0
    assert first.tokens == second.tokens
    np.testing.assert_allclose(first.logprobs, second.logprobs, atol=1e-6)


def test_preemption_keeps_token_reports(engines):
    """Four 100-token requests generating 100 tokens on a 320-token KV cache: preempted
    and recomputed ones still equal the reference, with one report value per token."""
    llm, ref = engines.get("llama", "features-tight"), engines.reference("llama")
    prompts = [prompt_ids(seed=90 + i, length=100) for i in range(4)]
    raws = [
        {
            "conditions": [_median_threshold(engines, p, PROBES["cosine"], max_tokens=20)],
            "vectors": [_gated("tok")],
        }
        for p in prompts
    ]
    before = llm.collective_rpc("steerserve_stats")[0]["recomputed_condition_rows"]
    runs = _run(llm, prompts, raws, max_tokens=100)
    after = llm.collective_rpc("steerserve_stats")[0]["recomputed_condition_rows"]
    assert after > before, "no request was preempted: the KV cache is not tight enough"
    for prompt, raw, (tokens, lps, report) in zip(prompts, raws, runs, strict=True):
        spec = _spec(engines, raw)
        ref_tokens, ref_lps = ref.greedy(prompt, 100, spec)
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=TOL)
        assert len(report[0]["values"]) == 100
        _check_report(report, _expected_report(engines, prompt, tokens, raw))
