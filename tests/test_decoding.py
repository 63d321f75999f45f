"""Layer-fused and layer-contrastive decoding: engine vs reference oracle, batches, errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate, generate_one, prompt_ids, random_vector, sampling

from steering.engine.hooks import runtime_of

TOL = 1e-4

CASES = {
    "fuse-fixed": {"mode": "fuse", "layer": 1, "weight": 0.5},
    "fuse-auto": {"mode": "fuse", "layer": "auto", "weight": 0.6},
    "contrast-list": {"mode": "contrast", "layers": [0, 2]},
    "contrast-low": {"mode": "contrast", "layers": "low", "alpha": 0.2},
    "contrast-high": {"mode": "contrast", "layers": "high"},
    "lfd-default": {"mode": "lfd"},
    "lfd-list-alpha": {"mode": "lfd", "layers": [0, 1, 2], "alpha": 0.05},
}


def _reports(worker) -> dict:
    return dict(runtime_of(worker.model_runner).finished_reports)


def _new_report(llm, before: dict) -> dict:
    generate_one(llm, prompt_ids(999, 4), sampling(None, max_tokens=1))  # a step releases
    after = llm.collective_rpc(_reports)[0]
    new = [v for k, v in after.items() if k not in before]
    assert len(new) == 1, new
    return new[0]


def _check(llm, ref, prompt, raw, n=8):
    spec = ref.spec(raw)
    before = llm.collective_rpc(_reports)[0]
    run = generate_one(llm, prompt, sampling(raw, max_tokens=n))
    report = _new_report(llm, before)
    tokens, lps = ref.greedy(prompt, n, spec)
    assert run.tokens == tokens
    err = float(np.max(np.abs(np.array(run.logprobs) - lps)))
    assert err <= TOL, f"max |engine - reference| = {err:.2e}"
    return run, report, spec


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_decoding_parity_with_reference(engines, arch, case):
    llm, ref = engines.get(arch), engines.reference(arch)
    prompt = prompt_ids(sum(map(ord, case)) % 500, 11)
    raw = {"decoding": CASES[case]}
    run, report, spec = _check(llm, ref, prompt, raw)
    plain = generate_one(llm, prompt, sampling(None, max_tokens=8))
    assert run.tokens != plain.tokens or run.logprobs != plain.logprobs
    if spec.decoding.mode == "fuse":
        assert report["layer"] == ref.last_fuse_layer
        if case == "fuse-auto":
            assert sorted(report["iks"]) == spec.decoding.candidates
    else:
        assert report["layers"] == ref.last_contrast_layers


W = (np.random.default_rng(81).standard_normal(256) * 0.5).tolist()
COMBINED = {
    "vectors": [
        {"data": {"1": random_vector(80).tolist()}, "scale": 0.8},
        {"site": "heads", "data": {"2": W}, "heads": [1]},
    ],
    "heads": [{"layer": 0, "heads": [2]}, {"layer": 1, "heads": [3], "target": "query"}],
}


@pytest.mark.parametrize("mode", ["fuse-auto", "contrast-high", "lfd-default"])
def test_decoding_combined_with_steering_and_head_masks(engines, mode):
    llm, ref = engines.get("llama8"), engines.reference("llama8")
    raw = {**COMBINED, "decoding": CASES[mode]}
    run, _, _ = _check(llm, ref, prompt_ids(82, 13), raw)
    without = generate_one(llm, prompt_ids(82, 13), sampling(COMBINED, max_tokens=8))
    assert run.logprobs != without.logprobs


def test_mixed_batch_equals_solo_and_plain_rows_are_untouched(engines):
    llm, plain_llm = engines.get("llama8"), engines.get("llama8", "disabled")
    specs = [
        None,
        {"decoding": CASES["fuse-fixed"]},
        {"decoding": CASES["contrast-high"]},
        None,
        {"decoding": CASES["fuse-auto"]},
        {**COMBINED, "decoding": CASES["contrast-low"]},
        {"decoding": CASES["lfd-default"]},
        {"vectors": COMBINED["vectors"]},
        None,
        # Contrast rows with the same candidates are scored as one group.
        {"decoding": CASES["contrast-high"]},
        {"vectors": COMBINED["vectors"], "decoding": CASES["contrast-high"]},
    ]
    # Mixed lengths: long prompts are chunked (64 tokens per step), so rows of unfinished
    # prompts share steps with decoding rows.
    lengths = [9, 70, 12, 100, 5, 33, 80, 20, 14, 7, 11]
    prompts = [prompt_ids(90 + i, n) for i, n in enumerate(lengths)]
    batch = generate(llm, prompts, [sampling(s, max_tokens=10) for s in specs])
    plain = generate(plain_llm, prompts, sampling(None, max_tokens=10))
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        alone = generate_one(llm, prompt, sampling(spec, max_tokens=10))
        assert batch[i].tokens == alone.tokens, i
        assert np.max(np.abs(np.array(batch[i].logprobs) - alone.logprobs)) < 1e-4, i
        if spec is None:  # bit-identical to plain vLLM in a batch with decoding rows
            assert batch[i].logprobs == plain[i].logprobs and batch[i].tokens == plain[i].tokens


def test_compiled_decoding_matches_reference(engines):
    llm, ref = engines.get("llama", "compiled"), engines.reference("llama")
    for case in ("fuse-fixed", "contrast-list", "lfd-default"):
        _check(llm, ref, prompt_ids(95, 9), {"decoding": CASES[case]})


@pytest.mark.parametrize(
    "decoding, field, reason",
    [
        ({"mode": "fuse", "layer": 3, "weight": 0.5}, "steering.decoding", "out of range (0..2"),
        ({"mode": "fuse", "layer": 1, "weight": 1.5}, "steering.decoding", "between 0 and 1"),
        ({"mode": "contrast", "layers": [0, 5]}, "steering.decoding", "contrast layer 5"),
        ({"mode": "contrast", "layers": "low", "alpha": -1}, "steering.decoding", "'alpha'"),
        ({"mode": "lfd", "layers": "high"}, "steering.decoding", "'latter_half'"),
        ({"mode": "beam"}, "steering.decoding.mode", "'fuse', 'contrast' or 'lfd'"),
    ],
)
def test_bad_decoding_specs_are_clear_errors(engines, decoding, field, reason):
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as info:
        generate_one(engines.get("llama"), prompt_ids(96, 6), sampling({"decoding": decoding}))
    assert info.value.parameter == field and reason in str(info.value), str(info.value)


def test_decoding_with_prompt_logprobs_is_refused(engines):
    from vllm.exceptions import VLLMValidationError

    params = sampling({"decoding": CASES["fuse-fixed"]}, prompt_logprobs=True)
    with pytest.raises(VLLMValidationError, match="cannot be combined with prompt_logprobs"):
        generate_one(engines.get("llama"), prompt_ids(97, 6), params)
