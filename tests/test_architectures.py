"""The architecture map as far as it goes without an engine of each family: what the configs
say (heads per layer, experts per layer), what validation and the capabilities document make
of it, the reference on a hybrid model vLLM's CPU build cannot run, and the refusal of
architectures that are not verified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ENGINE_KW

from steering.capabilities import describe
from steering.engine.architectures import (
    MAPPED_NOT_VERIFIED,
    VERIFIED_ARCHITECTURES,
    UnsupportedModelError,
    refusal,
)
from steering.engine.config import SteeringConfig
from steering.spec import ModelShape, SpecContext, SpecError, parse_spec
from steering.tiny_models import build_tiny_model, tiny_spec


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    names = ("qwen3_5", "qwen3_moe", "llama4", "mixtral", "olmo2")
    return {f: build_tiny_model(root / f, tiny_spec(f)) for f in names}


def _shape(path) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(path))


def test_hybrid_model_has_heads_on_its_full_attention_layers_only(family_dirs):
    shape = _shape(family_dirs["qwen3_5"])
    assert shape.architecture == "Qwen3_5ForCausalLM"
    assert shape.attention_layers == (3,)
    ctx = SpecContext(shape)
    w = shape.width("heads")
    parse_spec(
        {"heads": [{"layer": 3, "heads": [0]}], "vectors": [{"data": {"0": [1.0] * 128}}]}, ctx
    )
    with pytest.raises(SpecError, match=r"heads\[0\]\.layer: layer 0 has no attention heads"):
        parse_spec({"heads": [{"layer": 0, "heads": [0]}]}, ctx)
    with pytest.raises(SpecError, match=r"layer 1 has no attention heads.*layers: \[3\]"):
        parse_spec({"vectors": [{"site": "heads", "data": {"1": [1.0] * w}}]}, ctx)
    doc = describe("tiny", ctx, SteeringConfig())
    assert [layer["attention_heads"] for layer in doc["layers"]] == [0, 0, 0, shape.num_heads]
    assert doc["fields"]["heads"]["layers"] == [3]
    assert not doc["verified_architecture"]


@pytest.mark.parametrize(
    "family, experts",
    [("qwen3_moe", (4, 4, 4, 0)), ("llama4", (0, 4, 0, 4)), ("mixtral", (4, 4, 4, 4))],
)
def test_experts_per_layer_follow_each_configs_sparsity_rule(family_dirs, family, experts):
    shape = _shape(family_dirs[family])
    assert shape.layer_experts == experts
    doc = describe("tiny", SpecContext(shape), None)
    assert [layer["experts"] for layer in doc["layers"]] == list(experts)
    assert doc["fields"] == {} and not doc["steering_enabled"]


def test_reference_steers_the_hybrid_model(family_dirs):
    """vLLM's CPU build cannot start Qwen3.5 here; the oracle side of it runs: residual,
    head and query steering each change the full-attention model's output."""
    from steering.reference import ReferenceModel

    ref = ReferenceModel(family_dirs["qwen3_5"])
    ids = list(range(20, 40))
    plain = ref.logprobs(ids, len(ids), None)
    v = np.random.default_rng(0).standard_normal(128).tolist()
    for raw in (
        {"vectors": [{"data": {"1": v}, "scale": 4.0}]},
        {"heads": [{"layer": 3, "heads": [0, 1], "scale": 0.0}]},
        {"heads": [{"layer": 3, "heads": [0, 1, 2, 3], "scale": 5.0, "target": "query"}]},
    ):
        steered = ref.logprobs(ids, len(ids), ref.spec(raw))
        assert float((steered - plain).abs().max()) > 1e-3, raw
    # Without a spec the hooks are gone: the model is what it was.
    assert torch.equal(ref.logprobs(ids, len(ids), None), plain)


