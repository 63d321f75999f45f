"""Request-level conditions (CAST) gating dynamic adds, against the reference oracle.

Thresholds are set from the reference's own value for each prompt (just below or above
it), so every case is decided one way on purpose, and the engine must agree: the gate, the
log-probs and the reported value. They run on the `features` engines
(conftest.FEATURES: max_dynamic 2, max_conditions 2).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate, prompt_ids, random_vector, sampling

from steering.compile import compile_spec
from steering.engine.frontend import SteeringValidationError
from steering.engine.worker import conditions as worker_conditions
from steering.sae import SaeRegistry
from steering.spec import SpecError, gate_truth

TOL = 1e-4
C1 = random_vector(31).tolist()
C2 = random_vector(32).tolist()
B = random_vector(33, norm=10.0).tolist()
A = random_vector(34).tolist()


def _spec(engines, raw, **kw):
    ctx = dict(saes=SaeRegistry(engines.saes_dir), max_features=3, max_dynamic=2)
    return engines.reference("llama").spec(raw, **(ctx | {"max_conditions": 2} | kw))


def _behaviour(when: str, **extra) -> dict:
    return {"data": {"1": B, "2": B}, "scale": 0.6, "positions": "generated", "when": when} | extra


def _run(llm, prompts, raws, max_tokens=8):
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [sampling(r, max_tokens=max_tokens) for r in raws],
        use_tqdm=False,
    )
    runs = []
    for o in outs:
        c = o.outputs[0]
        lps = [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)]
        runs.append((list(c.token_ids), lps, (worker_conditions(llm, o.request_id) or {}).get(0)))
    return runs


def _with_threshold(cond: dict, value: float, fire: bool) -> dict:
    """`cond` with its threshold set so that it fires (or not) on this value."""
    op = cond.get("op", ">")
    above = op in (">", ">=")
    margin = 0.05 * max(abs(value), 1e-3)
    threshold = value - margin if above == fire else value + margin
    return cond | {"threshold": threshold}


CONDITIONS = {
    "cosine-mean": {"name": "topic", "data": C1, "layer": 1},
    "cosine-last-below": {
        "name": "topic",
        "data": C1,
        "layer": 2,
        "reduce": "last_prompt",
        "op": "<",
    },
    "projection-mean": {"name": "topic", "data": C2, "layer": 0, "measure": "projection"},
    "feature": {"name": "topic", "sae": "gs_layer_2", "feature": 1, "op": ">="},  # JumpReLU
}


def _decide(engines, prompt, cond):
    probe = _spec(engines, {"conditions": [cond | {"threshold": 0.0}]})
    return engines.reference("llama").conditions(prompt, probe)[cond["name"]][0]


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
@pytest.mark.parametrize("fire", [True, False], ids=["fires", "holds-off"])
@pytest.mark.parametrize("case", sorted(CONDITIONS))
def test_condition_gates_equal_the_reference(engines, variant, case, fire):
    llm, ref = engines.get("llama", variant), engines.reference("llama")
    prompt = prompt_ids(seed=sum(map(ord, case)) % 997, length=20)
    cond = CONDITIONS[case]
    value = _decide(engines, prompt, cond)
    if case == "feature" and value == 0.0:
        pytest.fail("the feature does not fire on this prompt: pick another")
    raw = {"conditions": [_with_threshold(cond, value, fire)], "vectors": [_behaviour("topic")]}
    spec = _spec(engines, raw)
    decided = ref.conditions(prompt, spec)["topic"]
    assert decided[1] == fire
    (tokens, lps, report), (plain_tokens, plain_lps, _) = _run(llm, [prompt, prompt], [raw, None])
    ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
    assert tokens == ref_tokens
    np.testing.assert_allclose(lps, ref_lps, atol=TOL)
    assert report == [
        {
            "name": "topic",
            "value": pytest.approx(decided[0], abs=TOL),
            "fired": fire,
            "decided": True,
        }
    ]
    # Holding off is exactly unsteered; firing steers.
    if fire:
        assert tokens != plain_tokens or np.abs(np.subtract(lps, plain_lps)).max() > 1e-3
    else:
        assert tokens == plain_tokens and lps == plain_lps


def test_composed_conditions_and_schedules(engines):
    """Two conditions, `and` / `or` / `not` over them, one gate with a schedule; every
    combination against the reference."""
    llm, ref = engines.get("llama", "features"), engines.reference("llama")
    prompt = prompt_ids(seed=40, length=30)
    a = {"name": "a", "data": C1, "layer": 1}
    b = {"name": "b", "data": C2, "layer": 2, "reduce": "last_prompt", "measure": "projection"}
    va, vb = _decide(engines, prompt, a), _decide(engines, prompt, b)
    raws = []
    for fire_a, fire_b in ((True, True), (True, False), (False, True), (False, False)):
        conds = [_with_threshold(a, va, fire_a), _with_threshold(b, vb, fire_b)]
        vectors = [
            _behaviour("a and not b"),
            _behaviour(
                "(a or b)", scale=-0.8, schedule={"kind": "linear", "steps": 4}, data={"3": C2}
            ),
        ]
        raws.append({"conditions": conds, "vectors": vectors})
    runs = _run(llm, [prompt] * 4, raws)
    for raw, (tokens, lps, report) in zip(raws, runs, strict=True):
        spec = _spec(engines, raw)
        want = ref.conditions(prompt, spec)
        ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=TOL)
        assert [r["fired"] for r in report] == [want["a"][1], want["b"][1]]
    assert len({tuple(r[0]) for r in runs}) > 1  # the combinations steer differently


@pytest.mark.parametrize("variant", ["conditions", "features"])
def test_gated_adds_fold_into_the_constants(engines, variant):
    """A gate's constant adds fold into a second constant (open), pushed through a later
    ablation and into a feature clamp's offset at the same layer; on an engine without
    dynamic adds ("conditions") and beside a second expression's add, which is a dynamic
    one ("features"). Every combination of conditions against the reference, in one batch."""
    llm, ref = engines.get("llama", variant), engines.reference("llama")
    prompt = prompt_ids(seed=41, length=24)
    a = {"name": "a", "data": C1, "layer": 1}
    b = {"name": "b", "data": C2, "layer": 2, "reduce": "last_prompt", "measure": "projection"}
    va, vb = _decide(engines, prompt, a), _decide(engines, prompt, b)
    vectors = [
        _behaviour("a and not b"),
        {"data": {"2": A}, "op": "ablate", "positions": "generated"},  # the prompt as read
        _behaviour("a and not b", data={"1": C2}, scale=0.4),
    ]
    if variant == "features":
        vectors.append(_behaviour("b", data={"3": C1}, scale=-0.7))
    clamp = {"sae": "gs_layer_2", "feature": 1, "op": "clamp", "value": 3.0}
    raws = [
        {
            "conditions": [_with_threshold(a, va, fire_a), _with_threshold(b, vb, fire_b)],
            "vectors": vectors,
            "features": [clamp | {"positions": "generated"}],
        }
        for fire_a in (True, False)
        for fire_b in (True, False)
    ]
    dynamic = 0 if variant == "conditions" else 2
    compiled = compile_spec(_spec(engines, raws[0], max_dynamic=dynamic), ref.shape)
    assert compiled.combos == 2 and compiled.gate.tolist() == [0, 1, 0, 0]
    assert compiled.dynamic.count == (variant == "features")
    runs = _run(llm, [prompt] * len(raws), raws)
    for raw, (tokens, lps, report) in zip(raws, runs, strict=True):
        spec = _spec(engines, raw, max_dynamic=dynamic)
        want = ref.conditions(prompt, spec)
        ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=TOL)
        assert [r["fired"] for r in report] == [want["a"][1], want["b"][1]]
    # Each state of the gates steers its own way: "a and not b" open or closed (2), and
    # with "b" too: (closed, open), (open, closed), (closed, closed).
    assert len({tuple(r[1]) for r in runs}) == (3 if variant == "features" else 2)


def test_chunked_prompt_and_batch_invariance(engines):
    """A 150-token prompt spans three prefill steps (64-token chunks): its mean is summed
    across them. Beside plain, unconditional and other conditional requests, each gets
    what it gets alone."""
    llm, ref = engines.get("llama", "features"), engines.reference("llama")
    rng = np.random.default_rng(7)
    prompts = [[int(x) for x in rng.integers(10, 480, n)] for n in (150, 12, 40, 17, 70)]
    cond = {"name": "topic", "data": C1, "layer": 1}
    v0, v2 = _decide(engines, prompts[0], cond), _decide(engines, prompts[2], cond)
    raws = [
        {"conditions": [_with_threshold(cond, v0, True)], "vectors": [_behaviour("topic")]},
        None,
        {"conditions": [_with_threshold(cond, v2, False)], "vectors": [_behaviour("topic")]},
        {"vectors": [{"data": {"1": B}, "scale": 0.5}]},
        {"conditions": [_with_threshold(cond, v0, True)], "vectors": [_behaviour("not topic")]},
    ]
    together = _run(llm, prompts, raws, max_tokens=6)
    spec = _spec(engines, raws[0])
    tokens, lps = ref.greedy(prompts[0], 6, spec)
    assert together[0][0] == tokens
    np.testing.assert_allclose(together[0][1], lps, atol=TOL)
    assert together[0][2][0]["value"] == pytest.approx(
        ref.conditions(prompts[0], spec)["topic"][0], abs=TOL
    )
    assert_each_as_alone(llm, prompts, raws, together, max_tokens=6)


def assert_each_as_alone(llm, prompts, raws, together, max_tokens: int) -> None:
    """Each request of a batch (`together`, from _run) equals its run alone: tokens,
    log-probs and condition reports (decisions exactly, values to 1e-5).

    Plain vLLM on CPU is itself not bit-invariant for every batch: a 150-token prompt's
    log-probs move by ~1e-6 with no steering at all. Where plain rows are exact, steered
    ones must be too; elsewhere they may move no more than plain ones do."""
    plain = _run(llm, prompts, [None] * len(prompts), max_tokens=max_tokens)
    exact = 0
    for i, (prompt, raw, got) in enumerate(zip(prompts, raws, together, strict=True)):
        alone = _run(llm, [prompt], [raw], max_tokens=max_tokens)[0]
        plain_alone = _run(llm, [prompt], [None], max_tokens=max_tokens)[0]
        assert got[0] == alone[0]
        for mine, solo in zip(got[2] or [], alone[2] or [], strict=True):
            assert mine["fired"] == solo["fired"], f"request {i}"
            for key in ("value", "values"):
                if mine.get(key) is not None:
                    np.testing.assert_allclose(mine[key], solo[key], atol=1e-5)
        if plain[i][1] == plain_alone[1]:
            assert got[1] == alone[1], f"request {i}"
        else:
            np.testing.assert_allclose(got[1], alone[1], atol=1e-5)
        exact += plain[i][1] == plain_alone[1]
    assert exact >= len(prompts) - 1  # the bit-exact check ran for most requests


def test_prefix_cache_never_skips_the_prompt(engines):
    """The same conditional spec twice on one prompt: the second must read every prompt
    row again (no prefix-cache hit), or its mean would miss them."""
    llm = engines.get("llama", "features")
    prompt = prompt_ids(seed=50, length=100)
    cond = {"name": "topic", "data": C1, "layer": 1}
    value = _decide(engines, prompt, cond)
    raw = {"conditions": [_with_threshold(cond, value, True)], "vectors": [_behaviour("topic")]}
    first = generate(llm, [prompt], sampling(raw, max_tokens=4))[0]
    second = generate(llm, [prompt], sampling(raw, max_tokens=4))[0]
    assert second.num_cached_tokens == 0
    assert first.tokens == second.tokens and first.logprobs == second.logprobs


def test_gate_truth_tables():
    assert gate_truth("a", ["a", "b"]) == [False, True, False, True]
    assert gate_truth("a and not b", ["a", "b"]) == [False, True, False, False]
    assert gate_truth("(a or b) and not (a and b)", ["a", "b"]) == [False, True, True, False]
    for bad, why in (
        ("a +", "not an expression"),
        ("c", "unknown condition 'c'"),
        ("a == b", "only"),
    ):
        with pytest.raises(ValueError, match=why):
            gate_truth(bad, ["a", "b"])


TOKEN_CONDITION = {"name": "tok", "data": C1, "layer": 1, "reduce": "token", "threshold": 0.1}
ERRORS = [
    (
        {
            "conditions": [{"name": "x", "data": C1, "layer": 1, "threshold": 0.1}],
            "vectors": [_behaviour("y")],
        },
        "unknown condition 'y'",
    ),
    (
        {
            "conditions": [{"name": "x", "data": C1, "layer": 1, "threshold": 0.1}],
            "vectors": [_behaviour("x", positions="all")],
        },
        "set positions to 'generated'",
    ),
    ({"conditions": [{"name": "x", "data": C1, "threshold": 0.1}]}, "'layer' is required"),
    (  # an explicit null (found by the fuzzer: it was a TypeError's text)
        {"conditions": [{"name": "x", "data": C1, "layer": None, "threshold": 0.1}]},
        "'layer' is required",
    ),
    (
        {"conditions": [{"name": "x", "data": C1[:5], "layer": 1, "threshold": 0.1}]},
        "hidden size is",
    ),
    (
        {"conditions": [{"name": "x", "data": [0.0] * len(C1), "layer": 1, "threshold": 0.1}]},
        "direction is zero",
    ),
    (
        {"conditions": [{"name": "not", "data": C1, "layer": 1, "threshold": 0.1}]},
        "must be an identifier",
    ),
    ({"conditions": [{"name": "x", "data": C1, "layer": 9, "threshold": 0.1}]}, "layer"),
    (
        {"conditions": [{"name": "x", "sae": "relu", "feature": 7, "layer": 3, "threshold": 0.1}]},
        "reads layer",
    ),
    (
        {
            "conditions": [
                {"name": "x", "data": C1, "layer": 1, "measure": "activation", "threshold": 0.1}
            ]
        },
        "measure 'activation'",
    ),
    (
        {
            "conditions": [
                {"name": n, "data": C1, "layer": 1, "threshold": 0.1} for n in ("a", "b", "c")
            ]
        },
        "3 conditions, this server allows 2",
    ),
    (
        {"conditions": [{"name": "x", "data": C1, "layer": 1, "threshold": 0.1}] * 2},
        "used twice",
    ),
    (  # token-level: a gate acting at or before its condition's layer
        {
            "conditions": [TOKEN_CONDITION],
            "vectors": [{"data": {"1": B, "2": B}, "scale": 0.7, "when": "tok"}],
        },
        "token condition 'tok' reads layer 1",
    ),
    (  # a request-level condition in the expression keeps the entry off the prompt
        {
            "conditions": [
                TOKEN_CONDITION,
                {"name": "topic", "data": C2, "layer": 1, "threshold": 0.1},
            ],
            "vectors": [{"data": {"2": B}, "when": "tok and topic"}],
        },
        "are decided once the prompt is read, so an entry gated by them",
    ),
]


@pytest.mark.parametrize("raw,message", ERRORS, ids=[m for _, m in ERRORS])
def test_condition_errors_name_the_field(engines, raw, message):
    with pytest.raises(SpecError) as e:
        _spec(engines, raw)
    assert any(message in msg and loc.startswith("steering") for loc, msg in e.value.errors), (
        e.value.errors
    )
    llm = engines.get("llama", "features")
    with pytest.raises(SteeringValidationError, match=message.replace("(", r"\(")):
        generate(llm, [prompt_ids(seed=1, length=5)], sampling(raw))


def test_conditions_need_the_switch(engines):
    llm = engines.get("llama", "eager")
    raw = {"conditions": [{"name": "x", "data": C1, "layer": 1, "threshold": 0.1}]}
    with pytest.raises(SteeringValidationError, match="--max-steering-conditions"):
        generate(llm, [prompt_ids(seed=2, length=6)], sampling(raw))


def test_preemption_keeps_the_prompt_sums(engines):
    """Four 100-token conditional requests generating 100 tokens each on a 320-token KV
    cache (two run, growing to 7 blocks each in 10): vLLM preempts and recomputes some
    of them. Each must still equal the reference (its sums neither lost nor doubled),
    and the engine must have seen recomputed rows."""
    llm, ref = engines.get("llama", "features-tight"), engines.reference("llama")
    prompts = [prompt_ids(seed=60 + i, length=100) for i in range(4)]
    cond = {"name": "topic", "data": C1, "layer": 1}
    raws = []
    for i, p in enumerate(prompts):
        value = _decide(engines, p, cond)
        c = _with_threshold(cond, value, fire=i % 2 == 0)
        raws.append({"conditions": [c], "vectors": [_behaviour("topic")]})
    before = llm.collective_rpc("steerserve_stats")[0]["recomputed_condition_rows"]
    runs = _run(llm, prompts, raws, max_tokens=100)
    after = llm.collective_rpc("steerserve_stats")[0]["recomputed_condition_rows"]
    assert after > before, "no request was preempted: the KV cache is not tight enough"
    for i, (prompt, raw, (tokens, lps, report)) in enumerate(zip(prompts, raws, runs, strict=True)):
        spec = _spec(engines, raw)
        value, fired = ref.conditions(prompt, spec)["topic"]
        assert report[0]["fired"] == fired == (i % 2 == 0)
        assert report[0]["value"] == pytest.approx(value, abs=TOL)
        ref_tokens, ref_lps = ref.greedy(prompt, 100, spec)
        assert tokens == ref_tokens
        np.testing.assert_allclose(lps, ref_lps, atol=TOL)


def test_condition_layers_restrict_where_conditions_read(engines):
    """An engine that sums prompt rows at some layers only (condition_layers) refuses a
    condition at another layer, naming the field and the switch, in the spec and as the
    engine core admits; the CLI flag reaches the engine's config."""
    import argparse

    from server.cli import _steering_config, add_steering_args
    from steering.engine.capacity import Capacity

    at_1 = {"conditions": [{"name": "x", "data": C1, "layer": 1, "threshold": 0.1}]}
    with pytest.raises(SpecError) as e:
        _spec(engines, at_1, condition_layers=(2,))
    msg = str(e.value)
    assert "steering.conditions[0]" in msg and "layers [2] only" in msg
    assert "--steering-condition-layers" in msg
    sae = {"conditions": [{"name": "f", "sae": "gs_layer_2", "feature": 1, "threshold": 0.1}]}
    _spec(engines, sae, condition_layers=(2,))  # gs_layer_2 reads layer 2
    spec = _spec(engines, at_1, condition_layers=(1, 2))
    shape = engines.reference("llama").shape
    cap = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        max_proj=2,
        max_read=0,
        heads=None,
        head_dim=shape.head_dim,
        decoding=False,
        max_dynamic=2,
        max_conditions=2,
    )
    compiled = compile_spec(spec, shape)
    assert Capacity(**cap, condition_layers=(1,)).misfit(compiled) is None
    why = Capacity(**cap, condition_layers=(2,)).misfit(compiled)
    assert why == "conditions at layer(s) [1], this engine reads them at [2]"
    parser = argparse.ArgumentParser()
    add_steering_args(parser)
    args = parser.parse_args(["--steering-condition-layers", "2,1"])
    args.model, args.additional_config = "x", None
    _steering_config(args)
    assert args.additional_config["steerserve"]["condition_layers"] == [2, 1]
