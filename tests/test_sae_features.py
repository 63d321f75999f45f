"""SAE feature ops (spec `features`) and feature readout, against the reference oracle.

The SAEs are random ones written in each supported format (tests/sae_fixtures.py); the
reference applies each op straight from the SAE's weights with forward hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_close,
    assert_matches_reference,
    generate,
    generate_one,
    prompt_ids,
    random_vector,
    sampling,
)

from steering.engine.frontend import SteeringValidationError
from steering.engine.worker import readouts
from steering.sae import SaeRegistry, read_any
from steering.vectors import VectorRegistry

V1 = random_vector(11).tolist()

CASES = {
    "add": {"features": [{"sae": "relu", "feature": 3, "scale": 2.0}]},
    "add-relative-generated": {
        "features": [
            {"sae": "relu", "feature": 5, "scale": 3.0, "relative": True, "positions": "generated"}
        ]
    },
    "clamp-relu": {"features": [{"sae": "relu", "feature": 7, "op": "clamp", "value": 4.0}]},
    "clamp-jumprelu-generated": {
        "features": [
            {
                "sae": "gs_layer_2",
                "feature": 1,
                "op": "clamp",
                "value": 5.0,
                "positions": "generated",
            }
        ]
    },
    "scale-off-prompt": {
        "features": [
            {"sae": "lens_relu", "feature": 2, "op": "scale", "factor": 0.0, "positions": "prompt"}
        ]
    },
    "scale-up-from-last-prompt": {
        "features": [
            {
                "sae": "lens_jump",
                "feature": 3,
                "op": "scale",
                "factor": 4.0,
                "positions": "from_last_prompt",
            }
        ]
    },
    "clamp-topk": {
        "features": [{"sae": "sparsify.layers.1", "feature": 9, "op": "clamp", "value": 3.0}]
    },
    # Vector entries first, then features in order; clamps after an add at the same layer
    # read the stream with that add in it (the folded constant enters their offsets).
    "ordered-with-vectors": {
        "vectors": [
            {"data": {"1": V1}, "scale": 0.8},
            {"data": {"1": V1}, "op": "ablate", "scale": 0.5, "positions": "prompt"},
        ],
        "features": [
            {"sae": "relu", "feature": 3, "scale": 1.5},
            {"sae": "relu", "feature": 3, "op": "clamp", "value": 2.0},
            {"sae": "relu", "feature": 11, "op": "scale", "factor": 2.5},
            {"sae": "relu", "feature": 3, "scale": -0.5, "positions": "generated"},
            {"sae": "gs_layer_2", "feature": 6, "op": "clamp", "value": 0.0},
        ],
    },
}


def _ref(engines, arch: str = "llama"):
    return engines.reference(arch)


def _spec(engines, raw, arch: str = "llama", **kw):
    ctx = dict(saes=SaeRegistry(engines.saes_dir), max_features=3, max_readouts=4)
    ctx["vectors"] = VectorRegistry(engines.vectors_dir)
    return _ref(engines, arch).spec(raw, **ctx, **kw)


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_feature_ops_equal_the_reference(engines, variant, case):
    llm, ref = engines.get("llama", variant), _ref(engines)
    raw = CASES[case]
    spec = _spec(engines, raw)
    prompt = prompt_ids(seed=sum(map(ord, case)) % 1000, length=12)
    run = generate_one(llm, prompt, sampling(raw, max_tokens=8, prompt_logprobs=True))
    plain = generate_one(llm, prompt, sampling(None, max_tokens=8, prompt_logprobs=True))
    assert_matches_reference(run, ref, prompt, spec, case)
    changed = np.abs(np.array(run.logprobs) - np.array(plain.logprobs)).max()
    assert run.tokens != plain.tokens or changed > 1e-3, f"{case} had no effect"


def test_feature_ops_on_another_family(engines):
    """Qwen3 (q/k norms, another layer class): the residual site is the same contract."""
    llm, ref = engines.get("qwen3", "features"), _ref(engines, "qwen3")
    raw = CASES["ordered-with-vectors"]
    spec = _spec(engines, raw, "qwen3")
    prompt = prompt_ids(seed=4, length=10)
    run = generate_one(llm, prompt, sampling(raw, max_tokens=6))
    tokens, lps = ref.greedy(prompt, 6, spec)
    assert run.tokens == tokens
    assert_close(run.logprobs, lps, "qwen3 log-probs")


def test_thresholds_are_exercised(engines):
    """The cases' features fire on some rows and not on others (else a wrong threshold or
    a missing where() could pass)."""
    ref = _ref(engines)
    prompt = prompt_ids(seed=1, length=24)
    for sae, feature in (("relu", 7), ("gs_layer_2", 1), ("lens_jump", 4), ("lens_relu", 2)):
        raw = {"readout": [{"sae": sae, "feature": feature, "prompt": True}]}
        acts = ref.readout(prompt, len(prompt), _spec(engines, raw))[:, 0]
        assert (acts == 0).any() and (acts > 0).any(), (sae, feature, acts)


def test_batch_invariance_with_mixed_feature_specs(engines):
    """Each request gets the same tokens and log-probs alone and beside others' specs,
    plain requests included, over chunked prefill (90-token prompts, 64-token chunks)."""
    llm = engines.get("llama", "features")
    rng = np.random.default_rng(7)
    prompts = [[int(x) for x in rng.integers(10, 480, n)] for n in (90, 12, 40, 17, 70)]
    specs = [
        CASES["clamp-relu"],
        None,
        CASES["ordered-with-vectors"],
        CASES["scale-up-from-last-prompt"],
        CASES["clamp-topk"],
    ]
    together = generate(llm, prompts, [sampling(s, max_tokens=6) for s in specs])
    for prompt, spec, got in zip(prompts, specs, together, strict=True):
        alone = generate_one(llm, prompt, sampling(spec, max_tokens=6))
        assert got.tokens == alone.tokens
        assert got.logprobs == alone.logprobs


def test_unsteered_rows_bit_identical_with_feature_tables(engines):
    steered, plain = engines.get("llama", "features"), engines.get("llama", "disabled")
    prompts = [prompt_ids(seed=s, length=n) for s, n in ((1, 9), (2, 70))]
    mixed = generate(steered, prompts, [sampling(CASES["clamp-relu"]), sampling(None)])
    # The same batch on plain vLLM (a CPU matmul's rounding can depend on the batch's rows).
    want = generate(plain, prompts, sampling(None))
    assert mixed[1].tokens == want[1].tokens
    assert mixed[1].logprobs == want[1].logprobs  # exact
    assert mixed[0].logprobs != want[0].logprobs


def test_feature_add_equals_the_same_direction_inline(engines):
    """A feature `add` is scale * W_dec[f] at the SAE's layer: the inline vector with those
    floats steers identically."""
    llm = engines.get("llama", "features")
    sae = read_any(engines.saes_dir / "gs_layer_2.npz")
    prompt = prompt_ids(seed=3, length=11)
    by_feature = generate_one(
        llm, prompt, sampling({"features": [{"sae": "gs_layer_2", "feature": 8, "scale": 1.5}]})
    )
    inline = {"vectors": [{"data": {"2": (1.5 * sae.w_dec[8]).tolist()}}]}
    by_vector = generate_one(llm, prompt, sampling(inline))
    assert by_feature.tokens == by_vector.tokens
    assert_close(by_feature.logprobs, by_vector.logprobs, "feature add vs inline")


def test_gemma_scope_and_saelens_files_of_one_sae_steer_identically(engines):
    """The same weights as Gemma Scope params.npz and as an SAELens directory: same layer,
    same activation, the same clamp."""
    llm = engines.get("llama", "features")
    prompt = prompt_ids(seed=5, length=13)
    runs = [
        generate_one(
            llm,
            prompt,
            sampling({"features": [{"sae": name, "feature": 4, "op": "clamp", "value": 6.0}]}),
        )
        for name in ("gs_layer_2", "lens_jump")
    ]
    plain = generate_one(llm, prompt, sampling(None))
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].logprobs == runs[1].logprobs
    assert runs[0].logprobs != plain.logprobs


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
def test_feature_readout_equals_the_reference(engines, variant):
    llm = engines.get("llama", variant)
    raw = {
        "features": [{"sae": "relu", "feature": 7, "op": "clamp", "value": 3.0}],
        "readout": [
            {"sae": "relu", "feature": 7, "prompt": True},
            {"sae": "gs_layer_2", "feature": 1},
            {"sae": "sparsify.layers.1", "feature": 9, "prompt": True},
            {"name": "happy", "layer": 2},
        ],
    }
    spec = _spec(engines, raw)
    for prompt in (prompt_ids(seed=8, length=10), prompt_ids(seed=9, length=90)):
        out = llm.generate(
            [{"prompt_token_ids": prompt}], sampling(raw, max_tokens=5), use_tqdm=False
        )[0]
        tokens = list(out.outputs[0].token_ids)
        got = readouts(llm, out.request_id)[0]
        rows = _ref(engines).readout(prompt + tokens[:-1], len(prompt), spec)
        p = len(prompt)
        np.testing.assert_allclose(got["generated"], rows[p - 1 :], rtol=1e-4, atol=1e-4)
        prompt_rows = np.array(got["prompt"])
        np.testing.assert_allclose(prompt_rows[:, [0, 2]], rows[:p, [0, 2]], atol=1e-4)
        assert np.abs(np.array(got["generated"])[:, :3]).max() > 0.1  # not all zeros


def _error(llm, raw) -> str:
    with pytest.raises(SteeringValidationError) as e:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], sampling(raw), use_tqdm=False)
    return str(e.value)


def test_feature_spec_errors_name_the_field(engines):
    llm = engines.get("llama", "features")
    msg = _error(llm, {"features": [{"sae": "nope", "feature": 1}]})
    assert "steering.features[0]" in msg and "unknown SAE 'nope'" in msg and "relu" in msg
    msg = _error(llm, {"features": [{"sae": "relu", "feature": 64}]})
    assert "feature 64 is out of range" in msg and "0..63" in msg
    msg = _error(llm, {"features": [{"sae": "relu", "feature": 1, "op": "clamp"}]})
    assert "needs 'value'" in msg
    msg = _error(llm, {"features": [{"sae": "gs_layer_2", "feature": 1, "relative": True}]})
    assert "no typical activations" in msg
    four = [{"sae": "relu", "feature": f, "op": "scale", "factor": 2.0} for f in range(4)]
    msg = _error(llm, {"features": four})
    assert "4 feature clamps/scales at layer 1" in msg and "allows 3" in msg
    msg = _error(llm, {"readout": [{"sae": "relu", "feature": 1, "layer": 2}]})
    assert "reads layer 1, not 2" in msg


def test_feature_ops_need_the_switch(engines):
    """An engine without max_features refuses clamps/scales (and says how to turn them on)
    but takes feature adds, which are constants."""
    llm = engines.get("llama")
    msg = _error(llm, {"features": [{"sae": "relu", "feature": 1, "op": "clamp", "value": 1.0}]})
    assert "max_features" in msg and "--max-steering-features" in msg
    prompt = prompt_ids(seed=3, length=9)
    raw = {"features": [{"sae": "relu", "feature": 3, "scale": 2.0}]}
    run = generate_one(llm, prompt, sampling(raw))
    tokens, _ = _ref(engines).greedy(prompt, 8, _spec(engines, raw))
    assert run.tokens == tokens


def test_feature_layers_restrict_where_clamps_run(engines):
    """An engine that runs feature ops at some layers only refuses clamps elsewhere, naming
    them (adds stay constants and are accepted anywhere)."""
    from steering.spec import SpecError

    clamp = {"features": [{"sae": "relu", "feature": 1, "op": "clamp", "value": 1.0}]}
    with pytest.raises(SpecError) as e:
        _spec(engines, clamp, feature_layers=(2,))
    assert "steering.features[0]" in str(e.value) and "at layers [2] only" in str(e.value)
    _spec(engines, {"features": [{"sae": "relu", "feature": 1}]}, feature_layers=(2,))
    _spec(engines, clamp, feature_layers=(1, 2))
