"""Top-k readout (readout entry {"sae", "top_k"}): each token's most active features of the
engine's top-k SAE, against the reference (the SAE's full encoding, TopK competition
included), batch invariance, and the refusals.

The feature engines read top-k from `sparsify.layers.1` (TopK, k 8 of 64, layer 1;
conftest.FEATURES); the encoder itself is also checked for ReLU and JumpReLU SAEs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FEATURES, generate, prompt_ids, sampling
from sae_fixtures import sae_arrays
from test_sae_features import _error

from steering.engine.topk import TopKEncoder, active_pairs
from steering.engine.worker import readouts
from steering.sae import SaeRegistry, SparseAutoencoder
from steering.vectors import VectorRegistry

TOL = 1e-4
SAE = FEATURES["topk_sae"]
CONTEXT = dict(max_features=3, max_readouts=4, topk_sae=SAE, max_topk=FEATURES["max_topk"])


def _spec(engines, raw):
    ctx = dict(saes=SaeRegistry(engines.saes_dir), vectors=VectorRegistry(engines.vectors_dir))
    return engines.reference("llama").spec(raw, **ctx, **CONTEXT)


def _assert_same_top(got, want, what: str) -> None:
    """Equal (feature, activation) lists; features whose activations tie within TOL may
    swap places."""
    assert got is not None, f"{what}: not computed"
    assert len(got) == len(want), f"{what}: {len(got)} features, the reference has {len(want)}"
    g = np.array([a for _, a in got])
    w = np.array([a for _, a in want])
    if g.size:
        err = float(np.abs(g - w).max())
        assert err <= TOL, f"{what}: activations differ by {err:.2e}"
    for i, ((fg, _), (fw, aw)) in enumerate(zip(got, want, strict=True)):
        if fg != fw:
            tied = [f for f, a in want if abs(a - aw) <= TOL]
            assert fg in tied, f"{what}: feature {fg} at rank {i}, the reference has {fw}"


@pytest.mark.parametrize("variant", ["features", "features-compiled"])
@pytest.mark.parametrize("k", [5, 20])  # 20 > the SAE's own k of 8: at most 8 come back
def test_topk_readout_equals_the_reference(engines, variant, k):
    llm = engines.get("llama", variant)
    raw = {
        # A clamp at the SAE's layer first: top-k reads the stream after the layer's steering.
        "features": [{"sae": "relu", "feature": 7, "op": "clamp", "value": 3.0}],
        "readout": [
            {"name": "happy", "layer": 2},
            {"sae": SAE, "top_k": k, "prompt": True},
            {"sae": "relu", "feature": 7},
        ],
    }
    spec = _spec(engines, raw)
    ref = engines.reference("llama")
    for prompt in (prompt_ids(seed=21, length=11), prompt_ids(seed=22, length=90)):
        out = llm.generate(
            [{"prompt_token_ids": prompt}], sampling(raw, max_tokens=5), use_tqdm=False
        )[0]
        tokens = list(out.outputs[0].token_ids)
        got = readouts(llm, out.request_id)[0]
        p = len(prompt)
        want = ref.topk_readout(prompt + tokens[:-1], p, spec)
        rows = ref.readout(prompt + tokens[:-1], p, spec)  # the projection columns
        for g, row in enumerate(got["generated"]):
            _assert_same_top(row[1], want[p - 1 + g], f"generated token {g}")
            np.testing.assert_allclose([row[0], row[2]], rows[p - 1 + g], atol=TOL)
        for i, row in enumerate(got["prompt"]):
            _assert_same_top(row[1], want[i], f"prompt token {i}")
        sizes = {len(row[1]) for row in got["generated"] + got["prompt"]}
        assert max(sizes) == min(k, 8), sizes  # TopK SAE: its own k bounds what is active


def test_topk_batch_invariance_with_mixed_specs(engines):
    """Different k, with and without prompt rows, beside feature clamps and unsteered rows:
    each request's values and tokens equal its solo run."""
    llm = engines.get("llama", "features")
    specs = [
        {"readout": [{"sae": SAE, "top_k": 3}]},
        {"readout": [{"sae": SAE, "top_k": 12, "prompt": True}]},
        {"features": [{"sae": "relu", "feature": 2, "op": "clamp", "value": 2.0}]},
        None,
        {
            "features": [{"sae": "sparsify.layers.1", "feature": 9, "op": "clamp", "value": 3.0}],
            "readout": [{"sae": SAE, "top_k": 6}, {"sae": "relu", "feature": 4}],
        },
    ]
    prompts = [prompt_ids(seed=30 + i, length=8 + 9 * i) for i in range(len(specs))]
    params = [sampling(s, max_tokens=6) for s in specs]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    together = [readouts(llm, o.request_id).get(0) for o in outs]
    for i, (prompt, spec) in enumerate(zip(prompts, specs, strict=True)):
        solo = llm.generate(
            [{"prompt_token_ids": prompt}], sampling(spec, max_tokens=6), use_tqdm=False
        )[0]
        assert list(solo.outputs[0].token_ids) == list(outs[i].outputs[0].token_ids)
        alone = readouts(llm, solo.request_id).get(0)
        assert (alone is None) == (spec is None or "readout" not in spec)
        if alone is None:
            continue
        for a, b in zip(alone["generated"], together[i]["generated"], strict=True):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                if isinstance(x, list):
                    _assert_same_top(y, [tuple(v) for v in x], f"request {i}")
                else:
                    assert abs(x - y) <= TOL
    # The same run with the top-k requests alone in a batch of plain ones changes nothing
    # for the plain ones (the copy at the SAE's layer is the same op for every row).
    plain = generate(llm, prompts[3:4], sampling(None, max_tokens=6))[0]
    assert plain.tokens == list(outs[3].outputs[0].token_ids)


