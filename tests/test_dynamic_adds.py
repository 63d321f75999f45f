"""Scheduled and RMS-relative adds (vector entries with `schedule` / `relative`), against
the reference oracle, for batch invariance and for their errors.

They run on the `features` engines (conftest.FEATURES: max_dynamic 2), so the feature ops
that follow them at a layer, and every feature test's bit-identity, run beside them.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import (
    assert_matches_reference,
    generate,
    generate_one,
    prompt_ids,
    random_vector,
    sampling,
)

from steering.compile import compile_spec, dynamic_coef, dynamic_params
from steering.engine.frontend import SteeringValidationError
from steering.sae import SaeRegistry
from steering.spec import SpecError

V1 = random_vector(21).tolist()
V2 = random_vector(22).tolist()

CASES = {
    "linear-decay": {
        "vectors": [
            {"data": {"1": V1, "2": V2}, "scale": 1.5, "schedule": {"kind": "linear", "steps": 5}}
        ]
    },
    "linear-ramp-up-late": {
        "vectors": [
            {
                "data": {"2": V2},
                "scale": 0.5,
                "positions": "generated",
                "schedule": {"kind": "linear", "start": 2, "steps": 3, "end": 4.0},
            }
        ]
    },
    "exp-half-life": {
        "vectors": [
            {
                "data": {"1": V1},
                "scale": 2.0,
                "schedule": {"kind": "exp", "start": 1, "half_life": 1.5},
            }
        ]
    },
    "window": {
        "vectors": [
            {"data": {"3": V1}, "scale": 2.5, "schedule": {"kind": "window", "start": 2, "stop": 5}}
        ]
    },
    "rms-relative": {
        "vectors": [
            {"data": {"0": V1, "3": V2}, "normalize": True, "scale": 0.4, "relative": "rms"}
        ]
    },
    # Two dynamic adds with a plain add, an ablation after them at their layer (their
    # directions go through it) and a feature clamp after that (it reads them in the stream).
    "composed": {
        "vectors": [
            {"data": {"1": V2}, "scale": 0.7},
            {
                "data": {"1": V1},
                "scale": 0.3,
                "relative": "rms",
                "schedule": {"kind": "exp", "half_life": 2.0},
            },
            {
                "data": {"1": V2},
                "scale": -1.0,
                "positions": "from_last_prompt",
                "schedule": {"kind": "window", "stop": 3},
            },
            {"data": {"1": V1}, "op": "ablate", "scale": 0.5, "positions": "generated"},
        ],
        "features": [{"sae": "relu", "feature": 7, "op": "clamp", "value": 3.0}],
    },
}


def _spec(engines, raw, **kw):
    ctx = dict(saes=SaeRegistry(engines.saes_dir), max_features=3, max_dynamic=2) | kw
    return engines.reference("llama").spec(raw, **ctx)


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dynamic_adds_equal_the_reference(engines, variant, case):
    llm, ref = engines.get("llama", variant), engines.reference("llama")
    raw = CASES[case]
    spec = _spec(engines, raw)
    prompt = prompt_ids(seed=sum(map(ord, case)) % 1000, length=12)
    run = generate_one(llm, prompt, sampling(raw, max_tokens=10, prompt_logprobs=True))
    assert_matches_reference(run, ref, prompt, spec, case)


def test_schedules_change_strength_over_the_generation(engines):
    """The strength really varies: a window schedule equals the plain add inside its window
    and no steering outside it (token by token, teacher-forced on the same tokens)."""
    ref = engines.reference("llama")
    prompt = prompt_ids(seed=3, length=10)
    window = {
        "data": {"2": V1},
        "scale": 3.0,
        "schedule": {"kind": "window", "start": 2, "stop": 4},
    }
    tokens, _ = ref.greedy(prompt, 6, _spec(engines, {"vectors": [window]}))
    seq = prompt + tokens
    lp_window = ref.logprobs(seq, len(prompt), _spec(engines, {"vectors": [window]}))
    plain_add = {"data": {"2": V1}, "scale": 3.0}
    lp_add = ref.logprobs(seq, len(prompt), _spec(engines, {"vectors": [plain_add]}))
    lp_none = ref.logprobs(seq, len(prompt), None)
    rows = np.arange(len(prompt), len(seq))  # generated rows, g = 0, 1, ...
    for g, row in enumerate(rows):
        # Row `row` holds token g; its output depends on the rows up to it (causal), so
        # before the window it equals unsteered, and the window's first row differs.
        if g < 2:
            np.testing.assert_allclose(lp_window[row], lp_none[row], atol=1e-5)
    assert np.abs(lp_window[rows[2]] - lp_none[rows[2]]).max() > 1e-3
    assert np.abs(lp_window[rows[2]] - lp_add[rows[2]]).max() > 1e-3  # earlier rows differ


def test_engine_coefficients_equal_the_schedule_formulas():
    """The engine's vectorised per-token coefficients (compile.dynamic_coef) against each
    Schedule's own formula (spec.Schedule.factor), every kind, over prompt and generated
    rows, several adds per token."""
    from steering.spec import VectorEntry

    entries = [
        {"schedule": {"kind": "linear", "start": 3, "steps": 4, "end": -0.5}, "scale": 2.0},
        {"schedule": {"kind": "exp", "start": 0, "half_life": 0.7}, "positions": "generated"},
        {"schedule": {"kind": "window", "start": 1, "stop": 6}, "positions": "from_last_prompt"},
        {"schedule": {"kind": "constant"}, "scale": -3.0, "positions": "prompt"},
        {"relative": "rms", "scale": 0.25, "positions": "last_prompt"},
    ]
    models = [VectorEntry.model_validate({"data": {"0": [1.0]}, **e}) for e in entries]
    rel = np.arange(-6, 14)
    params = np.stack([dynamic_params(m) for m in models])
    got = dynamic_coef(np.broadcast_to(params, (len(rel), *params.shape)), rel)
    window = {
        "all": rel > -(1 << 40),
        "prompt": rel < 0,
        "generated": rel >= 0,
        "last_prompt": rel == -1,
        "from_last_prompt": rel >= -1,
    }
    for j, m in enumerate(models):
        factor = m.schedule.factor(rel) if m.schedule is not None else np.ones(len(rel))
        want = m.scale * window[m.positions] * factor
        np.testing.assert_allclose(got[:, j], want, rtol=1e-6, atol=1e-7, err_msg=str(entries[j]))
    assert got[:, 0].min() < 0 < got[:, 0].max()  # the linear ramp crosses zero


def test_batch_invariance_with_mixed_dynamic_specs(engines):
    """Same tokens and log-probs alone and beside other specs (plain rows, feature clamps,
    other schedules), over chunked prefill (90-token prompts in 64-token chunks)."""
    llm = engines.get("llama", "features")
    # The batch of the feature tests' invariance case, 6 tokens: plain vLLM on CPU is itself
    # not bit-invariant for every batch (with 8 tokens here, the 90-token prompt's last
    # log-prob moves by 5e-7 with no steering at all), and this one is.
    rng = np.random.default_rng(7)
    prompts = [[int(x) for x in rng.integers(10, 480, n)] for n in (90, 12, 40, 17, 70)]
    specs = [
        CASES["composed"],
        None,
        CASES["rms-relative"],
        {"features": [{"sae": "relu", "feature": 7, "op": "clamp", "value": 4.0}]},
        CASES["linear-decay"],
    ]
    together = generate(llm, prompts, [sampling(s, max_tokens=6) for s in specs])
    for prompt, spec, got in zip(prompts, specs, together, strict=True):
        alone = generate_one(llm, prompt, sampling(spec, max_tokens=6))
        assert got.tokens == alone.tokens
        assert got.logprobs == alone.logprobs


def test_long_chunked_prompt_equals_the_reference(engines):
    """A 90-token prompt spans two prefill steps: every row's g comes from its position."""
    llm, ref = engines.get("llama", "features"), engines.reference("llama")
    raw = CASES["composed"]
    prompt = prompt_ids(seed=8, length=90)
    run = generate_one(llm, prompt, sampling(raw, max_tokens=6, prompt_logprobs=True))
    spec = _spec(engines, raw)
    assert_matches_reference(run, ref, prompt, spec, "chunked")


