"""What the served model and the server's switches accept: `GET /v1/steering/capabilities`.

Clients (and the playground) build valid specs from it: layers, widths, which layers have
attention heads (none for linear-attention layers) and experts, and which spec fields and
values this engine takes. Everything here comes from the same ModelShape and SteeringConfig
that validation uses, so a spec built from it passes validation.
"""

from __future__ import annotations

from typing import Any, get_args

from steering.engine.architectures import refusal
from steering.engine.config import SteeringConfig
from steering.spec import (
    ConditionMeasure,
    ConditionOp,
    ConditionReduce,
    Op,
    Positions,
    ScheduleKind,
    Site,
    SpecContext,
    dola_buckets,
    lfd_layers,
)


def describe(model: str, context: SpecContext, config: SteeringConfig | None) -> dict[str, Any]:
    """The capabilities document; `config` None means steering is off for the engine."""
    shape = context.shape
    layers = [
        {
            "index": i,
            "attention_heads": shape.num_heads if shape.has_heads(i) else 0,
            "kv_heads": shape.num_kv_heads if shape.has_heads(i) else 0,
            "experts": shape.experts_of(i),
        }
        for i in range(shape.num_layers)
    ]
    doc: dict[str, Any] = {
        "object": "steering.capabilities",
        "model": model,
        "architecture": shape.architecture,
        "verified_architecture": refusal(shape.architecture) is None,
        "steering_enabled": config is not None,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "num_heads": shape.num_heads,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "head_site_width": shape.width("heads"),
        "layers": layers,
    }
    if config is None:
        doc["fields"] = {}
        return doc
    positions = list(get_args(Positions))
    fields: dict[str, Any] = {
        "vectors": {
            "sites": list(get_args(Site)) if config.heads else ["residual"],
            "ops": [op for op in get_args(Op) if config.heads or op != "mix"],
            "positions": positions,
            "max_entries": context.max_vectors,
            "max_projections": config.max_projections,
            "widths": {"residual": shape.hidden_size, "heads": shape.width("heads")},
            "max_inline_floats": context.max_inline_floats,
            # Adds with `schedule` / `relative: "rms"` per request (0: off on this server).
            "max_dynamic": config.max_dynamic,
            "schedules": list(get_args(ScheduleKind)) if config.max_dynamic else [],
        },
        "heads": None,
        "experts": None,
        "features": {
            # add is a constant (always); clamp/scale need the engine's feature tables.
            "ops": ["add", "clamp", "scale"] if config.max_features else ["add"],
            "positions": positions,
            "max_entries": context.max_feature_entries,
            "max_per_layer": config.max_features,
            "layers": list(config.feature_layers)
            if config.feature_layers is not None
            else list(range(shape.num_layers)),
            "readout": config.readout,
        },
        "decoding": None,
        "readout": None,
        "conditions": None,
    }
    if shape.moe_layers:
        fields["experts"] = {
            "layers": shape.moe_layers,
            "num_experts": shape.num_experts,
            "experts_per_token": shape.experts_per_token,
            "positions": positions,
            "max_entries": context.max_head_masks,
        }
    if config.heads:
        fields["heads"] = {
            "layers": shape.head_layers,
            "num_heads": shape.num_heads,
            "targets": ["output", "query"],
            "positions": positions,
            "max_entries": context.max_head_masks,
        }
    if config.decoding:
        fields["decoding"] = {
            "modes": ["fuse", "contrast", "lfd"],
            "layers": list(range(shape.num_layers - 1)),
            "buckets": dola_buckets(shape.num_layers),
            "lfd_default_layers": lfd_layers(shape.num_layers),
        }
    if config.readout:
        fields["readout"] = {"max_entries": config.max_readouts}
    if config.max_conditions:
        fields["conditions"] = {
            "max_entries": config.max_conditions,
            "layers": list(config.condition_layers)
            if config.condition_layers is not None
            else list(range(shape.num_layers)),
            "reduce": list(get_args(ConditionReduce)),
            "measures": list(get_args(ConditionMeasure)),
            "ops": list(get_args(ConditionOp)),
            "when": "a boolean expression of condition names: and, or, not, parentheses",
        }
    if config.topk_sae:
        readout = fields["readout"] or {"max_entries": 0}
        topk: dict[str, Any] = {"sae": config.topk_sae, "max_k": config.max_topk}
        try:
            sae = context.saes.lookup(config.topk_sae, shape) if context.saes else None
        except (KeyError, ValueError):
            sae = None  # the engine refused to start with it: not reached in a live server
        if sae is not None:
            topk |= {"layer": int(sae.layer), "width": sae.width}
            topk["max_k"] = min(config.max_topk, sae.width)
        readout["top_k"] = topk
        fields["readout"] = readout
    doc["fields"] = fields
    return doc
