"""Steering ops inside vLLM's decoder layers: residual stream and attention heads.

Each decoder layer instance gets a subclass of its own class (made once per class) whose
`forward` calls the original and then applies the layer's residual ops; each layer's
`self_attn.o_proj` gets one whose `forward` first applies the head ops to its input (the
per-head attention output, [T, H_local * D]), and each `self_attn.attn` (the attention
kernel's module) one that scales the heads' queries first (query masks). Swapping
`__class__` keeps parameter names, module structure, weight loading and the compile
decorator of the parent model untouched; the layer index and the tables are plain
attributes, constant for the single Dynamo trace.
So within layer i: query masks (inside attention), head ops (before o_proj), then the rest
of the layer, then residual ops.

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

_STEERED: dict[tuple[type, object], type] = {}


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


def apply_head_ops(tables: SteeringTables, layer: int, z: torch.Tensor) -> torch.Tensor:
    """z_h <- head_scale[slot, class, h] * z_h + head_const[slot, class, h] for local heads.

    One gathered multiply-add for every row; the identity slot has scale 1 and constant 0,
    which leaves z bit-identical.
    """
    assert tables.head_scale is not None and tables.head_const is not None
    num_tokens = z.shape[0]
    rows = tables.tok_const[:num_tokens]
    scale = tables.head_scale[layer].index_select(0, rows)
    const = tables.head_const[layer].index_select(0, rows)
    per_head = (num_tokens, scale.shape[1], -1)
    out = torch.addcmul(const.view(per_head), z.reshape(per_head), scale.unsqueeze(-1))
    return out.view(num_tokens, -1)


def apply_query_ops(tables: SteeringTables, layer: int, q: torch.Tensor) -> torch.Tensor:
    """q_h <- query_scale[slot, class, h] * q_h for local heads (q after norm and rotary)."""
    assert tables.query_scale is not None
    num_tokens = q.shape[0]
    factor = tables.query_scale[layer].index_select(0, tables.tok_const[:num_tokens])
    per_head = q.reshape(num_tokens, factor.shape[1], -1) * factor.unsqueeze(-1)
    return per_head.view(q.shape)


def apply_readout(tables: SteeringTables, layer: int, stream: torch.Tensor) -> None:
    """read_out[t, k] (+)= <stream_t, read_units[layer, slot_t, k]> for every token.

    Units are zero except at an entry's own layer, so summing over layers gives each entry
    its layer's projection exactly (adding float32 zeros changes nothing); the first layer
    assigns, which clears the previous step.
    """
    num_tokens = stream.shape[0]
    units = tables.read_units[layer].index_select(0, tables.tok_slot[:num_tokens])
    values = (units.float() * stream.float().unsqueeze(1)).sum(dim=-1)
    if layer == tables.first_layer:
        tables.read_out[:num_tokens] = values
    else:
        tables.read_out[:num_tokens] += values


def capture_rows(buffer: torch.Tensor, sample_idx: torch.Tensor, stream: torch.Tensor) -> None:
    """Copy the sampled rows of `stream` into a persistent [max_rows, hidden] buffer.

    A fixed-size gather (padding rows point at token 0): one shape for every step, so the
    copy stays in the single compiled graph; only the sampler step reads what it needs.
    """
    buffer.copy_(stream.index_select(0, sample_idx))


def _steered_layer_forward(self, *args, **kwargs):
    hidden, residual = self._steerserve_base.forward(self, *args, **kwargs)
    tables, layer = self._steerserve_tables, self._steerserve_layer
    residual = apply_residual_ops(tables, layer, hidden, residual)
    if tables.reads_stream:  # the stream after this layer, formed once for its readers
        stream = hidden + residual
        if tables.capture is not None:
            capture_rows(tables.capture[layer], tables.sample_idx, stream)
        if tables.stream_all is not None:
            tables.stream_all[layer, : stream.shape[0]].copy_(stream)
        if tables.read_units is not None:
            apply_readout(tables, layer, stream)
    return hidden, residual


def _steered_post_attention_norm_forward(self, x, residual=None):
    # Llama/Qwen: post_attention_layernorm(hidden, residual) adds the attention output into
    # the stream and returns (normed, stream): the stream before the MLP.
    out = self._steerserve_base.forward(self, x, residual)
    tables = self._steerserve_tables
    capture_rows(tables.capture_mid[self._steerserve_layer], tables.sample_idx, out[1])
    return out


def _steered_o_proj_forward(self, input_, *args, **kwargs):
    input_ = apply_head_ops(self._steerserve_tables, self._steerserve_layer, input_)
    return self._steerserve_base.forward(self, input_, *args, **kwargs)


def _steered_attn_forward(self, query, key, value, *args, **kwargs):
    query = apply_query_ops(self._steerserve_tables, self._steerserve_layer, query)
    return self._steerserve_base.forward(self, query, key, value, *args, **kwargs)


def steered_class(base: type[nn.Module], forward) -> type[nn.Module]:
    cls = _STEERED.get((base, forward))
    if cls is None:
        cls = type(
            f"Steered{base.__name__}",
            (base,),
            {"forward": forward, "_steerserve_base": base, "__module__": __name__},
        )
        _STEERED[(base, forward)] = cls
    return cls


def _swap(module: nn.Module, forward, layer: int, tables: SteeringTables) -> None:
    base = getattr(type(module), "_steerserve_base", type(module))
    module.__class__ = steered_class(base, forward)
    module._steerserve_layer = layer
    module._steerserve_tables = tables


def head_modules(
    layer: nn.Module, index: int, tables: SteeringTables
) -> tuple[nn.Module, nn.Module]:
    """The layer's attention kernel module and o_proj, after checking that they see this
    rank's heads as the tables do."""
    attn = getattr(layer, "self_attn", None)
    kernel, o_proj = getattr(attn, "attn", None), getattr(attn, "o_proj", None)
    if not isinstance(kernel, nn.Module) or not isinstance(o_proj, nn.Module):
        raise UnsupportedModelError(
            f"layer {index} ({type(layer).__name__}): no self_attn.attn / self_attn.o_proj; "
            "head interventions need the Llama/Qwen attention layout (disable them with "
            "additional_config.steerserve.heads=false)"
        )
    assert tables.heads is not None
    n, d = len(tables.heads), tables.head_dim
    checks = {
        "self_attn (num_heads, head_dim)": ((attn.num_heads, attn.head_dim), (n, d)),
        "attn (num_heads, head_size)": ((kernel.num_heads, kernel.head_size), (n, d)),
        "o_proj input width": (o_proj.input_size_per_partition, n * d),
    }
    wrong = {name: seen for name, (seen, want) in checks.items() if seen != want}
    if wrong:
        raise UnsupportedModelError(
            f"layer {index}: {wrong} on this rank; expected {n} heads x {d} "
            f"(heads {tables.heads.start}..{tables.heads.stop - 1} of the model)"
        )
    return kernel, o_proj


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


