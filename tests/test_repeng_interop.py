"""Interoperability with repeng (PyPI), a control-vector library nobody here wrote.

repeng 0.4.0 runs in a venv of its own (`repeng_env.py`: it needs numpy<2, transformers<5)
and trains a control vector on the tiny Llama test model with HF transformers, exports it
as GGUF, and records greedy generations of its own `ControlModel` with that vector. Here:

1. steerserve loads repeng's GGUF and its steered greedy tokens and log-probs equal
   repeng's (float32 tolerance), and so do the unsteered ones (same model, same inputs);
2. `steerserve vectors train`'s computation on the same pairs (same method, same position)
   gives per-layer vectors with cosine >= 0.99 to repeng's.

Index mapping found in repeng 0.4.0's source (details in `repeng_side.py`): its layer i is
`model.layers[i]`; training reads HF `hidden_states[i + 1]` (the output of layer i) at the
last non-padding token, and `ControlModel` adds `coeff * directions[i]` to the output of
layer i at every position; GGUF `direction.i` holds it. That is steerserve's layer i with
`op: add`, `scale: coeff`, `positions: all`. One exception: for the LAST layer, HF's
`hidden_states` entry is after the final norm, so repeng trains the last layer on normed
states but steers the un-normed stream; steerserve captures the un-normed stream (what is
steered). The test therefore trains layers that are not the last.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import generate, sampling
from pairs import make_pairs, write_pairs
from repeng_env import run_repeng

from steering.training import Pair, capture_pairs, directions
from steering.vectors import VectorRegistry, import_gguf

LAYERS = [1, 2]  # of 4; not the last (see above)
COEFF = 3.0
PROMPTS = [[5, 17, 250, 33, 91, 12, 400, 8], [40, 120, 7, 300, 66, 201]]
MAX_NEW = 8


@pytest.fixture(scope="module")
def repeng_run(model_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("repeng")
    pairs = write_pairs(d / "pairs.jsonl")
    (d / "prompts.json").write_text(json.dumps(PROMPTS))
    run_repeng(
        [
            "--model",
            str(model_dirs["llama"]),
            "--pairs",
            str(pairs),
            "--layers",
            *map(str, LAYERS),
            "--method",
            "pca_diff",
            "--out",
            str(d / "out"),
            "--prompts",
            str(d / "prompts.json"),
            "--coeff",
            str(COEFF),
            "--max-new-tokens",
            str(MAX_NEW),
        ]
    )
    out = d / "out"
    return {
        "gguf": out / "repeng.gguf",
        "directions": {
            int(k): np.array(v, dtype=np.float32)
            for k, v in json.loads((out / "directions.json").read_text()).items()
        },
        "outputs": json.loads((out / "outputs.json").read_text()),
    }


def test_steerserve_loads_repengs_gguf_and_generates_what_repeng_generates(
    repeng_run, engines, tmp_path
):
    vector = import_gguf(repeng_run["gguf"])
    assert vector.layers == LAYERS
    for layer in LAYERS:
        np.testing.assert_array_equal(vector.directions[layer], repeng_run["directions"][layer])
    # The registry serves the file as it is (a .gguf dropped into --vectors-dir).
    (tmp_path / "mood.gguf").write_bytes(repeng_run["gguf"].read_bytes())
    served = VectorRegistry(tmp_path).get("mood")
    assert served.layers == LAYERS

    spec = {
        "vectors": [
            {
                "data": {str(i): served.directions[i].tolist() for i in LAYERS},
                "scale": COEFF,
                "op": "add",
                "positions": "all",
            }
        ]
    }
    llm = engines.get("llama")
    steered = generate(llm, PROMPTS, sampling(spec, max_tokens=MAX_NEW))
    plain = generate(llm, PROMPTS, sampling(None, max_tokens=MAX_NEW))
    for i, record in enumerate(repeng_run["outputs"]["prompts"]):
        assert record["prompt"] == PROMPTS[i]
        for ours, theirs in ((steered[i], record["steered"]), (plain[i], record["unsteered"])):
            assert ours.tokens == theirs["tokens"]
            np.testing.assert_allclose(ours.logprobs, theirs["logprobs"], rtol=0, atol=1e-4)
    assert steered[0].tokens != plain[0].tokens or steered[1].tokens != plain[1].tokens


def test_our_training_matches_repengs_vectors(repeng_run, capturer):
    pairs = [Pair(**p) for p in make_pairs()]
    # Same inputs: our tokenizer (through vLLM) turns the texts into repeng's token ids.
    theirs_ids = repeng_run["outputs"]["pairs_token_ids"]
    for pair, ids in zip(pairs, theirs_ids, strict=True):
        assert [
            capturer.tokenizer.encode(pair.positive),
            capturer.tokenizer.encode(pair.negative),
        ] == ids
    pos, neg = capture_pairs(capturer, pairs, LAYERS, "last", "raw")
    for layer, ours in zip(LAYERS, directions(pos, neg, "pca_diff"), strict=True):
        theirs = repeng_run["directions"][layer]
        cos = float(ours @ theirs / np.linalg.norm(ours) / np.linalg.norm(theirs))
        print(f"layer {layer}: cosine {cos:.6f} to repeng's vector")
        assert cos >= 0.99, f"layer {layer}: cosine {cos:.5f} to repeng's vector"
