"""Readout: per-token projections of the residual stream, against the reference oracle."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HIDDEN, generate, random_vector, sampling

from steering.engine.frontend import SteeringValidationError
from steering.engine.worker import readouts
from steering.vectors import VectorRegistry

PROMPTS = [
    [5, 17, 250, 33, 91, 12, 400, 8],
    [int(x) for x in np.random.default_rng(3).integers(10, 480, 90)],  # 2 chunks of 64
]
INLINE = random_vector(11).tolist()
GENERATED_ONLY = {"readout": [{"name": "happy", "layer": 2}]}
READ_ONLY = {
    "readout": [{"name": "happy", "layer": 1}, {"data": INLINE, "layer": 3, "prompt": True}]
}
STEERED = {
    "vectors": [{"name": "happy", "layers": [1], "scale": 4.0}],
    "readout": [{"name": "happy", "layer": 1, "prompt": True}, {"data": INLINE, "layer": 2}],
}
MAX_TOKENS = 6


def _fetch(llm, request_id: str) -> dict:
    return readouts(llm, request_id)


def _run(llm, prompts, specs):
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [sampling(s, max_tokens=MAX_TOKENS) for s in specs],
        use_tqdm=False,
    )
    return [(list(o.outputs[0].token_ids), _fetch(llm, o.request_id).get(0)) for o in outs]


def _expected(engines, raw: dict, prompt: list[int], tokens: list[int]):
    ref = engines.reference("llama")
    spec = ref.spec(raw, max_readouts=4, vectors=VectorRegistry(engines.vectors_dir))
    rows = ref.readout(prompt + tokens[:-1], len(prompt), spec)
    p = len(prompt)
    return rows[p - 1 : p - 1 + len(tokens)], rows[:p]


@pytest.mark.parametrize(
    "raw", [READ_ONLY, STEERED, GENERATED_ONLY], ids=["read-only", "steered", "generated-only"]
)
def test_readout_equals_the_reference(engines, raw):
    llm = engines.get("llama", "readout")
    for prompt in PROMPTS:
        [(tokens, got)] = _run(llm, [prompt], [raw])
        gen, prompt_rows = _expected(engines, raw, prompt, tokens)
        assert len(got["generated"]) == MAX_TOKENS
        assert np.abs(np.array(got["generated"])).max() > 0.1  # not a table of zeros
        np.testing.assert_allclose(got["generated"], gen, rtol=1e-4, atol=1e-4)
        wants_prompt = [e.get("prompt", False) for e in raw["readout"]]
        if not any(wants_prompt):
            assert got["prompt"] is None
            continue
        prompt_values = np.array(got["prompt"])
        assert prompt_values.shape == (len(prompt), len(raw["readout"]))
        for k, wanted in enumerate(wants_prompt):
            if wanted:
                np.testing.assert_allclose(
                    prompt_values[:, k], prompt_rows[:, k], rtol=1e-4, atol=1e-4
                )


def test_readout_changes_nothing_else_and_is_batch_invariant(engines):
    llm = engines.get("llama", "readout")
    steer_only = {"vectors": STEERED["vectors"]}
    alone = {
        name: _run(llm, [PROMPTS[1]], [spec])[0]
        for name, spec in (("read", READ_ONLY), ("steered", STEERED))
    }
    mixed = _run(
        llm,
        [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0]],
        [READ_ONLY, None, STEERED, steer_only],
    )
    for (tokens, got), name in ((mixed[0], "read"), (mixed[2], "steered")):
        assert tokens == alone[name][0]
        np.testing.assert_allclose(got["generated"], alone[name][1]["generated"], atol=1e-5)
        np.testing.assert_allclose(
            got["prompt"], alone[name][1]["prompt"], atol=1e-5, equal_nan=True
        )
    # Reading does not steer: tokens equal the plain engine's and the vectors-only run's.
    plain = generate(engines.get("llama"), [PROMPTS[1], PROMPTS[0]], sampling(None, MAX_TOKENS))
    assert mixed[0][0] == plain[0].tokens and mixed[1][0] == plain[1].tokens
    assert mixed[1][1] is None  # no readout asked, none kept
    assert mixed[2][0] == _run(llm, [PROMPTS[1]], [steer_only])[0][0]
    # Steering 4 x happy at layer 1 moves every prompt row's layer-1 reading on happy by
    # exactly 4 |happy_1| (layer 1's input is unchanged).
    happy_1 = VectorRegistry(engines.vectors_dir).get("happy").directions[1]
    steered, read = (np.array(alone[k][1]["prompt"])[:, 0] for k in ("steered", "read"))
    shift = steered - read
    np.testing.assert_allclose(shift, 4 * np.linalg.norm(happy_1), rtol=1e-4)
    # Values are handed over once.
    assert _fetch(llm, "no-such-request") == {}


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"name": "happy", "layer": 4}, "layer 4 is out of range"),
        ({"name": "happy", "layer": 3}, "has no data for layer 3"),
        ({"name": "nope", "layer": 1}, "nope"),
        ({"data": [1.0] * (HIDDEN - 1), "layer": 1}, f"hidden size is {HIDDEN}"),
        ({"data": [0.0] * HIDDEN, "layer": 1}, "zero"),
        ({"data": INLINE, "name": "happy", "layer": 1}, "exactly one of"),
        ({"name": "happy"}, "layer"),
    ],
)
def test_bad_readout_entries_are_refused(engines, entry, why):
    llm = engines.get("llama", "readout")
    with pytest.raises(SteeringValidationError, match=why) as e:
        llm.generate(
            [{"prompt_token_ids": PROMPTS[0]}], sampling({"readout": [entry]}), use_tqdm=False
        )
    assert "readout[0]" in str(e.value)


def test_readout_needs_an_engine_with_readout_on(engines):
    with pytest.raises(SteeringValidationError, match="readout on"):
        engines.get("llama").generate(
            [{"prompt_token_ids": PROMPTS[0]}], sampling(READ_ONLY), use_tqdm=False
        )
    with pytest.raises(SteeringValidationError, match="at most 4 readout entries"):
        engines.get("llama", "readout").generate(
            [{"prompt_token_ids": PROMPTS[0]}],
            sampling({"readout": [{"name": "happy", "layer": 1}] * 5}),
            use_tqdm=False,
        )


def test_compiled_engine_reads_the_same(engines):
    # The torch.compile'd forward (what CUDA graphs replay on GPU) runs the readout ops too.
    eager = _run(engines.get("llama", "readout"), PROMPTS, [STEERED, READ_ONLY])
    compiled = _run(engines.get("llama", "readout-compiled"), PROMPTS, [STEERED, READ_ONLY])
    for (tokens, got), (want_tokens, want) in zip(compiled, eager, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(got["generated"], want["generated"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["prompt"], want["prompt"], rtol=1e-4, atol=1e-4)
