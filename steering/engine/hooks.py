"""The engine's patches of vLLM: method hooks on its runner, engine core and input processor.

The other two places that change vLLM objects are `layers.py` (the model's modules) and
`openai_server.py` (the HTTP app); docs/design.md has the full table.

Installed by the `vllm.general_plugins` entry point (`plugin.py`) in every vLLM process.
Each hook does its part around vLLM's original method, and does nothing
when the extension is disabled for that engine (`config.py`), so a disabled engine runs
plain vLLM code. `compat.py` checks every internal touched here.

    InputProcessor.__init__            refuse a steered engine of an unverified architecture
                                       (architectures.py) or on Model Runner V2
    InputProcessor.process_inputs      validate + compile the spec, salt the prefix cache
    EngineCore.preprocess_add_request  refuse a payload the tables cannot hold (capacity.py)
    <Runner>.load_model                allocate tables, swap decoder layers
    GPUModelRunner._prepare_inputs     per-step slot/coefficient buffers, sampled rows
    GPUModelRunner._sample             captured rows read out (capture.py); layer-fused /
                                       contrastive logits of planned rows;
                                       seeded CPU rows of unfinished chunks: draw undone
    GPUModelRunner._bookkeeping_sync   ... and kept from vLLM's offset rewind (seeded.py)
    GPUModelRunner._on_request_state_removed   free the request's slot reference
    EngineArgs.create_engine_config    name steerserve's worker extension (worker.py): its
                                       calls (stats, reports, readouts, captures) over RPC
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from steering.engine import compat, seeded
from steering.engine.config import SteeringConfig

log = logging.getLogger(__name__)

_RUNTIME_ATTR = "_steerserve_runtime"
# Top-level key of vLLM's additional_config that makes a steered engine's compile-cache
# hash differ from a plain one's (see _mark_compile_cache).
COMPILE_CACHE_KEY = "steerserve_compiled"
_installed = False


def _wrap(cls: type, name: str, make) -> None:
    original = cls.__dict__[name]
    if getattr(original, "_steerserve_original", None) is not None:
        return  # already hooked (plugins may load more than once per process)
    hooked = functools.wraps(original)(make(original))
    hooked._steerserve_original = original
    setattr(cls, name, hooked)


def runtime_of(runner: Any):
    """The runner's SteeringRuntime, or None when steering is disabled for its engine."""
    return getattr(runner, _RUNTIME_ATTR, None)


# --- runner ------------------------------------------------------------------------------


def _mark_compile_cache(vllm_config: Any, config: SteeringConfig, topk_layer: int | None) -> None:
    """Keep vLLM's on-disk torch.compile cache apart for steered and plain engines.

    vLLM keys its AOT compile cache by `vllm_config.compute_hash()` (which includes
    additional_config) and then checks only the source files the cached graph traced. A
    plain engine (STEERSERVE_DISABLE=1, same flags) and a steered one would share a key, so
    a steered engine could load a graph without its steering ops. The model is compiled on
    its first forward, after load_model: marking the config here changes the key in time.
    """
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[COMPILE_CACHE_KEY] = (
            f"{compat.release()}:heads={config.heads}:max_projections={config.max_projections}"
            f":decoding={config.decoding}:capture={config.capture}"
            f":readout={config.max_readouts if config.readout else 0}"
            f":topk_layer={topk_layer}"  # a constant of the trace, read from the SAE file
        )
    else:
        log.warning(
            "steerserve: additional_config is not a dict; vLLM's compile cache may be shared "
            "with a plain engine (set VLLM_DISABLE_COMPILE_CACHE=1 to be safe)"
        )


