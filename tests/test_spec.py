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


def _apply_directly(spec, layer: int, h: np.ndarray, generated: bool) -> np.ndarray:
    """DESIGN.md's formulas, entry by entry, for one token (float64)."""
    h = h.astype(np.float64)
    for e in spec.vectors:
        v = e.resolved.get(layer)
        if v is None or e.positions == ("prompt" if generated else "generated"):
            continue
        v = v.astype(np.float64)
        u = v / np.linalg.norm(v)
        if e.op == "add":
            h = h + e.scale * (u if e.normalize else v)
        elif e.op == "ablate":
            h = h - e.scale * (h @ u) * u
        else:
            h = h + (e.value - h @ u) * u
    return h


def _apply_compiled(compiled, layer: int, h: np.ndarray, generated: bool) -> np.ndarray:
    """The engine's per-layer form: projections in order, then the folded constant."""
    h = h.astype(np.float64)
    rel = 0 if generated else -1
    for p in compiled.projections:
        if layer in p.layers and p.lo <= rel < p.hi:
            u = p.units[list(p.layers).index(layer)].astype(np.float64)
            h = h - p.gain * (h @ u) * u
    if layer in compiled.const_layers:
        h = h + compiled.const[list(compiled.const_layers).index(layer), int(generated)]
    return h


def test_compiled_form_equals_sequential_application():
    rng = np.random.default_rng(3)
    v = {i: rng.standard_normal(8).tolist() for i in range(4)}
    spec = parse_spec(
        {
            "vectors": [
                {"data": {"1": v[0]}, "scale": 2.0},
                {"data": {"1": v[1], "2": v[1]}, "op": "clamp", "value": 1.5},
                {"data": {"1": v[2]}, "positions": "generated", "normalize": True},
                {"data": {"1": v[0], "2": v[3]}, "op": "ablate", "scale": 0.7,
                 "positions": "prompt"},
                {"data": {"2": v[2]}, "scale": -1.0},
            ]
        },
        _ctx(),
    )  # fmt: skip
    compiled = compile_spec(spec, 8)
    assert len(compiled.projections) == 2 and compiled.const_layers.tolist() == [1, 2]
    for layer in range(4):
        for generated in (False, True):
            h = rng.standard_normal(8)
            np.testing.assert_allclose(
                _apply_compiled(compiled, layer, h, generated),
                _apply_directly(spec, layer, h, generated),
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip


def test_compiled_payload_round_trip_and_identity():
    spec = parse_spec(
        {"vectors": [{"name": "happy"}, {"name": "happy", "op": "ablate", "layers": [2]}]},
        _ctx(),
    )
    compiled = compile_spec(spec, 8)
    again = CompiledSpec.from_payload(compiled.to_payload())
    assert again.fingerprint == compiled.fingerprint and again.hidden_size == 8
    np.testing.assert_array_equal(again.const, compiled.const)
    np.testing.assert_array_equal(again.const_layers, compiled.const_layers)
    for a, b in zip(again.projections, compiled.projections, strict=True):
        np.testing.assert_array_equal(a.units, b.units)
        assert (a.lo, a.hi, a.gain, a.layers.tolist()) == (b.lo, b.hi, b.gain, b.layers.tolist())
    assert compile_spec(parse_spec({}, _ctx()), 8).is_identity
    # Adds that cancel fold to nothing at all.
    cancel = {"vectors": [{"name": "happy", "layers": [1]},
                          {"name": "happy", "layers": [1], "scale": -1.0}]}  # fmt: skip
    assert compile_spec(parse_spec(cancel, _ctx()), 8).is_identity
