"""Spec validation (errors name the field) and fingerprints, without an engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from steering.compile import WINDOWS, CompiledSpec, compile_spec, token_class
from steering.spec import ModelShape, SpecContext, SpecError, parse_spec
from steering.vectors import SteeringVector, VectorRegistry

SHAPE = ModelShape(
    "LlamaForCausalLM", num_layers=4, hidden_size=8, num_heads=4, num_kv_heads=2, head_dim=4
)


def _ctx(**kw) -> SpecContext:
    reg = VectorRegistry()
    reg.add("happy", SteeringVector({1: np.ones(8), 2: np.arange(8)}, hidden_size=8))
    reg.add("wide", SteeringVector({1: np.ones(16)}, hidden_size=16))
    heads = np.arange(16, dtype=np.float32) + 1.0
    reg.add(
        "iti",
        SteeringVector(
            {1: heads, 3: -heads}, hidden_size=16, site="heads", num_heads=4, head_dim=4
        ),
    )
    reg.add(
        "iti_2x8",
        SteeringVector({1: heads}, hidden_size=16, site="heads", num_heads=2, head_dim=8),
    )
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
            {"heads": [{"layer": 4, "heads": [0]}]},
            "steering.heads[0].layer",
            "layer 4 is out of range for this model (0..3)",
        ),
        (
            {"heads": [{"layer": 1, "heads": [4]}]},
            "steering.heads[0].heads",
            "head 4 is out of range: the model has 4 query heads (0..3), grouped over 2 KV",
        ),
        ({"heads": [{"layer": 1, "heads": []}]}, "steering.heads[0].heads", "at least one"),
        ({"heads": [{"layer": 1, "heads": [1, 1]}]}, "steering.heads[0].heads", "more than once"),
        (
            {"heads": [{"layer": 1, "heads": [0], "scale": math.nan}]},
            "steering.heads[0].scale",
            "finite",
        ),
        ({"heads": [{"layer": 1}]}, "steering.heads[0].heads", "Field required"),
        ({"heads": [{"layer": 1, "heads": [0], "op": "x"}]}, "steering.heads[0].op", "Extra"),
        (
            {"heads": [{"layer": 1, "heads": [0], "target": "key"}]},
            "steering.heads[0].target",
            "'output' or 'query'",
        ),
        (
            {"vectors": [{"site": "heads", "data": {"1": [0.0] * 8}}]},
            "steering.vectors[0].data",
            "8 values, site 'heads' needs num_heads * head_dim = 4 * 4 = 16",
        ),
        (
            {"vectors": [{"site": "heads", "name": "happy"}]},
            "steering.vectors[0].name",
            "is a site 'residual' vector, the entry asks for site 'heads'",
        ),
        (
            {"vectors": [{"name": "iti"}]},
            "steering.vectors[0].name",
            "is a site 'heads' vector, the entry asks for site 'residual'",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti_2x8"}]},
            "steering.vectors[0].name",
            "made for 2 heads x 8 dims, the model has 4 x 4",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti", "op": "ablate"}]},
            "steering.vectors[0]",
            "at site 'heads' use 'add' or 'mix'",
        ),
        (
            {"vectors": [{"name": "happy", "op": "mix", "weight": 0.5}]},
            "steering.vectors[0]",
            "only available at site 'heads'",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti", "op": "mix"}]},
            "steering.vectors[0]",
            "needs 'weight' between 0 and 1",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti", "op": "mix", "weight": 1.5}]},
            "steering.vectors[0]",
            "needs 'weight' between 0 and 1",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti", "weight": 0.5}]},
            "steering.vectors[0]",
            "only used by op 'mix'",
        ),
        (
            {"vectors": [{"name": "happy", "heads": [0]}]},
            "steering.vectors[0]",
            "restricts a vector at site 'heads' only",
        ),
        (
            {"vectors": [{"site": "heads", "name": "iti", "heads": [7]}]},
            "steering.vectors[0].heads",
            "head 7 is out of range",
        ),
        (
            {
                "vectors": [
                    {
                        "site": "heads",
                        "data": {"1": [0.0] * 4 + [1.0] * 12},
                        "heads": [0],
                        "op": "mix",
                        "weight": 0.5,
                    }
                ]
            },
            "steering.vectors[0]",
            "zero on the listed heads at layer 1",
        ),
        ({"decoding": {"mode": "fuse"}}, "steering.decoding", "needs 'layer'"),
        (
            {"decoding": {"mode": "contrast", "layers": "high", "weight": 0.5}},
            "steering.decoding",
            "takes 'layers' and 'alpha' only",
        ),
        ({"decoding": {"mode": "fuse", "layer": 1}}, "steering.decoding", "needs 'weight'"),
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
    assert "at most 2 head masks" in str(
        _err({"heads": [{"layer": 0, "heads": [0]}] * 3}, max_head_masks=2)
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
    # Head masks and head-site fields are part of it (they change KV too).
    masks = [
        parse_spec({"heads": [{"layer": 1, "heads": h, "scale": sc, "positions": p}]}, ctx)
        for h, sc, p in (
            ([0], 0.0, "all"),
            ([1], 0.0, "all"),
            ([0], 0.5, "all"),
            ([0], 0.0, "generated"),
        )
    ]
    heads = [
        parse_spec({"vectors": [{"site": "heads", "name": "iti", **kw}]}, ctx)
        for kw in ({}, {"heads": [1]}, {"op": "mix", "weight": 0.5}, {"op": "mix", "weight": 0.6})
    ]
    fps = {s.fingerprint() for s in [inline, *masks, *heads]}
    assert len(fps) == 1 + len(masks) + len(heads)
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


RELS = (-5, -1, 0, 3)  # early prompt, last prompt, first generated, later generated


def _active(positions: str, rel: int) -> bool:
    lo, hi = WINDOWS[positions]
    return lo <= rel < hi


def _apply_directly(spec, layer: int, h: np.ndarray, rel: int) -> np.ndarray:
    """The formulas of docs/design.md, entry by entry, for one token (float64)."""
    h = h.astype(np.float64)
    for e in spec.vectors:
        v = e.resolved.get(layer)
        if v is None or e.site != "residual" or not _active(e.positions, rel):
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


def _apply_compiled(compiled, layer: int, h: np.ndarray, rel: int) -> np.ndarray:
    """The engine's per-layer form: projections in order, then the folded constant."""
    h = h.astype(np.float64)
    for p in compiled.projections:
        if layer in p.layers and p.lo <= rel < p.hi:
            u = p.units[list(p.layers).index(layer)].astype(np.float64)
            h = h - p.gain * (h @ u) * u
    if layer in compiled.const_layers:
        cls = int(token_class(np.array(rel)))
        h = h + compiled.const[list(compiled.const_layers).index(layer), cls]
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
                {
                    "data": {"1": v[0], "2": v[3]},
                    "op": "ablate",
                    "scale": 0.7,
                    "positions": "prompt",
                },
                {"data": {"2": v[2]}, "scale": -1.0},
                {"data": {"2": v[0]}, "scale": 3.0, "positions": "last_prompt"},
                {"data": {"1": v[3]}, "op": "clamp", "value": 0.5, "positions": "from_last_prompt"},
            ]
        },
        _ctx(),
    )
    compiled = compile_spec(spec, SHAPE)
    assert len(compiled.projections) == 3 and compiled.const_layers.tolist() == [1, 2]
    for layer in range(4):
        for rel in RELS:
            h = rng.standard_normal(8)
            np.testing.assert_allclose(
                _apply_compiled(compiled, layer, h, rel),
                _apply_directly(spec, layer, h, rel),
                rtol=1e-5,
                atol=1e-5,
            )