def test_unverified_architecture_is_refused_at_start_naming_why(family_dirs):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor

    kw = dict(ENGINE_KW, enforce_eager=True)
    config = EngineArgs(str(family_dirs["olmo2"]), **kw).create_engine_config()
    with pytest.raises(UnsupportedModelError, match="Transformers modeling backend"):
        InputProcessor(config)
    # Served plain when the user switches steering off.
    config.additional_config = {"steerserve": {"enabled": False}}
    InputProcessor(config)


def test_verified_and_mapped_lists_are_disjoint_and_every_refusal_says_how_to_serve():
    assert not VERIFIED_ARCHITECTURES & set(MAPPED_NOT_VERIFIED)
    for arch in [*MAPPED_NOT_VERIFIED, "SomeNewForCausalLM"]:
        why = refusal(arch)
        assert why is not None and "STEERSERVE_DISABLE=1" in why and arch in why
    assert refusal("LlamaForCausalLM") is None


def test_expert_masks_are_validated_against_the_moe_layers(family_dirs):
    shape = _shape(family_dirs["qwen3_moe"])  # 4 experts, top-2, layers 0-2 sparse
    ctx = SpecContext(shape)
    ok = parse_spec(
        {
            "experts": [
                {"layer": 0, "experts": [3, 1], "scale": 0.0},
                {"layer": 2, "experts": [0], "scale": 2.0, "positions": "generated"},
            ]
        },
        ctx,
    )
    assert ok.experts[0].experts == [1, 3]
    assert (
        ok.fingerprint()
        != parse_spec({"experts": [{"layer": 0, "experts": [1]}]}, ctx).fingerprint()
    )
    for raw, words in (
        ({"layer": 3, "experts": [0]}, r"experts\[0\]\.layer: layer 3 has no routed experts"),
        ({"layer": 0, "experts": [4]}, r"expert\(s\) \[4\] out of range: layer 0 has 4"),
        ({"layer": 0, "experts": [0], "scale": -1.0}, "must be >= 0"),
        ({"layer": 0, "experts": [1, 2, 3]}, "would keep 1 expert.*fewer than the 2"),
        ({"layer": 0, "experts": []}, "at least one expert"),
        ({"layer": 0, "experts": [1], "scale": float("nan")}, "finite"),
    ):
        with pytest.raises(SpecError, match=words):
            parse_spec({"experts": [raw]}, ctx)
    dense = SpecContext(_shape(family_dirs["olmo2"]))
    with pytest.raises(SpecError, match="no routed experts.*MoE layers: \\[\\]"):
        parse_spec({"experts": [{"layer": 0, "experts": [0]}]}, dense)
    doc = describe("tiny", ctx, SteeringConfig())
    experts = doc["fields"]["experts"]
    assert (experts["layers"], experts["num_experts"], experts["experts_per_token"]) == (
        [0, 1, 2],
        4,
        2,
    )


def test_expert_masks_compile_to_router_biases(family_dirs):
    from steering.compile import NUM_CLASSES, CompiledSpec, compile_spec

    shape = _shape(family_dirs["qwen3_moe"])
    spec = parse_spec(
        {
            "experts": [
                {"layer": 1, "experts": [2], "scale": 0.0},
                {"layer": 1, "experts": [2, 3], "scale": 4.0, "positions": "generated"},
            ]
        },
        SpecContext(shape),
    )
    compiled = compile_spec(spec, shape)
    assert compiled.affects_kv and compiled.experts.layers.tolist() == [1]
    bias = compiled.experts.bias[0]
    assert bias.shape == (NUM_CLASSES, 4)
    assert np.isneginf(bias[:, 2]).all()  # 0 wins over any factor
    np.testing.assert_allclose(bias[2, 3], np.log(4.0))  # generated tokens only
    assert bias[0, 3] == 0.0 and bias[1, 3] == 0.0 and not bias[:, :2].any()
    back = CompiledSpec.from_payload(compiled.to_payload())
    np.testing.assert_array_equal(back.experts.bias, compiled.experts.bias)
