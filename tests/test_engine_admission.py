"""No silent unsteered run: a steered engine that would run vLLM's Model Runner V2 is refused
at start-up, and a steering payload the engine cannot hold fails its request (the engine
and the other requests go on)."""

from __future__ import annotations

import pytest
from conftest import ENGINE_KW, HIDDEN, generate_one, prompt_ids, sampling

from steering.compile import PAYLOAD_KEY
from steering.engine.capacity import SteeringPayloadRefused
from steering.engine.frontend import frontend_of
from steering.engine.runner_choice import NeedsV1Runner, v2_runner_cause

PROMPT = prompt_ids(71, 12)
GOOD = {"vectors": [{"name": "happy", "scale": 1.0}]}


@pytest.fixture(autouse=True)
def _vllm_reads_the_environment_now():
    """vLLM caches its environment variables once an engine core has started
    (`vllm.envs.enable_envs_cache`, called at the end of EngineCore's init), and the
    session's in-process engines have started one by the time these tests run: the
    variables these tests set would not be seen. Read them afresh here, cache them again
    after."""
    import vllm.envs as envs

    cached = envs._is_envs_cache_enabled()
    envs.disable_envs_cache()
    yield
    if cached:
        envs.enable_envs_cache()


def _config(model_dir):
    """A real VllmConfig of the test model, made on V1 (on CPU vLLM itself refuses to make
    one for V2: "Model Runner V2 requires Triton"; on GPU it would make it)."""
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(str(model_dir), **dict(ENGINE_KW, enforce_eager=True)).create_engine_config()


def _front_end_of(config):
    """Build vLLM's InputProcessor, which the hook guards, for `config`."""
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor(config)


@pytest.mark.parametrize("value", ["1", "2", " 1"])
def test_any_truthy_v2_variable_is_refused_at_start(model_dirs, monkeypatch, value):
    config = _config(model_dirs["llama"])
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", value)
    assert config.use_v2_model_runner  # what vLLM decides from the variable
    with pytest.raises(NeedsV1Runner, match=f"VLLM_USE_V2_MODEL_RUNNER={value!r} asks for it"):
        _front_end_of(config)


def test_watermarking_forces_v2_and_is_refused_at_start(model_dirs, monkeypatch):
    from vllm.config.watermarking import WatermarkConfig

    config = _config(model_dirs["llama"])
    # The plugin's default VLLM_USE_V2_MODEL_RUNNER=0 does not stop vLLM from running V2.
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    object.__setattr__(config, "watermark_config", WatermarkConfig(key=7))
    assert config.use_v2_model_runner
    with pytest.raises(NeedsV1Runner, match="watermarking"):
        _front_end_of(config)


def test_hisparse_is_named_before_vllm_asks_the_variable(model_dirs, monkeypatch):
    """With VLLM_USE_V2_MODEL_RUNNER=0, vLLM's own property raises about a variable the
    user never set; the refusal names HiSparse instead."""
    config = _config(model_dirs["llama"])
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert v2_runner_cause(config) is None
    object.__setattr__(config.attention_config, "hisparse_config", object())
    with pytest.raises(ValueError, match="remove VLLM_USE_V2_MODEL_RUNNER=0"):
        config.use_v2_model_runner  # noqa: B018 (what vLLM itself would say)
    with pytest.raises(NeedsV1Runner, match="HiSparse"):
        _front_end_of(config)


def test_engine_with_steering_off_is_not_refused(model_dirs, monkeypatch):
    config = _config(model_dirs["llama"])
    config.additional_config = {"steerserve": {"enabled": False}}
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    processor = _front_end_of(config)  # vLLM's own init runs (its V2 logits-processor path)
    assert frontend_of(processor) is None


def _compiled_request(llm, spec: dict, request_id: str):
    """The EngineCoreRequest steerserve's front end makes for `spec` on `llm`."""
    processor = llm.llm_engine.input_processor
    request = processor.process_inputs(
        request_id,
        {"prompt_token_ids": PROMPT},
        sampling(spec),
        supported_tasks=llm.llm_engine.get_supported_tasks(),
    )
    processor.assign_request_id(request)
    return request


def _payload_from(llm, spec: dict) -> dict:
    frontend = frontend_of(llm.llm_engine.input_processor)
    return frontend.compile(frontend.parse(spec)).to_payload()


def _refused(llm, request) -> str:
    with pytest.raises(SteeringPayloadRefused) as info:
        llm.llm_engine.engine_core.add_request(request)
    return str(info.value)


def test_payload_for_another_model_fails_its_request_and_engine_keeps_serving(engines):
    llm, deeper = engines.get("llama"), engines.get("llama8")
    before = generate_one(llm, PROMPT, sampling(GOOD))
    request = _compiled_request(llm, GOOD, "admission-layers")
    # Compiled by a front end for an 8-layer model: layer 6 does not exist here (the worker
    # would index past its tables and take the engine down).
    spec = {"vectors": [{"data": {"6": [0.5] * HIDDEN}}]}
    request.sampling_params.extra_args[PAYLOAD_KEY] = _payload_from(deeper, spec)
    assert "uses layer 6, the model has 4 layers" in _refused(llm, request)
    after = generate_one(llm, PROMPT, sampling(GOOD))
    assert after.tokens == before.tokens and after.logprobs == before.logprobs


def test_unreadable_payload_and_raw_spec_are_refused(engines):
    llm = engines.get("llama")
    request = _compiled_request(llm, GOOD, "admission-garbled")
    request.sampling_params.extra_args[PAYLOAD_KEY] = {"v": -1}
    assert "unreadable steering payload" in _refused(llm, request)
    request = _compiled_request(llm, GOOD, "admission-raw")
    extra = request.sampling_params.extra_args
    extra.pop(PAYLOAD_KEY)
    extra["steering"] = GOOD
    assert "did not compile" in _refused(llm, request)


def test_payload_needing_switches_the_engine_lacks_is_refused(engines):
    plain_tables = engines.get("llama", "noheads")  # heads and decoding off
    full = engines.get("llama")
    cases = [
        ({"heads": [{"layer": 0, "heads": [1], "scale": 0.0}]}, "head interventions"),
        ({"decoding": {"mode": "contrast", "layers": [1, 2]}}, "decoding, which is off"),
    ]
    for i, (spec, why) in enumerate(cases):
        request = _compiled_request(plain_tables, {}, f"admission-switch-{i}")
        request.sampling_params.extra_args = {PAYLOAD_KEY: _payload_from(full, spec)}
        assert why in _refused(plain_tables, request)