def _heads_directly(spec, layer: int, z: np.ndarray, rel: int) -> np.ndarray:
    """Masks then head vectors, one after the other, for one token's o_proj input."""
    z = z.astype(np.float64).reshape(4, 4).copy()
    for m in spec.heads:
        if m.layer == layer and _active(m.positions, rel):
            z[m.heads] *= m.scale
    for e in spec.vectors:
        v = e.resolved.get(layer)
        if v is None or e.site != "heads" or not _active(e.positions, rel):
            continue
        v = v.astype(np.float64)
        v = (v / np.linalg.norm(v) if e.normalize else v).reshape(4, 4)
        if e.op == "add":
            z = z + e.scale * v
        else:
            for h in range(4):
                if np.any(v[h]):
                    z[h] = (1 - e.weight) * z[h] + e.weight * v[h]
    return z.reshape(-1)


def test_compiled_head_ops_equal_sequential_application():
    rng = np.random.default_rng(4)
    w = {i: rng.standard_normal(16).tolist() for i in range(3)}
    spec = parse_spec(
        {
            "heads": [
                {"layer": 1, "heads": [0, 2], "scale": 0.0},
                {"layer": 1, "heads": [2, 3], "scale": 1.7, "positions": "generated"},
                {"layer": 2, "heads": [1], "scale": 0.5, "positions": "last_prompt"},
            ],
            "vectors": [
                {"site": "heads", "data": {"1": w[0], "2": w[1]}, "scale": 2.0},
                {
                    "site": "heads",
                    "name": "iti",
                    "op": "mix",
                    "weight": 0.3,
                    "heads": [1, 2],
                    "positions": "from_last_prompt",
                },
                {
                    "site": "heads",
                    "data": {"1": w[2]},
                    "normalize": True,
                    "scale": -3.0,
                    "heads": [3],
                    "positions": "prompt",
                },
                {"data": {"1": w[0][:8]}},  # a residual entry leaves the heads alone
            ],
        },
        _ctx(),
    )
    ops = compile_spec(spec, SHAPE).heads
    assert ops.layers.tolist() == [1, 2, 3] and ops.scale.shape == (3, 3, 4)
    # Query masks fold into their own factor and leave the output maps alone.
    with_query = parse_spec(
        {
            "heads": [
                *spec.model_dump()["heads"],
                {"layer": 1, "heads": [1, 3], "scale": 0.0, "target": "query"},
                {
                    "layer": 3,
                    "heads": [3],
                    "scale": 2.0,
                    "target": "query",
                    "positions": "generated",
                },
                {"layer": 3, "heads": [3, 0], "scale": 0.5, "target": "query"},
            ],
            "vectors": spec.model_dump(exclude_none=True)["vectors"],
        },
        _ctx(),
    )
    folded = compile_spec(with_query, SHAPE).heads
    np.testing.assert_array_equal(folded.scale, ops.scale)
    np.testing.assert_array_equal(folded.const, ops.const)
    q = {layer: folded.query[i] for i, layer in enumerate(folded.layers)}
    np.testing.assert_array_equal(q[1], np.tile([1.0, 0.0, 1.0, 0.0], (3, 1)))
    np.testing.assert_array_equal(q[2], np.ones((3, 4)))
    np.testing.assert_array_equal(q[3], [[0.5, 1, 1, 0.5], [0.5, 1, 1, 0.5], [0.5, 1, 1, 1.0]])
    for layer in range(4):
        for rel in RELS:
            z = rng.standard_normal(16)
            want = _heads_directly(spec, layer, z, rel)
            if layer not in ops.layers:
                np.testing.assert_array_equal(want, z)
                continue
            i, c = list(ops.layers).index(layer), int(token_class(np.array(rel)))
            got = (z.reshape(4, 4) * ops.scale[i, c][:, None]).reshape(-1) + ops.const[i, c]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_head_restriction_zeroes_other_heads():
    spec = parse_spec({"vectors": [{"site": "heads", "name": "iti", "heads": [1, 3]}]}, _ctx())
    per_head = spec.vectors[0].resolved[1].reshape(4, 4)
    assert not per_head[[0, 2]].any() and per_head[[1, 3]].all()
    # ... without touching the registry's copy.
    assert spec.vectors[0].resolved is not None and _ctx().vectors.get("iti").directions[1].all()


