"""Engine behaviour around requests: bad specs, named/GGUF vectors, slots, compiled path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import HIDDEN, generate, generate_one, prompt_ids, random_vector, sampling

from steering.engine.hooks import runtime_of

PROMPT = prompt_ids(50, 14)
GOOD = {"vectors": [{"name": "happy", "scale": 1.0}]}


@pytest.mark.parametrize(
    "raw, field, reason",
    [
        ({"vectors": [{"name": "nope"}]}, "steering.vectors[0].name", "unknown vector 'nope'"),
        (
            {"vectors": [{"name": "happy", "layers": [9]}]},
            "steering.vectors[0].layers",
            "out of range",
        ),
        ({"vectors": [{"data": {"1": [0.1] * 5}}]}, "steering.vectors[0].data", "hidden size"),
        (
            {"vectors": [{"data": {"1": [0.0] * 5 + [math.nan] * (HIDDEN - 5)}}]},
            "steering.vectors[0].data[1]",
            "not finite numbers (123 of them, first at index 5)",
        ),
        (
            {"vectors": [{"name": "happy", "data": {"1": [0.1] * HIDDEN}}]},
            "steering.vectors[0]",
            "exactly one",
        ),
        (
            {"vectors": [{"name": "broken"}]},
            "steering.vectors[0].name",
            "failed to load (broken.safetensors",
        ),
        (
            {"heads": [{"layer": 4, "heads": [0], "scale": 0.0}]},
            "steering.heads[0].layer",
            "layer 4 is out of range for this model (0..3)",
        ),
        (
            {"heads": [{"layer": 0, "heads": [1, 4]}]},
            "steering.heads[0].heads",
            "head 4 is out of range: the model has 4 query heads (0..3), grouped over 2 KV heads",
        ),
        (
            {"heads": [{"layer": 0, "heads": [1], "scale": math.inf}]},
            "steering.heads[0].scale",
            "finite",
        ),
        (
            {"vectors": [{"site": "heads", "data": {"1": [0.1] * HIDDEN}}]},
            "steering.vectors[0].data",
            f"{HIDDEN} values, site 'heads' needs num_heads * head_dim = 4 * 64 = 256",
        ),
        (
            {"vectors": [{"site": "heads", "name": "happy"}]},
            "steering.vectors[0].name",
            "is a site 'residual' vector",
        ),
        (
            {
                "vectors": [{"name": "happy", "op": "ablate", "layers": [1]}] * 2
                + [{"name": "happy", "op": "clamp", "value": 1.0, "layers": [2]}]
            },
            "steering.vectors",
            "uses 3 ablate/clamp entries; this engine allows 2",
        ),
    ],
)
def test_bad_spec_is_a_clear_error_and_engine_keeps_serving(engines, raw, field, reason):
    from vllm.exceptions import VLLMValidationError

    llm = engines.get("llama")
    before = generate_one(llm, PROMPT, sampling(GOOD))
    with pytest.raises(VLLMValidationError) as info:
        generate(llm, [PROMPT, PROMPT], [sampling(GOOD), sampling(raw)])
    assert info.value.parameter == field, str(info.value)
    assert reason in str(info.value)
    after = generate_one(llm, PROMPT, sampling(GOOD))
    assert after.tokens == before.tokens and after.logprobs == before.logprobs


def test_named_safetensors_gguf_and_inline_steer_identically(engines, vectors_dir):
    from steering.vectors import load_vector

    llm = engines.get("llama")
    happy = load_vector(vectors_dir / "happy.safetensors")
    inline = {str(k): v.tolist() for k, v in happy.directions.items()}
    runs = generate(
        llm,
        [PROMPT] * 3,
        [
            sampling({"vectors": [{"name": "happy", "scale": 0.7}]}),
            sampling({"vectors": [{"name": "happy_gguf", "scale": 0.7}]}),
            sampling({"vectors": [{"data": inline, "scale": 0.7}]}),
        ],
    )
    assert runs[0].tokens == runs[1].tokens == runs[2].tokens
    assert runs[0].logprobs == runs[1].logprobs == runs[2].logprobs
    plain = generate_one(llm, PROMPT, sampling(None))
    assert plain.logprobs != runs[0].logprobs


def test_named_head_vector_from_registry(engines, vectors_dir):
    from steering.vectors import load_vector

    llm = engines.get("llama")
    iti = load_vector(vectors_dir / "iti_heads.safetensors")
    assert (iti.site, iti.num_heads, iti.head_dim) == ("heads", 4, 64)
    inline = {str(k): v.tolist() for k, v in iti.directions.items()}
    common = {"site": "heads", "op": "mix", "weight": 0.5, "heads": [0, 2]}
    named, by_data = generate(
        llm,
        [PROMPT] * 2,
        [
            sampling({"vectors": [{"name": "iti_heads", **common}]}),
            sampling({"vectors": [{"data": inline, **common}]}),
        ],
    )
    assert named.logprobs == by_data.logprobs
    assert named.logprobs != generate_one(llm, PROMPT, sampling(None)).logprobs


def test_engine_without_head_ops_refuses_head_specs(engines):
    from vllm.exceptions import VLLMValidationError

    llm, full = engines.get("llama", "noheads"), engines.get("llama")
    assert llm.collective_rpc(lambda w: runtime_of(w.model_runner).tables.head_scale) == [None]
    raw = {
        "heads": [{"layer": 1, "heads": [0]}],
        "vectors": [{"site": "heads", "name": "iti_heads"}],
    }
    with pytest.raises(VLLMValidationError) as info:
        generate_one(llm, PROMPT, sampling(raw))
    assert info.value.parameter == "steering.heads"
    assert "steering.vectors[0].site: head interventions are off" in str(info.value)
    with pytest.raises(VLLMValidationError, match="needs an engine started with layer-reading"):
        generate_one(llm, PROMPT, sampling({"decoding": {"mode": "contrast", "layers": "low"}}))
    # Residual steering is unaffected, and matches the engine that has head tables.
    a, b = generate_one(llm, PROMPT, sampling(GOOD)), generate_one(full, PROMPT, sampling(GOOD))
    assert a.logprobs == b.logprobs


def _live_slots(worker) -> int:
    return runtime_of(worker.model_runner).live_slots


def _tracked_requests(worker) -> int:
    """Steered requests the worker still holds a slot reference for."""
    return sum(spec is not None for spec in runtime_of(worker.model_runner).req_spec.values())


def _slot_loads(worker) -> int:
    return runtime_of(worker.model_runner).bank.loads


def test_slots_shared_by_fingerprint_and_freed(engines):
    llm = engines.get("llama")
    # Nine requests, three distinct specs (of vectors no other test uses): three slot loads.
    specs = [{"vectors": [{"data": {"1": random_vector(60 + i % 3).tolist()}}]} for i in range(9)]
    loads = llm.collective_rpc(_slot_loads)[0]
    generate(llm, [prompt_ids(60 + i, 8) for i in range(9)], [sampling(s) for s in specs])
    assert llm.collective_rpc(_slot_loads)[0] - loads == 3
    # vLLM tells the worker about finished requests with the next step, as it does for its
    # own per-request state: run one, then every slot reference is gone.
    generate_one(llm, PROMPT, sampling(None, max_tokens=1))
    assert llm.collective_rpc(_live_slots) == [0]
    assert llm.collective_rpc(_tracked_requests) == [0]

    # An aborted request frees its slot too.
    engine = llm.llm_engine
    engine.add_request("abort-me", {"prompt_token_ids": PROMPT}, sampling(specs[0], max_tokens=50))
    engine.step()
    engine.step()
    assert llm.collective_rpc(_live_slots) == [1]
    engine.abort_request(["abort-me"])
    generate_one(llm, PROMPT, sampling(None, max_tokens=2))  # a step carries the abort
    assert llm.collective_rpc(_live_slots) == [0]
    assert llm.collective_rpc(_tracked_requests) == [0]


def test_compiled_path_matches_reference_and_eager(engines):
    llm, eager, ref = engines.get("llama", "compiled"), engines.get("llama"), engines.reference()
    v = random_vector(70).tolist()
    w = (np.random.default_rng(74).standard_normal(256) * 0.5).tolist()
    specs = [
        {"vectors": [{"data": {"1": v}, "scale": 1.0}, {"data": {"2": v}, "op": "ablate"}]},
        {"vectors": [{"data": {"0": v}, "op": "clamp", "value": 3.0, "positions": "generated"}]},
        None,
        {
            "heads": [
                {"layer": 1, "heads": [0, 3]},
                {"layer": 2, "heads": [1], "scale": 2.0},
                {"layer": 3, "heads": [2], "target": "query"},
            ]
        },
        {
            "vectors": [
                {
                    "site": "heads",
                    "op": "mix",
                    "weight": 0.5,
                    "data": {"2": w},
                    "positions": "from_last_prompt",
                },
                {"site": "heads", "data": {"3": w}, "heads": [2]},
            ]
        },
    ]
    prompts = [
        prompt_ids(71, 10),
        prompt_ids(72, 80),
        prompt_ids(73, 6),
        prompt_ids(75, 20),
        prompt_ids(76, 40),
    ]
    runs = generate(llm, prompts, [sampling(s, max_tokens=8) for s in specs])
    eager_runs = generate(eager, prompts, [sampling(s, max_tokens=8) for s in specs])
    for prompt, raw, run, er in zip(prompts, specs, runs, eager_runs, strict=True):
        spec = ref.spec(raw) if raw else None
        assert run.tokens == ref.greedy(prompt, 8, spec)[0]
        assert np.max(np.abs(np.array(run.logprobs) - ref.score(prompt, run.tokens, spec))) <= 1e-4
        assert run.tokens == er.tokens


def _compile_hash_with_and_without_marker(worker) -> tuple[str, str]:
    from steering.engine.hooks import COMPILE_CACHE_KEY

    config = worker.model_runner.vllm_config
    marked = config.compute_hash()
    marker = config.additional_config.pop(COMPILE_CACHE_KEY)
    try:
        return marked, config.compute_hash()
    finally:
        config.additional_config[COMPILE_CACHE_KEY] = marker


def test_compile_cache_key_differs_from_plain_vllm(engines):
    # vLLM's AOT compile cache is keyed by this hash; a plain engine started with the same
    # flags must not hand its graph (without steering ops) to a steered one, or back.
    [(marked, plain)] = engines.get("llama", "compiled").collective_rpc(
        _compile_hash_with_and_without_marker
    )
    assert marked != plain


def test_seeded_sampling_survives_chunked_prefill_and_is_exact(engines):
    """vLLM 0.32 on CPU dies on a seeded request whose prompt spans several steps (it
    rewinds a CPU generator by an offset it does not have); `seeded.py` undoes the
    discarded draws instead. Exactness: the chunked run (3 discarded draws) samples the
    same tokens as a prefix-cache hit of the same prompt, which has no discarded draw."""
    from vllm import SamplingParams

    llm = engines.get("llama")
    prompt = prompt_ids(77, 6 * 32 + 8)  # 200 tokens: 4 steps of a 64-token budget

    def params(seed: int, steering=None) -> SamplingParams:
        extra = {"steering": steering} if steering else None
        return SamplingParams(
            temperature=1.0, seed=seed, max_tokens=8, ignore_eos=True, logprobs=1, extra_args=extra
        )

    chunked = generate_one(llm, prompt, params(7))
    assert chunked.num_cached_tokens == 0
    cached = generate_one(llm, prompt, params(7))
    assert cached.num_cached_tokens >= 6 * 32
    assert cached.tokens == chunked.tokens
    # Beside other seeded long prompts, steered ones and unseeded ones: still the same.
    spec = {"vectors": [{"data": {"1": random_vector(3).tolist()}, "scale": 0.5}]}
    batch = generate(
        llm,
        [prompt_ids(78, 150), prompt, prompt_ids(79, 140), prompt_ids(80, 20)],
        [params(9), params(7), params(11, spec), sampling(None)],
    )
    assert batch[1].tokens == chunked.tokens
    assert all(len(run.tokens) == 8 for run in batch)
    assert generate_one(llm, prompt, params(8)).tokens != chunked.tokens  # the seed matters
