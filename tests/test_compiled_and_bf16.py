"""Unsteered rows bit-identical to plain vLLM on the compiled path and in bfloat16, and
bfloat16 steering within a stated tolerance of HF transformers in bfloat16."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import generate, prompt_ids, random_vector, sampling

PROMPTS = [prompt_ids(300 + i, n) for i, n in enumerate((9, 70, 23, 130, 5, 40))]
STEERED = [
    {"vectors": [{"data": {"1": random_vector(61).tolist()}, "scale": 0.8}]},
    {"heads": [{"layer": 2, "heads": [1, 3]}]},
    {"vectors": [{"data": {"2": random_vector(62).tolist()}, "op": "ablate"}]},
]


@pytest.mark.parametrize(
    "steered,plain", [("compiled", "disabled-compiled"), ("bf16", "bf16-disabled")]
)
def test_unsteered_rows_bit_identical_to_plain_vllm(engines, steered, plain):
    """Alone, and in a batch where every other request is steered (chunked prompts too)."""
    llm, base = engines.get("llama", steered), engines.get("llama", plain)
    want = generate(base, PROMPTS, sampling(None, max_tokens=10))
    alone = generate(llm, PROMPTS, sampling(None, max_tokens=10))
    specs = [None if i % 2 == 0 else STEERED[i // 2 % 3] for i in range(len(PROMPTS))]
    mixed = generate(llm, PROMPTS, [sampling(s, max_tokens=10) for s in specs])
    for i, w in enumerate(want):
        assert alone[i].tokens == w.tokens and alone[i].logprobs == w.logprobs, i
        if specs[i] is None:
            assert mixed[i].tokens == w.tokens and mixed[i].logprobs == w.logprobs, i
        else:
            assert mixed[i].logprobs != w.logprobs, i  # steered rows did change


# bf16 rounds every layer's output: vLLM's fused kernels and HF's eager ops round at
# different places, so the two disagree even unsteered. Steering must add no more than
# that: the steered gap stays within the unsteered gap plus BF16_SLACK (log-prob units).
BF16_SLACK = 0.02  # measured: plain 0.031, steered at most 0.032 (add, head mask, ablate)


@pytest.mark.parametrize("spec", STEERED, ids=["add", "head-mask", "ablate"])
def test_bf16_steering_within_tolerance_of_hf_bf16(engines, spec):
    llm, ref = engines.get("llama", "bf16"), engines.reference("llama", "bfloat16")
    ref_spec = ref.spec(spec)
    gaps = {}
    for name, raw, rs in (("plain", None, None), ("steered", spec, ref_spec)):
        worst = 0.0
        for prompt in PROMPTS[:4]:
            got = generate(llm, [prompt], sampling(raw, max_tokens=8))[0]
            # HF's log-probs of vLLM's own tokens, teacher-forced: the same positions.
            want = ref.score(prompt, got.tokens, rs)
            worst = max(worst, float(np.abs(np.subtract(got.logprobs, want)).max()))
        gaps[name] = worst
    assert gaps["steered"] <= gaps["plain"] + BF16_SLACK, gaps