def test_topk_without_projection_readout(engines):
    """An engine with a top-k SAE and readout off: top-k entries read, projections are
    refused with the switch that turns them on."""
    llm = engines.get("llama", "topk-only")
    raw = {"readout": [{"sae": SAE, "top_k": 7}]}
    spec = _spec(engines, raw)
    prompt = prompt_ids(seed=40, length=20)
    out = llm.generate([{"prompt_token_ids": prompt}], sampling(raw, max_tokens=4), use_tqdm=False)
    tokens = list(out[0].outputs[0].token_ids)
    got = readouts(llm, out[0].request_id)[0]
    assert got["prompt"] is None
    want = engines.reference("llama").topk_readout(prompt + tokens[:-1], len(prompt), spec)
    for g, row in enumerate(got["generated"]):
        (pairs,) = row
        _assert_same_top(pairs, want[len(prompt) - 1 + g], f"generated token {g}")
    msg = _error(llm, {"readout": [{"name": "happy", "layer": 2}]})
    assert "steering.readout" in msg and "--enable-steering-readout" in msg


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_encoder_equals_the_sae_encoding(activation):
    a = sae_arrays(5, 32, width=48)
    kw = {"threshold": a["threshold"]} if activation == "jumprelu" else {}
    if activation == "topk":
        kw["k"] = 6
    sae = SparseAutoencoder(
        a["W_enc"], a["b_enc"], a["W_dec"], a["b_dec"], layer=0, activation=activation, **kw
    )
    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32) * 2
    enc = TopKEncoder(sae, 64, torch.device("cpu"))
    full = sae.encode(x)
    for k in (1, 4, 10, 48):
        ke = enc.effective_k(k)
        ids, values = enc.encode(torch.from_numpy(x), ke)
        for r in range(len(x)):
            order = np.argsort(-full[r], kind="stable")[:k]
            want = [(int(f), float(full[r, f])) for f in order if full[r, f] > 0]
            _assert_same_top(active_pairs(ids[r], values[r]), want, f"{activation} k={k}")
    assert enc.effective_k(48) == (6 if activation == "topk" else 48)


def test_bfloat16_encoder_is_within_its_rounding():
    """In a bfloat16 model the encoder's matmul runs in bfloat16: each activation within
    bfloat16's rounding of the float32 encoding of the same rows, the top feature kept."""
    a = sae_arrays(6, 64, width=96)
    sae = SparseAutoencoder(a["W_enc"], a["b_enc"], a["W_dec"], a["b_dec"], layer=0)
    rows = torch.from_numpy(np.random.default_rng(1).standard_normal((50, 64)) * 2).bfloat16()
    full = sae.encode(rows.float().numpy())
    enc = TopKEncoder(sae, 8, torch.device("cpu"), torch.bfloat16)
    ids, values = enc.encode(rows, 8)
    got = np.take_along_axis(full, ids.astype(np.int64), axis=1)
    scale = np.abs(full).max(axis=1, keepdims=True)
    assert np.abs(values - got).max() <= 0.02 * scale.max()  # bfloat16: 8 significant bits
    assert np.mean(ids[:, 0] == full.argmax(axis=1)) >= 0.9


def test_topk_spec_errors_name_the_field(engines):
    llm = engines.get("llama", "features")
    msg = _error(llm, {"readout": [{"sae": "relu", "top_k": 4}]})
    assert "steering.readout[0]" in msg and f"reads SAE '{SAE}'" in msg
    msg = _error(llm, {"readout": [{"sae": SAE, "top_k": 25}]})
    assert "steering.readout[0]" in msg and "top_k 25" in msg and "max_topk 24" in msg
    msg = _error(llm, {"readout": [{"sae": SAE, "top_k": 0}]})
    assert "steering.readout[0].top_k" in msg
    msg = _error(llm, {"readout": [{"sae": SAE, "top_k": 2, "feature": 1}]})
    assert "steering.readout[0]" in msg and "one of 'feature'" in msg
    msg = _error(llm, {"readout": [{"top_k": 2}]})
    assert "steering.readout[0]" in msg
    msg = _error(llm, {"readout": [{"sae": SAE, "top_k": 2}, {"sae": SAE, "top_k": 3}]})
    assert "steering.readout" in msg and "at most one top-k" in msg
    msg = _error(llm, {"readout": [{"sae": SAE, "top_k": 2, "layer": 3}]})
    assert "reads layer 1, not 3" in msg
    # A readout engine without a top-k SAE says which switch turns it on.
    msg = _error(engines.get("llama", "readout"), {"readout": [{"sae": SAE, "top_k": 2}]})
    assert "--steering-topk-sae" in msg
