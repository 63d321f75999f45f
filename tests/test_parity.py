"""Engine vs reference oracle (HF + hooks, float32): every op and position mode, 3 archs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate_one, prompt_ids, random_vector, sampling

from steering.tiny_models import ARCHITECTURES

TOL = 1e-4
V1 = random_vector(11).tolist()
V2 = random_vector(12).tolist()

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


def _assert_close(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, what
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    assert err <= TOL, f"{what}: max |engine - reference| = {err:.2e} > {TOL}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_with_reference(engines, arch, case):
    llm, ref = engines.get(arch), engines.reference(arch)
    prompt = prompt_ids(seed=hash(case) % 1000, length=12)
    raw = CASES[case]
    spec = ref.spec(raw)

    run = generate_one(llm, prompt, sampling(raw, max_tokens=8, prompt_logprobs=True))
    plain = generate_one(llm, prompt, sampling(None, max_tokens=8, prompt_logprobs=True))

    # Greedy continuation: the same tokens, with the same log-probs.
    ref_tokens, ref_lps = ref.greedy(prompt, 8, spec)
    assert run.tokens == ref_tokens, f"{arch}/{case}: greedy tokens differ"
    _assert_close(run.logprobs, ref_lps, f"{arch}/{case} greedy log-probs")
    # Teacher-forced on the engine's tokens (robust even if a near-tie were to flip).
    _assert_close(run.logprobs, ref.score(prompt, run.tokens, spec), f"{arch}/{case} scored")
    # Prompt rows: log-probs of every prompt token under the intervention.
    lp = ref.logprobs(prompt, len(prompt), spec)
    want = [float(lp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    _assert_close(run.prompt_logprobs, want, f"{arch}/{case} prompt log-probs")

    # The intervention did something (so these comparisons can fail).
    changed = np.abs(np.array(run.logprobs) - np.array(plain.logprobs)).max()
    assert run.tokens != plain.tokens or changed > 1e-3, f"{case} had no effect"
    if raw["vectors"][0].get("positions") == "generated" and len(raw["vectors"]) == 1:
        # Generated-only steering leaves every prompt row untouched.
        assert run.prompt_logprobs == plain.prompt_logprobs
