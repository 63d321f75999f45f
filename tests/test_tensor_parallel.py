"""Head interventions under tensor parallelism: each rank applies its own slice of heads.

The slicing is tested directly (rank tables and rank ops against the full ones), and a
real tensor_parallel_size=2 CPU engine is checked against the reference oracle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ENGINE_KW, prompt_ids

from steering.compile import NUM_CLASSES, compile_spec
from steering.engine.layers import apply_head_ops, apply_query_ops
from steering.engine.tables import SteeringTables, local_heads
from steering.spec import ModelShape, SpecContext, parse_spec

SHAPE = ModelShape("LlamaForCausalLM", 3, 16, num_heads=4, num_kv_heads=2, head_dim=8)


def test_local_heads_are_contiguous_blocks():
    assert [local_heads(8, r, 4) for r in range(4)] == [
        range(0, 2),
        range(2, 4),
        range(4, 6),
        range(6, 8),
    ]
    assert local_heads(4, 0, 1) == range(0, 4)
    with pytest.raises(ValueError, match="do not split over 3"):
        local_heads(4, 0, 3)


def _tables(heads: range) -> SteeringTables:
    return SteeringTables(
        num_layers=SHAPE.num_layers,
        hidden_size=SHAPE.hidden_size,
        num_slots=3,
        max_proj=1,
        max_tokens=8,
        dtype=torch.float32,
        device=torch.device("cpu"),
        heads=heads,
        head_dim=SHAPE.head_dim,
    )


def test_rank_tables_and_ops_are_slices_of_the_full_ones():
    rng = np.random.default_rng(0)
    raw = {
        "heads": [
            {"layer": 1, "heads": [0, 3], "scale": 0.0},
            {"layer": 0, "heads": [1, 2], "scale": 0.0, "target": "query"},
            {"layer": 2, "heads": [1, 2], "scale": 1.5, "positions": "generated"},
        ],
        "vectors": [
            {
                "site": "heads",
                "data": {"1": rng.standard_normal(32).tolist()},
                "heads": [1, 2],
                "op": "mix",
                "weight": 0.25,
            },
            {"site": "heads", "data": {"2": rng.standard_normal(32).tolist()}},
        ],
    }
    compiled = compile_spec(parse_spec(raw, SpecContext(SHAPE)), SHAPE)
    full = _tables(local_heads(4, 0, 1))
    ranks = [_tables(local_heads(4, r, 2)) for r in range(2)]
    for t in (full, *ranks):
        t.write_slot(2, compiled)
        # Tokens: slot 2 in each class, then the identity slot.
        t.tok_const[:4] = torch.tensor(
            [2 * NUM_CLASSES, 2 * NUM_CLASSES + 1, 2 * NUM_CLASSES + 2, 0]
        )
    np.testing.assert_array_equal(
        torch.cat([r.head_scale for r in ranks], dim=-1).numpy(), full.head_scale.numpy()
    )
    np.testing.assert_array_equal(
        torch.cat([r.head_const for r in ranks], dim=-1).numpy(), full.head_const.numpy()
    )
    np.testing.assert_array_equal(
        torch.cat([r.query_scale for r in ranks], dim=-1).numpy(), full.query_scale.numpy()
    )
    q = torch.randn(4, 4, 8)  # [T, H, D]: 3-D queries keep their shape
    torch.testing.assert_close(
        torch.cat([apply_query_ops(r, 0, q[:, 2 * i : 2 * i + 2]) for i, r in enumerate(ranks)], 1),
        apply_query_ops(full, 0, q),
        rtol=0,
        atol=0,
    )
    assert not apply_query_ops(full, 0, q)[:3, 1:3].any() and torch.equal(
        apply_query_ops(full, 0, q)[3], q[3]
    )
    z = torch.randn(4, 32)
    for layer in range(SHAPE.num_layers):
        want = apply_head_ops(full, layer, z)
        got = torch.cat(
            [apply_head_ops(r, layer, z[:, 16 * i : 16 * (i + 1)]) for i, r in enumerate(ranks)],
            dim=-1,
        )
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(want[3], z[3])  # identity slot: untouched
    assert not torch.equal(apply_head_ops(full, 1, z), z)


W = np.random.default_rng(9).standard_normal(256) * 0.5
TP_SPECS = [
    None,
    {"heads": [{"layer": 1, "heads": [0, 3]}, {"layer": 2, "heads": [2], "scale": 2.0}]},
    {
        "heads": [
            {"layer": 3, "heads": [1, 2], "scale": 0.0, "positions": "generated"},
            {"layer": 1, "heads": [0, 3], "target": "query"},
        ]
    },
    {
        "vectors": [
            {"site": "heads", "op": "mix", "weight": 0.6, "data": {"1": W.tolist()}},
            {"site": "heads", "data": {"2": W.tolist()}, "heads": [3], "scale": 3.0},
            {"data": {"1": (W[:128] * 4).tolist()}},
        ]
    },
]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on CPU binds one core per rank")
def test_tensor_parallel_engine_matches_reference(engines, model_dirs, tmp_path):
    out = tmp_path / "tp.json"
    prompts = [prompt_ids(300 + i, n) for i, n in enumerate([10, 40, 7, 20])]
    engine = {k: v for k, v in ENGINE_KW.items() if k != "disable_log_stats"}
    job = {
        "model": str(model_dirs["llama"]),
        "engine": dict(engine, enforce_eager=True),
        "prompts": prompts,
        "specs": TP_SPECS,
        "max_tokens": 6,
        "out": str(out),
    }
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_USE_V2_MODEL_RUNNER="0")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("tp_run.py"))],
        input=json.dumps(job),
        text=True,
        capture_output=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["local_heads"] == [[0, 2], [2, 4]]  # each rank holds its own heads
    ref = engines.reference("llama")
    plain = ref.greedy(prompts[0], 6)[0]
    for prompt, raw, run in zip(prompts, TP_SPECS, result["runs"], strict=True):
        spec = ref.spec(raw) if raw else None
        assert run["tokens"] == ref.greedy(prompt, 6, spec)[0], raw
        want = ref.score(prompt, run["tokens"], spec)
        err = np.max(np.abs(np.array(run["logprobs"]) - want))
        assert err <= 1e-4, f"{raw}: max |TP engine - reference| = {err:.2e}"
        if raw is not None:  # the spec has an effect, so matching it means something
            assert np.max(np.abs(np.array(want) - ref.score(prompt, run["tokens"]))) > 1e-3
    assert result["runs"][0]["tokens"] == plain


def test_worker_refuses_a_spec_compiled_for_other_heads():
    from types import SimpleNamespace

    from steering.compile import PAYLOAD_KEY
    from steering.engine.runtime import SteeringRuntime

    runtime = SteeringRuntime(_tables(local_heads(4, 1, 2)), max_rows=2)
    raw = {"heads": [{"layer": 0, "heads": [3]}]}
    good = compile_spec(parse_spec(raw, SpecContext(SHAPE)), SHAPE)
    other = ModelShape("LlamaForCausalLM", 3, 16, num_heads=2, num_kv_heads=2, head_dim=16)
    bad = compile_spec(
        parse_spec(raw | {"heads": [{"layer": 0, "heads": [1]}]}, SpecContext(other)), other
    )

    def params(spec):  # the runner's CachedRequestState, as far as the runtime reads it
        extra_args = {PAYLOAD_KEY: spec.to_payload()}
        return SimpleNamespace(
            sampling_params=SimpleNamespace(extra_args=extra_args), num_prompt_tokens=4
        )

    assert runtime._register("good", params(good)) is not None
    assert runtime._register("bad", params(bad)) is None  # logged, runs unsteered
