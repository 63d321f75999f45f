"""Spec validation (errors name the field) and fingerprints, without an engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steering.compile import CompiledSpec, compile_spec
from steering.spec import ModelShape, SpecContext, SpecError, parse_spec
from steering.vectors import SteeringVector, VectorRegistry

SHAPE = ModelShape("LlamaForCausalLM", num_layers=4, hidden_size=8)


def _ctx(**kw) -> SpecContext:
    reg = VectorRegistry()
    reg.add("happy", SteeringVector({1: np.ones(8), 2: np.arange(8)}, hidden_size=8))
    reg.add("wide", SteeringVector({1: np.ones(16)}, hidden_size=16))
    return SpecContext(SHAPE, vectors=reg, **kw)


def _err(raw, **kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(raw, _ctx(**kw))
    return info.value


@pytest.mark.parametrize(
    "raw, field, reason",
    [
        ({"vectors": [{"name": "nope"}]}, "steering.vectors[0].name", "unknown vector 'nope'"),
        ({"vectors": [{"name": "wide"}]}, "steering.vectors[0].name", "hidden size 16"),
        (
            {"vectors": [{"name": "happy", "layers": [4]}]},
            "steering.vectors[0].layers",
            "layer 4 is out of range for this model (0..3)",
        ),
        (
            {"vectors": [{"name": "happy", "layers": [-1]}]},
            "steering.vectors[0].layers",
            "out of range",
        ),
        (
            {"vectors": [{"name": "happy", "layers": [3]}]},
            "steering.vectors[0]",
            "has no data for layer(s) [3]",
        ),
        (
            {"vectors": [{"data": {"1": [0.0] * 7}}]},
            "steering.vectors[0].data",
            "7 values, the model's hidden size is 8",
        ),
        (
            {"vectors": [{"data": {"9": [0.0] * 8}}]},
            "steering.vectors[0].data",
            "layer 9 is out of range",
        ),
        (
            {"vectors": [{"data": {"1": [math.nan] * 8}}]},
            "steering.vectors[0].data[1]",
            "not finite numbers (8 of them, first at index 0)",
        ),
        (
            {"vectors": [{"data": {"1": [1.0] * 8}, "scale": math.inf}]},
            "steering.vectors[0].scale",
            "finite",
        ),
        (
            {"vectors": [{"name": "happy", "data": {"1": [0.0] * 8}}]},
            "steering.vectors[0]",
            "exactly one of 'name'",
        ),
        ({"vectors": [{}]}, "steering.vectors[0]", "exactly one of 'name'"),
        ({"vectors": [{"name": "happy", "op": "clamp"}]}, "steering.vectors[0]", "needs 'value'"),
        ({"vectors": [{"name": "happy", "value": 1.0}]}, "steering.vectors[0]", "only used by"),
        ({"vectors": [{"name": "happy", "op": "multiply"}]}, "steering.vectors[0].op", "'add'"),
        (
            {"vectors": [{"name": "happy", "positions": "last"}]},
            "steering.vectors[0].positions",
            "'generated'",
        ),
        (
            {"vectors": [{"data": {"1": [0.0] * 8}, "op": "ablate"}]},
            "steering.vectors[0]",
            "zero at layer 1",
        ),
        (
            {"heads": [{"layer": 1, "heads": [0], "scale": 0}]},
            "steering.heads",
            "not supported yet",
        ),
        ({"decoding": {"mode": "fuse"}}, "steering.decoding", "not supported yet"),
        ({"vector": []}, "steering.vector", "Extra inputs are not permitted"),
        ({"preset": "calm"}, "steering.preset", "unknown preset 'calm'"),
        ("not json", "steering", "Invalid JSON"),
        ([1, 2], "steering", "must be an object"),
    ],
)
def test_errors_name_the_field(raw, field, reason):
    err = _err(raw)
    fields = [loc for loc, _ in err.errors]
    assert field in fields, f"{field} not in {fields}: {err}"
    assert reason in str(err), str(err)


def test_limits():
    assert "at most 2 vector entries" in str(
        _err({"vectors": [{"name": "happy"}] * 3}, max_vectors=2)
    )
    assert "limit of 10" in str(
        _err({"vectors": [{"data": {"1": [0.0] * 8, "2": [0.0] * 8}}]}, max_inline_floats=10)
    )


def test_resolution_and_layers_subset():
    spec = parse_spec({"vectors": [{"name": "happy", "layers": [2]}]}, _ctx())
    assert list(spec.vectors[0].resolved) == [2]
    np.testing.assert_array_equal(spec.vectors[0].resolved[2], np.arange(8, dtype=np.float32))
    spec = parse_spec('{"vectors": [{"name": "happy"}]}', _ctx())
    assert sorted(spec.vectors[0].resolved) == [1, 2]


def test_fingerprint_is_content_based_and_stable():
    ctx = _ctx()
    by_name = parse_spec({"vectors": [{"name": "happy", "layers": [1]}]}, ctx)
    inline = parse_spec({"vectors": [{"data": {"1": [1.0] * 8}}]}, ctx)
    assert by_name.fingerprint() == inline.fingerprint()
    assert by_name.fingerprint() == parse_spec(by_name.model_dump(), ctx).fingerprint()
    other = parse_spec({"vectors": [{"data": {"1": [1.0] * 8}, "scale": 1.5}]}, ctx)
    prompt_only = parse_spec({"vectors": [{"data": {"1": [1.0] * 8}, "positions": "prompt"}]}, ctx)
    assert len({inline.fingerprint(), other.fingerprint(), prompt_only.fingerprint()}) == 3
    # Replacing a registered vector's content changes the fingerprint of specs naming it.
    ctx.vectors.add("happy", SteeringVector({1: 2 * np.ones(8)}, hidden_size=8))
    assert parse_spec({"vectors": [{"name": "happy"}]}, ctx).fingerprint() != by_name.fingerprint()


def test_presets_expand_before_request_vectors():
    ctx = _ctx(presets={"calm": {"vectors": [{"name": "happy", "layers": [1]}]}})
    spec = parse_spec({"preset": "calm", "vectors": [{"data": {"2": [0.5] * 8}}]}, ctx)
    assert [sorted(v.resolved) for v in spec.vectors] == [[1], [2]]
    bad = SpecContext(SHAPE, vectors=ctx.vectors, presets={"x": {"vectors": [{"name": "nope"}]}})
    with pytest.raises(SpecError, match=r"preset 'x'\.vectors\[0\]\.name"):
        parse_spec({"preset": "x"}, bad)


def test_compile_merges_consecutive_adds_and_keeps_order():
    ctx = _ctx()
    spec = parse_spec(
        {
            "vectors": [
                {"data": {"1": [1.0] * 8}, "scale": 2.0},
                {"data": {"1": [0.5] * 8, "2": [1.0] * 8}},
                {"data": {"1": [1.0] * 8}, "op": "ablate"},
                {"data": {"1": [1.0] * 8}, "positions": "generated"},
            ]
        },
        ctx,
    )
    compiled = compile_spec(spec)
    assert len(compiled.ops) == 3
    merged, ablate, late = compiled.ops
    assert merged.is_add and merged.layers.tolist() == [1, 2]
    np.testing.assert_allclose(merged.vectors[0], 2.5)
    assert (ablate.coef, ablate.gain) == (0.0, 1.0)
    np.testing.assert_allclose(np.linalg.norm(ablate.vectors[0]), 1.0, rtol=1e-6)
    assert late.lo == 0 and merged.lo < 0
    again = CompiledSpec.from_payload(compiled.to_payload())
    assert again.fingerprint == compiled.fingerprint
    for a, b in zip(again.ops, compiled.ops, strict=True):
        np.testing.assert_array_equal(a.vectors, b.vectors)
        assert (a.lo, a.hi, a.coef, a.gain) == (b.lo, b.hi, b.coef, b.gain)