def test_plain_adds_still_fold_and_dynamic_ones_do_not(engines):
    ref = engines.reference("llama")
    plain = compile_spec(_spec(engines, {"vectors": [{"data": {"1": V1}}]}), ref.shape)
    assert plain.dynamic.count == 0 and plain.const_layers.tolist() == [1]
    dyn = compile_spec(_spec(engines, CASES["linear-decay"]), ref.shape)
    assert dyn.dynamic.count == 1 and dyn.dynamic.layers.tolist() == [1, 2]
    assert not dyn.const_layers.size
    again = type(dyn).from_payload(dyn.to_wire())
    np.testing.assert_array_equal(again.dynamic.dirs, dyn.dynamic.dirs)
    np.testing.assert_array_equal(again.dynamic.params, dyn.dynamic.params)
    # A different schedule is a different KV fingerprint.
    other = {
        "vectors": [
            {**CASES["linear-decay"]["vectors"][0], "schedule": {"kind": "linear", "steps": 6}}
        ]
    }
    assert (
        _spec(engines, other).fingerprint() != _spec(engines, CASES["linear-decay"]).fingerprint()
    )


ERRORS = [
    (
        {"vectors": [{"data": {"1": V1}, "op": "ablate", "relative": "rms"}]},
        "steering.vectors[0]",
        "op 'add' at site 'residual' only",
    ),
    (
        {"vectors": [{"data": {"1": V1}, "schedule": {"kind": "linear"}}]},
        "steering.vectors[0].schedule",
        "needs 'steps'",
    ),
    (
        {"vectors": [{"data": {"1": V1}, "schedule": {"kind": "exp", "half_life": 2, "stop": 4}}]},
        "steering.vectors[0].schedule",
        "'stop' is not used by kind 'exp'",
    ),
    (
        {"vectors": [{"data": {"1": V1}, "schedule": {"kind": "window", "start": 4, "stop": 4}}]},
        "steering.vectors[0].schedule",
        "greater than 'start'",
    ),
    (
        {"vectors": [{"data": {"1": V1}, "schedule": {"kind": "exp", "half_life": 0}}]},
        "steering.vectors[0].schedule.half_life",
        "greater than 0",
    ),
    (
        {"vectors": [{"data": {"1": V1}, "schedule": {"kind": "sine"}}]},
        "steering.vectors[0].schedule.kind",
        "'linear'",
    ),
    (
        {"vectors": [{"data": {str(i): V1}, "relative": "rms"} for i in range(3)]},
        "steering.vectors",
        "3 dynamic adds (scheduled, RMS-relative, or gated by a second 'when' expression), "
        "this server allows 2",
    ),
]


@pytest.mark.parametrize("raw,field,message", ERRORS)
def test_dynamic_errors_name_the_field(engines, raw, field, message):
    with pytest.raises(SpecError) as e:
        _spec(engines, raw)
    assert any(loc == field and message in msg for loc, msg in e.value.errors), e.value.errors
    # The engine's own front end says the same (offline use, raw spec in extra_args).
    llm = engines.get("llama", "features")
    with pytest.raises(SteeringValidationError, match=re.escape(message)):
        generate_one(llm, prompt_ids(seed=1, length=5), sampling(raw))


def test_dynamic_adds_need_the_switch(engines):
    """An engine without max_dynamic refuses them, naming the flag; the request fails alone."""
    llm = engines.get("llama", "eager")
    raw = CASES["rms-relative"]
    with pytest.raises(SteeringValidationError, match="--max-steering-dynamic"):
        generate_one(llm, prompt_ids(seed=2, length=6), sampling(raw))
    assert len(generate_one(llm, prompt_ids(seed=2, length=6), sampling(None)).tokens) == 8