def _after_load_model(runner: Any) -> None:
    if getattr(runner, _RUNTIME_ATTR, None) is not None:
        return
    setattr(runner, _RUNTIME_ATTR, None)
    config = SteeringConfig.from_vllm(runner.vllm_config)
    if not config.enabled:
        log.info("steerserve: disabled for this engine, running plain vLLM")
        return
    import torch
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    from steering.engine.architectures import refuse_unverified
    from steering.engine.layers import install
    from steering.engine.runtime import SteeringRuntime
    from steering.engine.tables import SteeringTables, local_heads
    from steering.spec import ModelShape

    compat.check_runner(runner)
    shape = ModelShape.from_hf_config(runner.model_config.hf_config)
    refuse_unverified(runner.vllm_config)
    heads = None
    if config.heads:
        rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        heads = local_heads(shape.num_heads, rank, size)
    # The stream before the MLP: IKS ("auto" fuse, lfd) may ask for any layer but the last.
    mid_layers = range(shape.num_layers - 1) if config.decoding else range(0)
    topk = None
    if config.topk_sae:
        from steering.engine.topk import load_encoder

        device = torch.device(runner.device)
        dtype = runner.model_config.dtype
        topk = load_encoder(config.saes_dir, config.topk_sae, shape, config.max_topk, device, dtype)
    tables = SteeringTables(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_slots=runner.max_num_reqs + 1,
        max_proj=config.max_projections,
        max_tokens=int(runner.positions.shape[0]),
        dtype=runner.model_config.dtype,
        device=torch.device(runner.device),
        heads=heads,
        head_dim=shape.head_dim,
        capture=config.decoding,
        stream_all=config.capture,
        max_read=config.max_readouts if config.readout else 0,
        num_experts=shape.num_experts,
        max_features=config.max_features,
        feature_layers=config.feature_layers,
        topk_layer=None if topk is None else topk.layer,
        max_topk=0 if topk is None else topk.max_k,
        max_dynamic=config.max_dynamic,
        max_conditions=config.max_conditions,
        condition_layers=config.condition_layers,
        max_rows=runner.max_num_reqs,
    )
    n = install(runner.get_model(), tables, shape, mid_layers)
    _mark_compile_cache(runner.vllm_config, config, tables.topk_layer)
    runtime = SteeringRuntime(tables, runner.max_num_reqs, topk)
    # Contrastive scoring is torch.compile'd when the model is (enforce_eager: eager too).
    runtime.compiled_decoding = not runner.model_config.enforce_eager
    if config.decoding:
        from steering.engine import decoding

        vocab = runner.model_config.get_vocab_size()
        decoding.warm_up(runtime.compiled_decoding, vocab, tables.units.dtype, tables.device)
    setattr(runner, _RUNTIME_ATTR, runtime)
    log.info(
        "steerserve: steering %d decoder layers (heads: %s), %d slots x %d projections, "
        "%.1f MiB buffers",
        n,
        f"{heads.start}..{heads.stop - 1}" if heads is not None else "off",
        tables.num_slots,
        tables.max_proj,
        tables.nbytes / 2**20,
    )


def _hook_load_model(original):
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _after_load_model(self)
        return result

    return load_model


def _hook_prepare_inputs(original):
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        runtime = getattr(self, _RUNTIME_ATTR, None)
        if runtime is not None:
            batch = self.input_batch
            num_tokens = scheduler_output.total_num_scheduled_tokens
            req_indices = self.req_indices.np[:num_tokens]
            # Positions as vLLM computed them on the host (num_computed + offset in query).
            positions = batch.num_computed_tokens_cpu[req_indices] + self.query_pos.np[:num_tokens]
            runtime.prepare_step(
                batch.req_ids[: batch.num_reqs],
                self.requests,
                req_indices,
                positions,
                batch.num_prompt_tokens,
            )
        return result

    return _prepare_inputs


def _hook_sample(original):
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        runtime = getattr(self, _RUNTIME_ATTR, None)
        if runtime is None:
            return original(self, logits, spec_decode_metadata, *args, **kwargs)
        if runtime.captures is not None:
            runtime.captures.collect()  # before the next forward overwrites the stream
        if runtime.readouts is not None:
            runtime.readouts.collect()
        if runtime.token_conditions is not None:
            runtime.token_conditions.collect()
        # Layer-reading decoding only on rows whose sample vLLM keeps. An unfinished
        # chunk's sample is discarded, and after preemption such chunks lie past the prompt
        # too (rel >= 0), so position alone cannot tell: contrast / lfd would append a
        # layer for each (a report one entry too long, later entries shifted).
        discard = self.discard_request_mask.np
        plan = [p for p in runtime.plan if not discard[p.row]]
        if plan and logits is not None:
            from steering.engine import decoding

            logits = decoding.apply(
                self.get_model(),
                runtime.tables,
                logits,
                plan,
                compiled=runtime.compiled_decoding,
            )
        with seeded.restore_discarded(self):
            return original(self, logits, spec_decode_metadata, *args, **kwargs)

    return _sample


