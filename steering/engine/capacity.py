"""What an engine's steering tables can hold, and the admission check against it.

The front end compiles specs for the model it serves, so a payload that does not fit is a
mismatched deployment or a request that bypassed the front end (a raw EngineCoreRequest).
Such a request must fail, never run unsteered: the engine core checks every steered
request against this capacity as vLLM admits it (`hooks._hook_preprocess_add_request`),
where an exception fails that one request (vLLM answers it with a request-level error, an
HTTP 500) and leaves the engine and the other requests running.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steering.compile import PAYLOAD_KEY, CompiledSpec
from steering.engine.config import SteeringConfig
from steering.spec import ModelShape


class SteeringPayloadRefused(ValueError):
    pass


@dataclass(frozen=True)
class Capacity:
    num_layers: int
    hidden_size: int
    max_proj: int
    max_read: int
    heads: range | None  # query heads held (one TP rank's), None: head ops off
    head_dim: int
    decoding: bool
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    max_features: int = 0  # SAE feature clamps/scales per layer (0: off)
    feature_layers: tuple[int, ...] | None = None  # where they run (None: every layer)
    max_topk: int = 0  # top-k readout's largest k (0: no top-k SAE)
    topk_layer: int | None = None  # its SAE's layer (None: not known here, unchecked)
    max_dynamic: int = 0  # scheduled / RMS-relative adds per request (0: off)
    max_conditions: int = 0  # request-level conditions per request (0: off)
    condition_layers: tuple[int, ...] | None = None  # layers they may read (None: all)

    @classmethod
    def of_engine(cls, config: SteeringConfig, shape: ModelShape) -> Capacity:
        """The whole model's capacity (every rank's heads) under these switches."""
        return cls(
            num_layers=shape.num_layers,
            hidden_size=shape.hidden_size,
            max_proj=config.max_projections,
            max_read=config.max_readouts if config.readout else 0,
            heads=range(shape.num_heads) if config.heads else None,
            head_dim=shape.head_dim,
            decoding=config.decoding,
            num_experts=shape.num_experts,
            max_features=config.max_features,
            feature_layers=config.feature_layers,
            max_topk=config.max_topk if config.topk_sae else 0,
            max_dynamic=config.max_dynamic,
            max_conditions=config.max_conditions,
            condition_layers=config.condition_layers,
        )

    def misfit(self, spec: CompiledSpec) -> str | None:
        """Why `spec` cannot go into tables of this capacity, or None."""
        if spec.hidden_size != self.hidden_size:
            return f"compiled for hidden size {spec.hidden_size}, the model has {self.hidden_size}"
        deepest = max(_layers(spec), default=-1)
        if deepest >= self.num_layers:
            return f"uses layer {deepest}, the model has {self.num_layers} layers"
        if len(spec.projections) > self.max_proj:
            return f"{len(spec.projections)} projections, the tables hold {self.max_proj}"
        if spec.features.layers.size and spec.features.per_layer > self.max_features:
            return (
                f"{spec.features.per_layer} feature clamps/scales at one layer, the tables hold "
                f"{self.max_features} (max_features)"
            )
        if self.feature_layers is not None:
            outside = sorted(set(spec.features.layers.tolist()) - set(self.feature_layers))
            if outside:
                where = list(self.feature_layers)
                return f"feature ops at layer(s) {outside}, this engine runs them at {where}"
        if spec.dynamic.count > self.max_dynamic:
            return (
                f"{spec.dynamic.count} scheduled/RMS-relative adds, the tables hold "
                f"{self.max_dynamic} (max_dynamic)"
            )
        if spec.conditions.count > self.max_conditions or spec.combos > 1 << self.max_conditions:
            return (
                f"{spec.conditions.count} conditions, the tables hold {self.max_conditions} "
                "(max_conditions)"
            )
        if self.condition_layers is not None:
            outside = sorted(set(spec.conditions.layers.tolist()) - set(self.condition_layers))
            if outside:
                where = list(self.condition_layers)
                return f"conditions at layer(s) {outside}, this engine reads them at {where}"
        projections = len(spec.projection_readouts)
        if projections > self.max_read:
            return f"{projections} readout entries, the tables hold {self.max_read} (readout off?)"
        for r in spec.readout:
            if not r.top_k:
                continue
            if r.top_k > self.max_topk:
                return f"top-k readout of {r.top_k} features, this engine reads {self.max_topk}"
            if self.topk_layer is not None and r.layer != self.topk_layer:
                return f"top-k readout at layer {r.layer}, the engine's SAE reads {self.topk_layer}"
        if spec.experts.layers.size and spec.experts.num_experts != self.num_experts:
            return (
                f"compiled for {spec.experts.num_experts} experts per layer, the model has "
                f"{self.num_experts}"
            )
        if spec.decoding is not None and not self.decoding:
            return "uses layer-reading decoding, which is off in this engine"
        if spec.uses_heads:
            ops = spec.heads
            if self.heads is None:
                return "uses head interventions, which are off in this engine"
            if ops.head_dim != self.head_dim or self.heads.stop > ops.num_heads:
                return (
                    f"compiled for {ops.num_heads} heads x {ops.head_dim}, this rank holds "
                    f"heads {self.heads.start}..{self.heads.stop - 1} x {self.head_dim}"
                )
        return None


def _layers(spec: CompiledSpec) -> list[int]:
    out = [int(i) for p in spec.projections for i in p.layers]
    out += [int(i) for i in spec.const_layers] + [int(i) for i in spec.heads.layers]
    out += [int(i) for i in spec.conditions.layers]
    out += [r.layer for r in spec.readout] + [int(i) for i in spec.experts.layers]
    out += [int(i) for i in spec.features.layers] + [int(i) for i in spec.dynamic.layers]
    if spec.decoding is not None:
        out += list(spec.decoding.candidates)
    return out


def admit(extra_args: dict[str, Any] | None, capacity: Capacity) -> CompiledSpec | None:
    """The request's compiled spec if it fits `capacity`; SteeringPayloadRefused if not.

    None for a request without steering. A raw `steering` field that reached the engine is
    refused too: only the front end's compiled form is applied.
    """
    extra = extra_args or {}
    payload = extra.get(PAYLOAD_KEY)
    if payload is None:
        if extra.get("steering"):
            raise SteeringPayloadRefused(
                "steerserve: the request carries a 'steering' field that steerserve's front "
                "end did not compile (submitted as a raw EngineCoreRequest?); it is refused "
                "rather than run unsteered"
            )
        return None
    try:
        spec = CompiledSpec.from_payload(payload)
    except Exception as e:  # any malformed payload: refuse this request, not the engine
        raise SteeringPayloadRefused(f"steerserve: unreadable steering payload: {e!r}") from e
    problem = capacity.misfit(spec)
    if problem:
        raise SteeringPayloadRefused(
            f"steerserve: steering payload does not fit this engine: {problem}"
        )
    return spec
