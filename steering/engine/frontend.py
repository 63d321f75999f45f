"""API-process side of the extension: spec validation, compilation and cache salting.

Runs inside vLLM's `InputProcessor.process_inputs`, i.e. before a request reaches the
engine, so a bad spec is a `VLLMValidationError` (HTTP 400 in vLLM's server, a ValueError
for `LLM.generate`) and the engine never sees it. Named vectors are resolved here; the
workers receive only the compiled data.
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams

from steering.compile import PAYLOAD_KEY, CompiledSpec, compile_spec
from steering.engine.capture import REQUEST_KEY as CAPTURE_KEY
from steering.engine.capture import CaptureError
from steering.engine.capture import parse_request as parse_capture
from steering.engine.config import SteeringConfig
from steering.sae import SaeRegistry, same_sae
from steering.spec import ModelShape, SpecContext, SpecError, SteeringSpec, parse_spec
from steering.vectors import VectorRegistry

SPEC_KEY = "steering"
_ATTR = "_steerserve_frontend"


class SteeringValidationError(VLLMValidationError):
    """A bad spec; `errors` lists (field, reason) pairs, `parameter` is the first field."""

    def __init__(self, errors: list[tuple[str, str]], kinds: frozenset[str] = frozenset()):
        self.errors = errors
        self.kinds = kinds  # SpecError.kinds, when it came from one
        message = "; ".join(f"{loc}: {msg}" for loc, msg in errors)
        super().__init__(message, parameter=errors[0][0])


class SteeringFrontend:
    def __init__(self, vllm_config: Any, config: SteeringConfig):
        self.config = config
        self.shape = ModelShape.from_hf_config(vllm_config.model_config.hf_config)
        self.speculative = getattr(vllm_config, "speculative_config", None) is not None
        self.registry = VectorRegistry(config.vectors_dir)
        self.saes = SaeRegistry(config.saes_dir)
        # The top-k SAE as the workers loaded it at start (same directory, same moment).
        self.topk_sae = self.saes.saes.get(config.topk_sae) if config.topk_sae else None
        readouts = config.max_readouts if config.readout else 0
        self.context = SpecContext(
            self.shape,
            vectors=self.registry,
            saes=self.saes,
            max_readouts=readouts,
            max_features=config.max_features,
            feature_layers=config.feature_layers,
            topk_sae=config.topk_sae,
            max_topk=config.max_topk if config.topk_sae else 0,
            max_dynamic=config.max_dynamic,
            max_conditions=config.max_conditions,
            condition_layers=config.condition_layers,
        )

    def reload_saes(self) -> None:
        """Re-read the SAE directory. The top-k SAE stays the one the workers hold: a file
        changed or removed under its name is reported in `saes.errors`, not served."""
        self.saes.reload()
        name, pinned = self.config.topk_sae, self.topk_sae
        if name is None or pinned is None:
            return
        if not same_sae(self.saes.saes.get(name), pinned):
            self.saes.saes[name] = pinned
            self.saes.errors[f"{name} (top-k SAE)"] = (
                "its file changed or went away; the engine keeps reading the SAE it loaded at "
                "start, and so does this server until it restarts"
            )

    def compile_request(self, params: Any) -> CompiledSpec | None:
        """Validate and compile `params.extra_args["steering"]`; None when unsteered.

        The value is a raw spec (dict or JSON), or a `CompiledSpec` that steerserve's HTTP
        layer compiled with `compile` in this process (it needs its errors before a
        streamed response starts).
        """
        if not isinstance(params, SamplingParams) or not params.extra_args:
            return None
        if PAYLOAD_KEY in params.extra_args:
            raise SteeringValidationError(
                [(f"extra_args.{PAYLOAD_KEY}", "is reserved for steerserve's compiled form")]
            )
        if CAPTURE_KEY in params.extra_args:
            self._check_capture(params.extra_args[CAPTURE_KEY])
        raw = params.extra_args.get(SPEC_KEY)
        if raw is None:
            return None
        if isinstance(raw, CompiledSpec):
            compiled = raw
        else:
            spec = self.parse(raw)
            compiled = self.compile(spec, prompt_logprobs=params.prompt_logprobs is not None)
        return None if compiled.is_identity else compiled

    def parse(self, raw: Any, *, root: str = SPEC_KEY) -> SteeringSpec:
        try:
            return parse_spec(raw, self.context, root=root)
        except SpecError as e:
            raise SteeringValidationError(e.errors, e.kinds) from None

    def compile(self, spec: SteeringSpec, *, prompt_logprobs: bool = False) -> CompiledSpec:
        """Check `spec` against this engine's switches and compile it."""
        if not self.config.heads:
            self._refuse_heads(spec)
        if spec.decoding is not None:
            self._check_decoding(prompt_logprobs)
        if spec.readout and self.speculative:
            # Drafted rows would be read as if every draft token were kept.
            raise SteeringValidationError(
                [(f"{SPEC_KEY}.readout", "is not available with speculative decoding")]
            )
        compiled = compile_spec(spec, self.shape)
        limit = self.config.max_projections
        if len(compiled.projections) > limit:
            used = len(compiled.projections)
            problem = (
                f"uses {used} ablate/clamp entries; this engine allows {limit} "
                "(additional_config.steerserve.max_projections; 'add' is unlimited)"
            )
            raise SteeringValidationError([(f"{SPEC_KEY}.vectors", problem)])
        return compiled

    def _check_capture(self, raw: Any) -> None:
        if not self.config.capture:
            raise SteeringValidationError(
                [
                    (
                        f"extra_args.{CAPTURE_KEY}",
                        'needs an engine started with capture on (additional_config={"steerserve": '
                        '{"capture": true}}); steering.capture.Capturer starts one',
                    )
                ]
            )
        try:
            parse_capture(raw, self.shape.num_layers)
        except CaptureError as e:
            field = ".".join(filter(None, (f"extra_args.{CAPTURE_KEY}", e.field)))
            raise SteeringValidationError([(field, e.why)]) from None

    def _check_decoding(self, prompt_logprobs: bool) -> None:
        field = f"{SPEC_KEY}.decoding"
        if not self.config.decoding:
            why = (
                "needs an engine started with layer-reading decoding on "
                '(additional_config={"steerserve": {"decoding": true}}; steerserve serve '
                "--enable-steering-decoding)"
            )
            raise SteeringValidationError([(field, why)])
        if prompt_logprobs:
            # Intermediate states are kept for the sampled rows only: prompt log-probs would
            # silently be the plain model's.
            raise SteeringValidationError(
                [(field, "cannot be combined with prompt_logprobs (only sampled rows are fused)")]
            )
        if self.speculative:
            raise SteeringValidationError([(field, "is not available with speculative decoding")])

    @staticmethod
    def _refuse_heads(spec: SteeringSpec) -> None:
        fields = [f"{SPEC_KEY}.heads"] if spec.heads else []
        fields += [
            f"{SPEC_KEY}.vectors[{i}].site" for i, e in enumerate(spec.vectors) if e.site == "heads"
        ]
        if fields:
            why = "head interventions are off in this engine (additional_config.steerserve.heads)"
            raise SteeringValidationError([(f, why) for f in fields])

    @staticmethod
    def for_engine(params: Any, compiled: CompiledSpec | None) -> Any:
        """The params vLLM should see: the raw spec replaced by the compiled payload.

        vLLM deep-copies `extra_args` per request (and serialises it to every worker); a raw
        inline spec is thousands of Python floats, the payload one msgpack blob.
        The caller's object is left untouched (it may be shared across prompts).
        """
        if not isinstance(params, SamplingParams) or not params.extra_args:
            return params
        if SPEC_KEY not in params.extra_args and compiled is None:
            return params
        rest = {k: v for k, v in params.extra_args.items() if k != SPEC_KEY}
        if compiled is not None:
            rest[PAYLOAD_KEY] = compiled.to_wire()
        engine_params = copy.copy(params)
        engine_params.extra_args = rest or None
        return engine_params

    @staticmethod
    def salt(request: Any, compiled: CompiledSpec) -> None:
        """Salt the request's prefix-cache hashes with the spec's fingerprint.

        KV computed under one intervention must never serve a request with another.
        Unsteered requests keep their salt (or none) and share the cache as usual.
        """
        if compiled.reads_prompt:
            # Prompt readout needs every prompt row computed: no prefix-cache hits at all.
            salt = f"steerserve:{compiled.fingerprint}:readout:{uuid.uuid4().hex}"
        elif not compiled.affects_kv:
            return  # decoding or generated-token readout read the same KV as plain requests
        else:
            salt = f"steerserve:{compiled.fingerprint}"
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt


def frontend_of(input_processor: Any) -> SteeringFrontend | None:
    """The processor's SteeringFrontend (made on first use), or None if disabled."""
    frontend = input_processor.__dict__.get(_ATTR, False)
    if frontend is False:
        config = SteeringConfig.from_vllm(input_processor.vllm_config)
        frontend = SteeringFrontend(input_processor.vllm_config, config) if config.enabled else None
        input_processor.__dict__[_ATTR] = frontend
    return frontend