def _hook_bookkeeping(original):
    def _bookkeeping_sync(self, *args, **kwargs):
        if getattr(self, _RUNTIME_ATTR, None) is None:
            return original(self, *args, **kwargs)
        with seeded.without_offset_rewind(self):
            return original(self, *args, **kwargs)

    return _bookkeeping_sync


def _hook_request_removed(original):
    def _on_request_state_removed(self, req_id, req_state, *args, **kwargs):
        runtime = getattr(self, _RUNTIME_ATTR, None)
        if runtime is not None:
            runtime.release(req_id)
        return original(self, req_id, req_state, *args, **kwargs)

    return _on_request_state_removed


# --- front end ---------------------------------------------------------------------------


def _hook_input_processor_init(original):
    def __init__(self, vllm_config, *args, **kwargs):
        # Before vLLM's own init (which asks which runner it will be) and before any
        # worker starts: a steered engine on Model Runner V2 would steer nothing.
        if SteeringConfig.from_vllm(vllm_config).enabled:
            from steering.engine.architectures import refuse_unverified
            from steering.engine.runner_choice import refuse_v2_runner

            refuse_unverified(vllm_config)
            refuse_v2_runner(vllm_config)
        return original(self, vllm_config, *args, **kwargs)

    return __init__


def _hook_process_inputs(original):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from steering.engine.frontend import frontend_of

        frontend = frontend_of(self)
        compiled = None
        if frontend is not None:
            compiled = frontend.compile_request(params)
            params = frontend.for_engine(params, compiled)
        request = original(self, request_id, prompt, params, *args, **kwargs)
        if compiled is not None:
            frontend.salt(request, compiled)
        return request

    return process_inputs


# --- engine core -------------------------------------------------------------------------

_CAPACITY_ATTR = "_steerserve_capacity"


def _capacity_of(core: Any):
    """The engine's steering capacity (computed once), or None when steering is off."""
    capacity = core.__dict__.get(_CAPACITY_ATTR, False)
    if capacity is False:
        from steering.engine.capacity import Capacity
        from steering.spec import ModelShape

        config = SteeringConfig.from_vllm(core.vllm_config)
        shape = ModelShape.from_hf_config(core.vllm_config.model_config.hf_config)
        capacity = Capacity.of_engine(config, shape) if config.enabled else None
        core.__dict__[_CAPACITY_ATTR] = capacity
    return capacity


def _hook_preprocess_add_request(original):
    def preprocess_add_request(self, request, *args, **kwargs):
        # Raised here, an error fails this request alone (vLLM's request-level error
        # output; InprocClient raises it to the caller) instead of the engine.
        capacity = _capacity_of(self)
        if capacity is not None:
            from steering.engine.capacity import admit

            admit(getattr(request.sampling_params, "extra_args", None), capacity)
        return original(self, request, *args, **kwargs)

    return preprocess_add_request


def _hook_create_engine_config(original):
    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        if SteeringConfig.from_vllm(config).enabled:
            from steering.engine.worker import check_extension

            parallel = config.parallel_config
            parallel.worker_extension_cls = check_extension(parallel.worker_extension_cls)
        return config

    return create_engine_config


def install_hooks() -> None:
    """Patch vLLM's classes (idempotent). Raises compat.IncompatibleVLLM if internals moved."""
    global _installed
    if _installed:
        return
    compat.check_static()
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(EngineCore, "preprocess_add_request", _hook_preprocess_add_request)
    _wrap(InputProcessor, "__init__", _hook_input_processor_init)
    _wrap(InputProcessor, "process_inputs", _hook_process_inputs)
    _wrap(GPUModelRunner, "load_model", _hook_load_model)
    _wrap(GPUModelRunner, "_prepare_inputs", _hook_prepare_inputs)
    _wrap(GPUModelRunner, "_on_request_state_removed", _hook_request_removed)
    _wrap(GPUModelRunner, "_sample", _hook_sample)
    _wrap(GPUModelRunner, "_bookkeeping_sync", _hook_bookkeeping)
    for runner_cls in compat.runner_subclasses_with_own_load_model():
        _wrap(runner_cls, "load_model", _hook_load_model)
    from vllm.engine.arg_utils import EngineArgs

    _wrap(EngineArgs, "create_engine_config", _hook_create_engine_config)
    _installed = True
