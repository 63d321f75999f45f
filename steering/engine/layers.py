"""Residual-stream ops inside vLLM's decoder layers.

Each decoder layer instance gets a subclass of its own class (made once per class) whose
`forward` calls the original and then applies the layer's steering ops. Swapping
`__class__` keeps parameter names, module structure and the compile decorator of the
parent model untouched; the layer index and the tables are plain attributes, constant for
the single Dynamo trace.

Llama/Qwen-style layers return `(hidden, residual)` with the residual add deferred into the
next fused add-RMSNorm, so the stream after layer i is `hidden + residual`; the delta goes
into `residual`, which keeps the fused norm (and TP all-reduce fusion) intact.
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from steering.engine.tables import SteeringTables

log = logging.getLogger(__name__)

# Architectures whose decoder layers were checked against the reference oracle.
VERIFIED_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)

_STEERED: dict[type, type] = {}


class UnsupportedModelError(RuntimeError):
    pass


def apply_residual_ops(
    tables: SteeringTables, layer: int, hidden: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """The layer's steering as one affine map (see compile.py): projections, then constant.

    residual <- residual - gain * <h, u> u   for each projection, in order (h = hidden+residual)
    residual <- residual + const[slot, class]

    Identical tensor ops for every row and step: rows on the identity slot have zero gains
    and a zero constant and come out bit-identical. Dot products accumulate in float32.
    """
    num_tokens = residual.shape[0]
    if tables.max_proj:
        units = tables.units[layer].index_select(0, tables.tok_slot[:num_tokens])
        gains = tables.tok_gain[:num_tokens]
        stream = (hidden + residual).float()
        for k in range(tables.max_proj):
            u = units[:, k].float()
            delta = (gains[:, k] * (stream * u).sum(dim=-1)).unsqueeze(-1) * u
            stream = stream - delta
            residual = residual - delta.to(residual.dtype)
    return residual + tables.const[layer].index_select(0, tables.tok_const[:num_tokens])


def _steered_forward(self, *args, **kwargs):
    hidden, residual = self._steerserve_base.forward(self, *args, **kwargs)
    tables, layer = self._steerserve_tables, self._steerserve_layer
    return hidden, apply_residual_ops(tables, layer, hidden, residual)


def steered_class(base: type[nn.Module]) -> type[nn.Module]:
    cls = _STEERED.get(base)
    if cls is None:
        cls = type(
            f"Steered{base.__name__}",
            (base,),
            {"forward": _steered_forward, "_steerserve_base": base, "__module__": __name__},
        )
        _STEERED[base] = cls
    return cls


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a vLLM causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__}: no `model.layers` ModuleList; steering needs the "
            "Llama/Qwen decoder layout"
        )
    return layers


def check_layer_protocol(layer: nn.Module) -> None:
    """Layers must take (positions, hidden_states, residual) and return (hidden, residual)."""
    params = list(inspect.signature(type(layer).forward).parameters)
    if params[1:4] != ["positions", "hidden_states", "residual"]:
        raise UnsupportedModelError(
            f"{type(layer).__name__}.forward{tuple(params)}: expected "
            "(self, positions, hidden_states, residual) returning (hidden, residual)"
        )


def install(model: nn.Module, tables: SteeringTables, architecture: str) -> int:
    """Swap every local decoder layer to its steered subclass; returns how many."""
    layers = decoder_layers(model)
    real = [(i, m) for i, m in enumerate(layers) if type(m).__name__ != "PPMissingLayer"]
    if not real:
        raise UnsupportedModelError("no decoder layers on this rank")
    for _, layer in real:
        check_layer_protocol(layer)
    if architecture not in VERIFIED_ARCHITECTURES:
        log.warning(
            "steerserve: %s is not among the verified architectures %s; its decoder layers "
            "follow the Llama protocol, steering them anyway",
            architecture,
            sorted(VERIFIED_ARCHITECTURES),
        )
    for i, layer in real:
        base = getattr(type(layer), "_steerserve_base", type(layer))
        layer.__class__ = steered_class(base)
        layer._steerserve_layer = i
        layer._steerserve_tables = tables
    return len(real)