def test_compiled_payload_round_trip_and_identity():
    spec = parse_spec(
        {"vectors": [{"name": "happy"}, {"name": "happy", "op": "ablate", "layers": [2]}]},
        _ctx(),
    )
    compiled = compile_spec(spec, SHAPE)
    again = CompiledSpec.from_payload(compiled.to_payload())
    assert again.fingerprint == compiled.fingerprint and again.hidden_size == 8
    np.testing.assert_array_equal(again.const, compiled.const)
    np.testing.assert_array_equal(again.const_layers, compiled.const_layers)
    for a, b in zip(again.projections, compiled.projections, strict=True):
        np.testing.assert_array_equal(a.units, b.units)
        assert (a.lo, a.hi, a.gain, a.layers.tolist()) == (b.lo, b.hi, b.gain, b.layers.tolist())
    assert compile_spec(parse_spec({}, _ctx()), SHAPE).is_identity
    # Head ops survive the payload too; masks of scale 1 are the identity.
    heads = {
        "heads": [{"layer": 2, "heads": [1], "scale": 0.25}],
        "vectors": [{"site": "heads", "name": "iti", "op": "mix", "weight": 0.5}],
    }
    compiled = compile_spec(parse_spec(heads, _ctx()), SHAPE)
    again = CompiledSpec.from_payload(compiled.to_payload())
    assert again.heads.layers.tolist() == [1, 2, 3] and again.uses_heads
    np.testing.assert_array_equal(again.heads.scale, compiled.heads.scale)
    np.testing.assert_array_equal(again.heads.const, compiled.heads.const)
    unit_mask = {"heads": [{"layer": 2, "heads": [0, 1], "scale": 1.0}]}
    assert compile_spec(parse_spec(unit_mask, _ctx()), SHAPE).is_identity
    # Adds that cancel fold to nothing at all.
    cancel = {
        "vectors": [
            {"name": "happy", "layers": [1]},
            {"name": "happy", "layers": [1], "scale": -1.0},
        ]
    }
    assert compile_spec(parse_spec(cancel, _ctx()), SHAPE).is_identity


def test_readme_head_examples_are_valid_specs():
    """The README's one-example-per-method table holds specs that validate as written."""
    import json
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text[text.index("One example per published method") :]
    table = table[: table.index("\n\n", table.index("|---|"))]
    shape = ModelShape("LlamaForCausalLM", 32, 4096, num_heads=32, num_kv_heads=8, head_dim=128)
    reg = VectorRegistry()
    for name in ("iti_truthful", "task_antonym"):
        data = {i: np.ones(4096, dtype=np.float32) for i in range(32)}
        reg.add(name, SteeringVector(data, 4096, site="heads", num_heads=32, head_dim=128))
    specs = []
    for snippet in re.findall(r"`(\{[^`]*\})`", table):
        try:
            raw = json.loads(snippet)
        except json.JSONDecodeError:
            continue  # a fragment such as `"scale": 2.0`
        specs.append(parse_spec(raw, SpecContext(shape, vectors=reg)))
    assert len(specs) >= 5
    assert any(s.heads for s in specs) and any(e.op == "mix" for s in specs for e in s.vectors)