def install(
    model: nn.Module, tables: SteeringTables, architecture: str, mid_layers: range = range(0)
) -> int:
    """Swap every local decoder layer (and its o_proj, with head tables) to its steered
    subclass; returns how many layers."""
    layers = decoder_layers(model)
    real = [(i, m) for i, m in enumerate(layers) if type(m).__name__ != "PPMissingLayer"]
    if not real:
        raise UnsupportedModelError("no decoder layers on this rank")
    for _, layer in real:
        check_layer_protocol(layer)
    heads = (
        [head_modules(layer, i, tables) for i, layer in real] if tables.heads is not None else []
    )
    if architecture not in VERIFIED_ARCHITECTURES:
        log.warning(
            "steerserve: %s is not among the verified architectures %s; its decoder layers "
            "follow the Llama protocol, steering them anyway",
            architecture,
            sorted(VERIFIED_ARCHITECTURES),
        )
    tables.first_layer = real[0][0]
    for i, layer in real:
        _swap(layer, _steered_layer_forward, i, tables)
    for (i, _), (kernel, o_proj) in zip(real, heads, strict=False):
        _swap(kernel, _steered_attn_forward, i, tables)
        _swap(o_proj, _steered_o_proj_forward, i, tables)
    if tables.capture is not None:
        for i, layer in real:
            if i in mid_layers:
                _swap(layer.post_attention_layernorm, _steered_post_attention_norm_forward, i,
                      tables)  # fmt: skip
    return len(real)
