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

Most families' layers return `(hidden, residual)` with the residual add deferred into the
next fused add-RMSNorm, so the stream after layer i is `hidden + residual`; the delta goes
into `residual`, which keeps the fused norm (and TP all-reduce fusion) intact. Layers that
return `(stream, None)` (Gemma 4) get the delta on the stream. Where each site is, per
family, is `architectures.py`'s business.
"""

from __future__ import annotations

import torch
from torch import nn

from steering.compile import (
    COND_ACT_THRESHOLD,
    COND_CAST,
    COND_KIND,
    COND_OFFSET,
    COND_SIGN,
    COND_STRICT,
    COND_THRESHOLD,
    COND_TOKEN,
    NUM_CLASSES,
)
from steering.engine.architectures import (
    UnsupportedModelError,
    check_against_shape,
    check_heads,
    map_model,
)
from steering.engine.tables import SteeringTables

_STEERED: dict[tuple[type, object], type] = {}


def apply_residual_ops(
    tables: SteeringTables, layer: int, hidden: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """The layer's steering as one affine map (see compile.py): projections, then constant.

    residual <- residual - gain * <h, u> u   for each projection, in order (h = hidden+residual)
    residual <- residual + const[slot, class]

    `hidden` None: the layer returned the stream itself, which is `residual` here.
    Identical tensor ops for every row and step: rows on the identity slot have zero gains
    and a zero constant and come out bit-identical. Dot products accumulate in float32.
    """
    num_tokens = residual.shape[0]
    features = bool(tables.max_features) and layer in tables.feature_layers
    if tables.max_proj or features or tables.max_dynamic:
        stream = (residual if hidden is None else hidden + residual).float()
    if tables.max_dynamic:  # RMS of the layer's own output, before its steering
        # A plain row sum as the projections use: mean()'s CPU kernel reduces one row in a
        # different order than a batch of rows, so a request's output would depend on the batch.
        rms = ((stream * stream).sum(dim=-1, keepdim=True) / stream.shape[-1]).sqrt()
    if tables.max_proj:
        units = tables.units[layer].index_select(0, tables.tok_slot[:num_tokens])
        gains = tables.tok_gain[:num_tokens]
        for k in range(tables.max_proj):
            u = units[:, k].float()
            delta = (gains[:, k] * (stream * u).sum(dim=-1)).unsqueeze(-1) * u
            stream = stream - delta
            residual = residual - delta.to(residual.dtype)
    if tables.max_conditions and layer == tables.first_layer:
        decide_gates(tables, num_tokens)
    if tables.max_dynamic:
        delta = dynamic_delta(tables, layer, rms)
        stream = stream + delta
        residual = residual + delta.to(residual.dtype)
    if features:
        residual = apply_feature_ops(tables, layer, stream, residual)
    return residual + tables.const[layer].index_select(0, tables.tok_crow[:num_tokens])


def dynamic_delta(tables: SteeringTables, layer: int, rms: torch.Tensor) -> torch.Tensor:
    """sum_j coef[t, j] * (rms[t] if relative else 1) * dirs[slot, class, j] (compile.py).

    Rows on the identity slot (and unused columns) have zero directions: a zero delta.
    """
    assert tables.dyn_dirs is not None
    num_tokens = rms.shape[0]
    dirs = tables.dyn_dirs[layer].index_select(0, tables.tok_const[:num_tokens])
    coef = tables.tok_dyn[:num_tokens]
    if tables.max_conditions:
        coef = coef * tables.tok_gate[:num_tokens]
    coef = torch.where(tables.tok_dyn_rms[:num_tokens], coef * rms, coef)
    return (coef.unsqueeze(-1) * dirs.float()).sum(dim=1)


def condition_values(h: torch.Tensor, vec: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """Each condition's value (compile.Conditions) from its reduced stream h [..., C, H],
    direction vec [..., C, H] and params par [..., C, P]; float32. Row sums throughout
    (batch-invariant on CPU, see apply_residual_ops)."""
    dot = (h * vec).sum(dim=-1)
    p = torch.tanh((dot / (vec * vec).sum(dim=-1)).unsqueeze(-1) * vec)
    norms = ((h * h).sum(dim=-1) * (p * p).sum(dim=-1)).sqrt()
    cast = (h * p).sum(dim=-1) / norms
    pre = dot + par[..., COND_OFFSET]
    linear = torch.where(pre > par[..., COND_ACT_THRESHOLD], pre, torch.zeros_like(pre))
    return torch.where(par[..., COND_KIND] == COND_CAST, cast, linear)


def conditions_met(value: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
    """sign * (value - threshold) > 0 (>= 0 when not strict); unused (sign 0) and
    undecided (NaN) conditions are not met."""
    sign = par[..., COND_SIGN]
    diff = sign * (value - par[..., COND_THRESHOLD])
    met = torch.where(par[..., COND_STRICT] > 0, diff > 0, diff >= 0)
    return met & (sign != 0)


def decide_gates(tables: SteeringTables, num_tokens: int) -> None:
    """tok_cval[t] = the values of token t's request's conditions, from its accumulator as
    the step starts (NaN for token-level ones: not met until their layer); then the gates.

    A generated row's request has read its whole prompt in earlier steps (re-computed
    prompt rows after preemption add nothing: the runtime sums each position once), so
    its sums are complete; prompt rows get gates too, but entries gated by request-level
    conditions act on generated rows only (spec).
    """
    slots = tables.tok_slot[:num_tokens]
    acc = tables.cond_acc.index_select(0, tables.tok_req[:num_tokens])
    vec = tables.cond_vec.index_select(0, slots)
    par = tables.cond_par.index_select(0, slots)
    values = condition_values(acc, vec, par)
    values = torch.where(par[..., COND_TOKEN] > 0, torch.full_like(values, float("nan")), values)
    tables.tok_cval[:num_tokens].copy_(values)
    set_gates(tables, slots, values, par)


def decide_token_conditions(tables: SteeringTables, layer: int, stream: torch.Tensor) -> None:
    """Token-level conditions reading this layer take each token's own row of the stream
    (after the layer's steering); the gates are set again from the values so far, for the
    entries at later layers. The same ops at every condition layer."""
    num_tokens = stream.shape[0]
    slots = tables.tok_slot[:num_tokens]
    vec = tables.cond_vec.index_select(0, slots)
    par = tables.cond_par.index_select(0, slots)
    here = (par[..., COND_TOKEN] > 0) & (tables.tok_clayer[:num_tokens] == layer)
    own = condition_values(stream.float().unsqueeze(1), vec, par)
    values = torch.where(here, own, tables.tok_cval[:num_tokens])
    tables.tok_cval[:num_tokens].copy_(values)
    set_gates(tables, slots, values, par)


def set_gates(
    tables: SteeringTables, slots: torch.Tensor, values: torch.Tensor, par: torch.Tensor
) -> None:
    """With m the bits of the conditions token t meets: its constant row tok_crow[t] (the
    folded gate's open or closed constant, gate_open[slot, m]) and its dynamic adds' gates
    tok_gate[t, j] = dyn_truth[slot, j, m]."""
    num_tokens = slots.shape[0]
    met = conditions_met(values, par)
    bits = torch.arange(met.shape[-1], device=met.device)
    combo = (met.long() << bits).sum(dim=-1)
    opened = tables.gate_open.index_select(0, slots).gather(1, combo.unsqueeze(-1)).squeeze(-1)
    crow = tables.tok_const[:num_tokens] + (slots + opened) * NUM_CLASSES
    tables.tok_crow[:num_tokens].copy_(crow)
    if tables.max_dynamic:
        truth = tables.dyn_truth.index_select(0, slots)
        index = combo.view(-1, 1, 1).expand(-1, truth.shape[1], 1)
        tables.tok_gate[:num_tokens].copy_(truth.gather(2, index).squeeze(-1))


def accumulate_conditions(tables: SteeringTables, layer: int, stream: torch.Tensor) -> None:
    """cond_acc[r, c] += sum_t [req_t = r] w[t, c] stream_t over the tokens whose condition
    c reads this layer (the same ops at every layer; zero weights elsewhere).

    A dense [C, rows, T] @ [T, H] product rather than a scatter (index_add_): compiled on
    CPU a scatter-add is a serial atomic loop, and the product is small (rows = 2 *
    max_num_seqs + 1)."""
    num_tokens = stream.shape[0]
    here = tables.tok_clayer[:num_tokens] == layer
    w = torch.where(here, tables.tok_cw[:num_tokens], torch.zeros_like(tables.tok_cw[:num_tokens]))
    rows = torch.arange(tables.cond_acc.shape[0], device=stream.device)
    onehot = (rows.unsqueeze(1) == tables.tok_req[:num_tokens].unsqueeze(0)).float()  # [R, T]
    weights = onehot.unsqueeze(0) * w.t().unsqueeze(1)  # [C, R, T]
    tables.cond_acc.add_(torch.matmul(weights, stream.float()).transpose(0, 1))


def apply_feature_ops(
    tables: SteeringTables, layer: int, stream: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """SAE feature clamps/scales (compile.py): for each op k, in order,

    pre = <enc_k, h> + c,  s = alpha + beta * (pre if pre > theta else 0),  h <- h + s dec_k

    The identity slot (and an unused op) has all-zero rows and coefficients: s = 0.
    """
    assert tables.feat_enc is not None and tables.feat_dec is not None
    assert tables.feat_coef is not None
    num_tokens = residual.shape[0]
    slots = tables.tok_slot[:num_tokens]
    enc = tables.feat_enc[layer].index_select(0, slots)
    dec = tables.feat_dec[layer].index_select(0, slots)
    coef = tables.feat_coef[layer].index_select(0, tables.tok_crow[:num_tokens])
    for k in range(tables.max_features):
        c = coef[:, k]
        pre = (stream * enc[:, k].float()).sum(dim=-1) + c[:, 0]
        act = torch.where(pre > c[:, 1], pre, torch.zeros_like(pre))
        delta = (c[:, 2] + c[:, 3] * act).unsqueeze(-1) * dec[:, k].float()
        stream = stream + delta
        residual = residual + delta.to(residual.dtype)
    return residual


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
    if residual is None:  # the layer returned the stream itself (Gemma 4): steer it as such
        hidden = stream = apply_residual_ops(tables, layer, None, hidden)
    else:
        residual = apply_residual_ops(tables, layer, hidden, residual)
        stream = None
    if tables.reads_stream:  # the stream after this layer, formed once for its readers
        stream = hidden + residual if stream is None else stream
        if tables.capture is not None:
            capture_rows(tables.capture[layer], tables.sample_idx, stream)
        if tables.stream_all is not None:
            tables.stream_all[layer, : stream.shape[0]].copy_(stream)
        if tables.read_units is not None:
            apply_readout(tables, layer, stream)
        if layer == tables.topk_layer:
            assert tables.topk_stream is not None
            tables.topk_stream[: stream.shape[0]].copy_(stream)
        if tables.max_conditions and layer in tables.condition_layers:
            accumulate_conditions(tables, layer, stream)
            decide_token_conditions(tables, layer, stream)
    return hidden, residual


def _steered_mid_norm_forward(self, x, *args, **kwargs):
    # The norm that opens the MLP half: a fused add-norm norm(hidden, residual) adds the
    # attention output into the stream and returns (normed, stream); a plain one (Gemma 4)
    # takes the stream itself.
    out = self._steerserve_base.forward(self, x, *args, **kwargs)
    stream = out[1] if isinstance(out, tuple) else x
    tables = self._steerserve_tables
    capture_rows(tables.capture_mid[self._steerserve_layer], tables.sample_idx, stream)
    return out


def apply_expert_ops(tables: SteeringTables, layer: int, logits: torch.Tensor) -> torch.Tensor:
    """logits[t] += expert_bias[slot, class] (log of the expert masks' scales; 0 = identity),
    before the model's own routing reads them."""
    assert tables.expert_bias is not None
    bias = tables.expert_bias[layer].index_select(0, tables.tok_const[: logits.shape[0]])
    return logits + bias.to(logits.dtype)


def _steered_router_forward(self, *args, **kwargs):
    out = self._steerserve_base.forward(self, *args, **kwargs)
    tables, layer = self._steerserve_tables, self._steerserve_layer
    if isinstance(out, tuple):  # (logits, bias) from linear layers that return their bias
        return (apply_expert_ops(tables, layer, out[0]), *out[1:])
    return apply_expert_ops(tables, layer, out)


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


def install(model: nn.Module, tables: SteeringTables, shape, mid_layers: range = range(0)) -> int:
    """Swap every local decoder layer (and, with head tables, its attention kernel and
    o_proj) to its steered subclass; returns how many layers."""
    amap = map_model(model)
    check_against_shape(amap, shape)
    if tables.heads is not None:
        for sites in amap.layers:
            if sites.has_heads:
                check_heads(sites, len(tables.heads), tables.head_dim, tables.heads)
    tables.first_layer = amap.layers[0].index
    for sites in amap.layers:
        _swap(sites.layer, _steered_layer_forward, sites.index, tables)
        if tables.heads is not None and sites.has_heads:
            _swap(sites.kernel, _steered_attn_forward, sites.index, tables)
            _swap(sites.o_proj, _steered_o_proj_forward, sites.index, tables)
        if tables.expert_bias is not None and sites.router is not None:
            _swap(sites.router, _steered_router_forward, sites.index, tables)
        if tables.capture is not None and sites.index in mid_layers:
            if sites.mid_norm is None:
                raise UnsupportedModelError(
                    f"layer {sites.index}: no norm opening the MLP half, so no stream before "
                    "the MLP for layer-fused decoding (disable it: decoding=false)"
                )
            _swap(sites.mid_norm, _steered_mid_norm_forward, sites.index, tables)
    return len(amap.layers)
