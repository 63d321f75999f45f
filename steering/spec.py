"""The intervention spec (v1): pydantic models, validation against the served model, fingerprint.

A spec arrives as JSON (HTTP field `steering`, or `SamplingParams.extra_args["steering"]`).
`parse_spec` validates it against the loaded model in one pass and returns a `SteeringSpec`
whose vector entries carry their resolved per-layer data; every problem is reported as a
`SpecError` that names the field (`steering.vectors[0].layers[1]`) and the reason.
"""

from __future__ import annotations

import ast
import hashlib
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:  # sae.py imports this module
    from steering.sae import FeatureRows

Op = Literal["add", "ablate", "clamp", "mix"]
FeatureOp = Literal["add", "clamp", "scale"]
Site = Literal["residual", "heads"]
# Which tokens an entry acts on, by rel = position - prompt_length
# (docs/design.md#token-classes-and-positions):
# prompt rel < 0, generated rel >= 0, last_prompt rel == -1 (the row that predicts the
# first generated token), from_last_prompt rel >= -1 (the last row of every forward pass).
Positions = Literal["all", "prompt", "generated", "last_prompt", "from_last_prompt"]


# Layer types (HF config `layer_types`) whose layers have no attention heads.
HEADLESS_LAYER_TYPES = frozenset({"linear_attention", "mamba", "conv"})


@dataclass(frozen=True)
class ModelShape:
    """What validation needs to know of the served model."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int  # query heads (head masks and head-site vectors index these)
    num_kv_heads: int
    head_dim: int
    # Layers with attention heads (None: every layer); hybrid models' linear-attention
    # layers have none.
    attention_layers: tuple[int, ...] | None = None
    # Routed experts of each layer (0: a dense MLP); empty for a dense model.
    layer_experts: tuple[int, ...] = ()
    experts_per_token: int = 0  # the router's top-k

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        text = getattr(config, "get_text_config", lambda: config)()
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        heads = int(text.num_attention_heads)
        num_layers = int(text.num_hidden_layers)
        return cls(
            architecture=archs[0],
            num_layers=num_layers,
            hidden_size=int(text.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
            attention_layers=_attention_layers(text, num_layers),
            layer_experts=_layer_experts(text, num_layers),
            experts_per_token=int(getattr(text, "num_experts_per_tok", None) or 0),
        )

    def width(self, site: str) -> int:
        """Length of a vector at `site`: the residual stream, or o_proj's input (H*D)."""
        return self.hidden_size if site == "residual" else self.num_heads * self.head_dim

    def has_heads(self, layer: int) -> bool:
        return self.attention_layers is None or layer in self.attention_layers

    def experts_of(self, layer: int) -> int:
        return self.layer_experts[layer] if self.layer_experts else 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, n in enumerate(self.layer_experts) if n]

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0: a dense model)."""
        return max(self.layer_experts, default=0)

    @property
    def head_layers(self) -> list[int]:
        """Layers with attention heads."""
        return [i for i in range(self.num_layers) if self.has_heads(i)]


def _attention_layers(text: Any, num_layers: int) -> tuple[int, ...] | None:
    types = getattr(text, "layer_types", None) or []
    headless = {i for i, t in enumerate(types) if t in HEADLESS_LAYER_TYPES}
    return tuple(i for i in range(num_layers) if i not in headless) if headless else None


def _layer_experts(text: Any, num_layers: int) -> tuple[int, ...]:
    """Experts per layer by the config's own sparsity rules (as vLLM's model code reads them:
    Qwen's `mlp_only_layers` and `decoder_sparse_step`, Llama 4's `interleave_moe_layer_step`)."""
    num = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)
    if not num:
        return ()
    dense = set(getattr(text, "mlp_only_layers", None) or [])
    step = int(getattr(text, "decoder_sparse_step", None) or 1)
    interleave = getattr(text, "interleave_moe_layer_step", None)
    if interleave is not None:
        step = int(interleave)
        if step <= 0:
            return ()

    def sparse(i: int) -> bool:
        return i not in dense and (i + 1) % step == 0

    return tuple(num if sparse(i) else 0 for i in range(num_layers))


class VectorSource(Protocol):
    """Where named vectors come from (a `VectorRegistry`, or any mapping-like lookup)."""

    def lookup(
        self, name: str, shape: ModelShape, site: str = "residual"
    ) -> Mapping[int, np.ndarray]:
        """Per-layer float32 data of `name` at `site`; KeyError/ValueError with the reason."""
        ...


class SaeSource(Protocol):
    """Where named SAEs come from (a `steering.sae.SaeRegistry`)."""

    def lookup(self, name: str, shape: ModelShape) -> Any:
        """The `SparseAutoencoder` `name`; KeyError/ValueError with the reason."""
        ...


@dataclass
class SpecContext:
    """The served model and the server's registries, against which a spec is validated."""

    shape: ModelShape
    vectors: VectorSource | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    max_vectors: int = 16
    max_head_masks: int = 256
    max_inline_floats: int = 1 << 22
    max_readouts: int = 0  # readout entries per request (0: the engine has readout off)
    saes: SaeSource | None = None
    max_features: int = 0  # feature clamps/scales per layer (0: the engine has them off)
    feature_layers: tuple[int, ...] | None = None  # where they run (None: every layer)
    max_feature_entries: int = 64
    topk_sae: str | None = None  # the SAE top-k readout reads (None: the engine has it off)
    max_topk: int = 0
    max_dynamic: int = 0  # scheduled / RMS-relative adds per request (0: the engine has them off)
    max_conditions: int = 0  # conditions per request (0: the engine has them off)
    condition_layers: tuple[int, ...] | None = None  # layers they may read (None: every layer)


class SpecError(ValueError):
    """A spec problem. `errors` holds (field, message) pairs; str() joins them.

    `kinds` names the classes of problem found, for a caller that maps them to statuses:
    "too_large" (inline data over the size limit), "unknown_preset", "invalid".
    """

    def __init__(self, errors: list[tuple[str, str]], kinds: Iterable[str] = ("invalid",)):
        self.errors = errors
        self.kinds = frozenset(kinds)
        super().__init__("; ".join(f"{loc}: {msg}" for loc, msg in errors))


def _fail(kind: str, message: str, **ctx: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx or None)


def _context(info: ValidationInfo) -> SpecContext | None:
    return info.context.get("steering") if info.context else None


def _check_layer(layer: int, ctx: SpecContext) -> None:
    if not 0 <= layer < ctx.shape.num_layers:
        raise _fail(
            "layer_range",
            "layer {layer} is out of range for this model (0..{last})",
            layer=layer,
            last=ctx.shape.num_layers - 1,
        )


def _layer_in_range(cls: type, layer: int | None, info: ValidationInfo) -> int | None:
    """Field validator of a single optional `layer` (readout entries, conditions; None:
    the entry's own rules decide, e.g. an SAE's layer)."""
    ctx = _context(info)
    if ctx is not None and layer is not None:
        _check_layer(layer, ctx)
    return layer


def _check_has_heads(layer: int, ctx: SpecContext) -> None:
    if not ctx.shape.has_heads(layer):
        raise _fail(
            "no_heads",
            "layer {layer} has no attention heads in this model (a linear-attention layer); "
            "attention layers: {layers}",
            layer=layer,
            layers=ctx.shape.head_layers,
        )


def _attention_layer(cls: type, layer: int, info: ValidationInfo) -> int:
    """Field validator of a head mask's `layer`: in range, with attention heads."""
    ctx = _context(info)
    if ctx is not None:
        _check_layer(layer, ctx)
        _check_has_heads(layer, ctx)
    return layer


def _registered(name: str, ctx: SpecContext, site: str) -> Mapping[int, np.ndarray]:
    """The per-layer data of registered vector `name` at `site`, or a named failure."""
    if ctx.vectors is None:
        raise _fail("unknown_vector", "no vector registry is configured; send 'data' inline")
    try:
        return ctx.vectors.lookup(name, ctx.shape, site)
    except (KeyError, ValueError) as e:
        raise _fail("unknown_vector", "{reason}", reason=e.args[0] if e.args else str(e)) from e


def _direction_at(
    name: str | None, data: list[float] | None, layer: int, ctx: SpecContext, what: str
) -> np.ndarray:
    """One layer's float32 direction from registered vector `name` or inline `data` (one of
    them given): present at `layer`, the model's width, finite and not zero. `what` names it
    in the errors ("the vector", "the condition's direction")."""
    if name is not None:
        found = _registered(name, ctx, "residual")
        if layer not in found:
            raise _fail(
                "layer_missing",
                "vector {name} has no data for layer {layer} (it has {have})",
                name=repr(name),
                layer=layer,
                have=sorted(int(k) for k in found),
            )
        vec = np.array(found[layer], dtype=np.float32)
    else:
        assert data is not None
        if len(data) != ctx.shape.hidden_size:
            raise _fail(
                "width",
                "'data' has {got} values, the model's hidden size is {want}",
                got=len(data),
                want=ctx.shape.hidden_size,
            )
        vec = inline_float32(data)
    if not np.isfinite(vec).all():
        raise _fail("not_finite", "{what} holds NaN or Inf", what=what)
    if not float(np.linalg.norm(vec.astype(np.float64))) > 0.0:
        raise _fail("zero_vector", "{what} is zero, it has no direction", what=what)
    return vec


def _check_heads(heads: list[int], ctx: SpecContext | None) -> list[int]:
    if not heads:
        raise _fail("empty_heads", "must name at least one head")
    if len(set(heads)) != len(heads):
        raise _fail("duplicate_heads", "lists a head more than once")
    if ctx is not None:
        s = ctx.shape
        for head in heads:
            if not 0 <= head < s.num_heads:
                raise _fail(
                    "head_range",
                    "head {head} is out of range: the model has {n} query heads (0..{last})"
                    + (", grouped over {kv} KV heads" if s.num_kv_heads != s.num_heads else ""),
                    head=head,
                    n=s.num_heads,
                    last=s.num_heads - 1,
                    kv=s.num_kv_heads,
                )
    return sorted(heads)


def _site_of(info: ValidationInfo) -> str:
    return info.data.get("site", "residual")


ScheduleKind = Literal["constant", "linear", "exp", "window"]


class Schedule(BaseModel):
    """An add's strength over the generated position g = position - prompt_length (g = 0 is
    the first generated token; prompt rows have g < 0). The entry's scale is multiplied by

    constant: 1
    linear:   1 before `start`, then 1 + (end - 1) * min((g - start) / steps, 1)
    exp:      1 before `start`, then 0.5 ** ((g - start) / half_life)
    window:   1 for start <= g < stop, else 0
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: ScheduleKind = "constant"
    start: int = Field(0, ge=0)
    steps: int | None = Field(None, ge=1)
    end: float | None = None
    half_life: float | None = Field(None, gt=0)
    stop: int | None = None

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Schedule:
        needs = {"constant": (), "linear": ("steps",), "exp": ("half_life",), "window": ("stop",)}
        allowed = {"linear": ("steps", "end")}.get(self.kind, needs[self.kind])
        for name in ("steps", "end", "half_life", "stop"):
            given = getattr(self, name) is not None
            if name in needs[self.kind] and not given:
                raise _fail(
                    "schedule_field", "kind '{what}' needs '{name}'", what=self.kind, name=name
                )
            if given and name not in allowed:
                raise _fail(
                    "schedule_field",
                    "'{name}' is not used by kind '{what}'",
                    what=self.kind,
                    name=name,
                )
        if self.kind == "window" and self.stop is not None and self.stop <= self.start:
            raise _fail("schedule_window", "'stop' must be greater than 'start'")
        return self

    def factor(self, g: np.ndarray) -> np.ndarray:
        """The multiplier at generated positions `g` (float64), straight from the formulas."""
        g = np.asarray(g, dtype=np.float64)
        after = g - self.start
        if self.kind == "linear":
            assert self.steps is not None
            end = 0.0 if self.end is None else self.end
            ramp = np.clip(after / self.steps, 0.0, 1.0)
            return 1.0 + (end - 1.0) * ramp
        if self.kind == "exp":
            assert self.half_life is not None
            return np.where(after < 0, 1.0, 0.5 ** (np.maximum(after, 0.0) / self.half_life))
        if self.kind == "window":
            return ((after >= 0) & (g < (self.stop or 0))).astype(np.float64)
        return np.ones_like(g)


class VectorEntry(BaseModel):
    """One vector intervention at the residual stream or the heads' o_proj input."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # `site` comes first: the fields after it are validated against its width.
    site: Site = "residual"
    name: str | None = None
    data: dict[int, list[float]] | None = None
    layers: list[int] | None = None
    heads: list[int] | None = None
    op: Op = "add"
    scale: float = 1.0
    value: float | None = None
    weight: float | None = None
    normalize: bool = False
    positions: Positions = "all"
    # Dynamic strength (op "add" at the residual stream only): `schedule` over generated
    # positions, `relative` "rms" multiplies by RMS(h) of the stream the layer produced.
    schedule: Schedule | None = None
    relative: Literal["rms"] | None = None
    # Gate: a boolean expression over the spec's condition names (`and`, `or`, `not`).
    when: str | None = None

    # Per-layer float32 data after name/data resolution and the `layers` subset.
    _resolved: dict[int, np.ndarray] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str | None, info: ValidationInfo) -> str | None:
        ctx = _context(info)
        if name is not None and ctx is not None:
            _registered(name, ctx, _site_of(info))
        return name

    @field_validator("data")
    @classmethod
    def _inline_data(
        cls, data: dict[int, list[float]] | None, info: ValidationInfo
    ) -> dict[int, list[float]] | None:
        ctx = _context(info)
        if data is None or ctx is None:
            return data
        if not data:
            raise _fail("empty_data", "must hold at least one layer")
        floats = sum(len(v) for v in data.values())
        if floats > ctx.max_inline_floats:
            raise _fail(
                "too_large",
                "inline data holds {n} floats, more than the limit of {lim}",
                n=floats,
                lim=ctx.max_inline_floats,
            )
        site = _site_of(info)
        width = ctx.shape.width(site)
        for layer, vec in data.items():
            _check_layer(layer, ctx)
            if len(vec) != width:
                s = ctx.shape
                what = (
                    f"the model's hidden size is {width}"
                    if site == "residual"
                    else f"site 'heads' needs num_heads * head_dim = {s.num_heads} * "
                    f"{s.head_dim} = {width}"
                )
                raise _fail(
                    "width",
                    "layer {layer} has {got} values, {what}",
                    layer=layer,
                    got=len(vec),
                    what=what,
                )
        return data

    @field_validator("layers")
    @classmethod
    def _layer_list(cls, layers: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if layers is None:
            return None
        if not layers:
            raise _fail("empty_layers", "must name at least one layer (omit it for all)")
        if len(set(layers)) != len(layers):
            raise _fail("duplicate_layers", "lists a layer more than once")
        ctx = _context(info)
        if ctx is not None:
            for layer in layers:
                _check_layer(layer, ctx)
        return sorted(layers)

    @field_validator("heads")
    @classmethod
    def _head_list(cls, heads: list[int] | None, info: ValidationInfo) -> list[int] | None:
        return None if heads is None else _check_heads(heads, _context(info))

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> VectorEntry:
        if (self.name is None) == (self.data is None):
            raise _fail(
                "source", "give exactly one of 'name' (a registered vector) or 'data' (inline)"
            )
        if self.op == "clamp" and self.value is None:
            raise _fail("clamp_value", "op 'clamp' needs 'value' (the target projection)")
        if self.op != "clamp" and self.value is not None:
            raise _fail("value_unused", "'value' is only used by op 'clamp'")
        if self.normalize and self.op != "add":
            raise _fail(
                "normalize_unused",
                "'normalize' applies to op 'add' only (ablate and clamp use the unit vector)",
            )
        if self.site == "heads" and self.op in ("ablate", "clamp"):
            raise _fail(
                "op_site",
                "op '{op}' acts on the residual stream; at site 'heads' use 'add' or 'mix' "
                "(or a head mask in 'heads')",
                op=self.op,
            )
        if self.op == "mix":
            if self.site != "heads":
                raise _fail("op_site", "op 'mix' is only available at site 'heads'")
            if self.weight is None or not 0.0 <= self.weight <= 1.0:
                raise _fail("mix_weight", "op 'mix' needs 'weight' between 0 and 1")
        elif self.weight is not None:
            raise _fail("weight_unused", "'weight' is only used by op 'mix'")
        if self.heads is not None and self.site != "heads":
            raise _fail("heads_unused", "'heads' restricts a vector at site 'heads' only")
        if (self.is_dynamic or self.when is not None) and (
            self.op != "add" or self.site != "residual"
        ):
            raise _fail(
                "dynamic_op",
                "'schedule', 'relative' and 'when' apply to op 'add' at site 'residual' only",
            )
        ctx = _context(info)
        if ctx is not None:
            self._resolve(ctx)
        return self

    @property
    def is_dynamic(self) -> bool:
        """Its strength varies per token (a schedule or an RMS-relative scale): an in-graph
        add of its own rather than a folded constant (docs/design.md#dynamic-adds). A
        `when` alone does not make it one: constant adds under one gate fold into a
        second constant (`dynamic_entries` lists the adds that are dynamic in a spec)."""
        return self.schedule is not None or self.relative is not None

    def _resolve(self, ctx: SpecContext) -> None:
        if self.name is not None:
            found = _registered(self.name, ctx, self.site)
            source = {int(k): v for k, v in found.items()}
            origin = f"vector {self.name!r}"
        else:
            assert self.data is not None
            source = {k: inline_float32(v) for k, v in self.data.items()}
            origin = "'data'"
        layers = self.layers if self.layers is not None else sorted(source)
        missing = [layer for layer in layers if layer not in source]
        if missing:
            raise _fail(
                "layer_missing",
                "{origin} has no data for layer(s) {missing} (it has {have})",
                origin=origin,
                missing=missing,
                have=sorted(source),
            )
        resolved = {}
        for layer in layers:
            if self.site == "heads":
                _check_has_heads(layer, ctx)
            vec = np.array(source[layer], dtype=np.float32)
            # Inline floats were checked by pydantic; float32 can still overflow to inf.
            if not np.isfinite(vec).all():
                raise _fail(
                    "not_finite",
                    "{origin} has NaN or Inf at layer {layer}",
                    origin=origin,
                    layer=layer,
                )
            if self.heads is not None:
                # Restricting to listed heads = zeroing the others' slices; a zero slice is
                # left alone by every op (add adds 0, mix mixes only non-zero heads).
                per_head = vec.reshape(ctx.shape.num_heads, ctx.shape.head_dim)
                keep = np.zeros(ctx.shape.num_heads, dtype=bool)
                keep[self.heads] = True
                per_head[~keep] = 0.0
            needs_unit = self.op != "add" or self.normalize
            if needs_unit and not float(np.linalg.norm(vec.astype(np.float64))) > 0.0:
                where = " on the listed heads" if self.heads is not None else ""
                raise _fail(
                    "zero_vector",
                    "{origin} is zero{where} at layer {layer}, it has no direction",
                    origin=origin,
                    where=where,
                    layer=layer,
                )
            resolved[layer] = vec
        self._resolved = resolved

    @property
    def resolved(self) -> dict[int, np.ndarray]:
        """Per-layer float32 vectors (restricted to `heads` if given), once validated."""
        return self._resolved


def _sae_of(name: str, ctx: SpecContext) -> Any:
    if ctx.saes is None:
        raise _fail("unknown_sae", "no SAE registry is configured on this server")
    try:
        return ctx.saes.lookup(name, ctx.shape)
    except (KeyError, ValueError) as e:
        raise _fail("unknown_sae", "{reason}", reason=e.args[0] if e.args else str(e)) from e


def _check_feature(sae: Any, name: str, feature: int) -> None:
    if not 0 <= feature < sae.width:
        raise _fail(
            "feature_range",
            "feature {feature} is out of range for SAE {name} ({width} features: 0..{last})",
            feature=feature,
            name=repr(name),
            width=sae.width,
            last=sae.width - 1,
        )


class FeatureEntry(BaseModel):
    """One SAE feature op on the residual stream at the SAE's layer (docs/spec.md#sae-features):

    add   : h += scale * W_dec[f]          (times the feature's typical activation if relative)
    clamp : h += (value - a_f(h)) * W_dec[f]
    scale : h += (factor - 1) * a_f(h) * W_dec[f]

    with a_f(h) = act(W_enc[:, f] . (h - b_dec) + b_enc[f]) (steering/sae.py).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sae: str
    feature: int
    op: FeatureOp = "add"
    scale: float = 1.0
    relative: bool = False
    value: float | None = None
    factor: float | None = None
    positions: Positions = "all"

    _sae: Any = PrivateAttr(default=None)
    _rows: FeatureRows | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> FeatureEntry:
        if self.op == "clamp" and self.value is None:
            raise _fail("clamp_value", "op 'clamp' needs 'value' (the activation to pin)")
        if self.op != "clamp" and self.value is not None:
            raise _fail("value_unused", "'value' is only used by op 'clamp'")
        if self.op == "scale" and self.factor is None:
            raise _fail("scale_factor", "op 'scale' needs 'factor' (multiplies the activation)")
        if self.op != "scale" and self.factor is not None:
            raise _fail("factor_unused", "'factor' is only used by op 'scale'")
        if self.relative and self.op != "add":
            raise _fail("relative_unused", "'relative' applies to op 'add' only")
        if self.op != "add" and self.scale != 1.0:
            raise _fail("scale_unused", "'scale' is only used by op 'add' ('factor' for 'scale')")
        ctx = _context(info)
        if ctx is None:
            return self
        sae = _sae_of(self.sae, ctx)
        _check_feature(sae, self.sae, self.feature)
        if self.relative and sae.typical is None:
            raise _fail(
                "no_typical",
                "SAE {name} records no typical activations, so 'relative' has no scale",
                name=repr(self.sae),
            )
        if self.op != "add" and ctx.max_features == 0:
            raise _fail(
                "features_off",
                "op '{op}' needs an engine started with feature ops on "
                "(additional_config.steerserve.max_features; steerserve serve "
                "--max-steering-features N); 'add' is always available",
                op=self.op,
            )
        if (
            self.op != "add"
            and ctx.feature_layers is not None
            and sae.layer not in ctx.feature_layers
        ):
            raise _fail(
                "feature_layer",
                "SAE {name} reads layer {layer}; this engine runs feature clamps/scales at "
                "layers {layers} only (additional_config.steerserve.feature_layers; "
                "steerserve serve --steering-feature-layers)",
                name=repr(self.sae),
                layer=sae.layer,
                layers=list(ctx.feature_layers),
            )
        self._sae = sae
        self._rows = sae.feature_rows(self.feature)
        return self

    @property
    def rows(self) -> FeatureRows:
        """The feature's encoder and decoder rows, offset and threshold (validated)."""
        # Read past pydantic's __getattr__ (about 4 us a read; compile reads rows several
        # times per entry, 16 entries per request in the feature benchmark).
        rows = (self.__pydantic_private__ or {}).get("_rows")
        assert rows is not None, "validated without a model context"
        return rows

    @property
    def layer(self) -> int:
        return self.rows.layer

    @property
    def resolved_sae(self) -> Any:
        assert self._sae is not None, "validated without a model context"
        return self._sae

    @property
    def add_scale(self) -> float:
        """The coefficient of W_dec[f] of an `add`."""
        if self.relative:
            return self.scale * float(self.resolved_sae.typical[self.feature])
        return self.scale


class HeadMask(BaseModel):
    """Scale query heads at one layer: their attention output (the o_proj input slices,
    target "output") or their query vectors (target "query": 0 gives uniform attention
    over the visible positions, i.e. the mean of V, as retrieval-head masking does)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: int
    heads: list[int]
    scale: float = 0.0
    target: Literal["output", "query"] = "output"
    positions: Positions = "all"

    _layer_range = field_validator("layer")(_attention_layer)

    @field_validator("heads")
    @classmethod
    def _head_list(cls, heads: list[int], info: ValidationInfo) -> list[int]:
        return _check_heads(heads, _context(info))


def dola_buckets(num_layers: int) -> dict[str, list[int]]:
    """HF's DoLa candidate buckets, as layer indices of this project's convention."""
    n = num_layers
    if n <= 40:
        return {"low": list(range(0, n // 2, 2)), "high": list(range(n // 2, n, 2))}
    return {"low": list(range(0, 20, 2)), "high": list(range(n - 20, n, 2))}


def lfd_layers(num_layers: int) -> list[int]:
    """LFD's default candidates: its code uses decoder layers 16, 18, ..., 30 (1-based) of
    32-layer models, i.e. every other layer output from N/2 to N-2; here 0-based."""
    return list(range(num_layers // 2 - 1, num_layers - 2, 2)) or [num_layers - 2]


def _moe_layer(cls: type, layer: int, info: ValidationInfo) -> int:
    """Field validator of an expert mask's `layer`: in range, with routed experts."""
    ctx = _context(info)
    if ctx is not None:
        _check_layer(layer, ctx)
        if not ctx.shape.experts_of(layer):
            raise _fail(
                "no_experts",
                "layer {layer} has no routed experts in this model; MoE layers: {layers}",
                layer=layer,
                layers=ctx.shape.moe_layers,
            )
    return layer


class ExpertMask(BaseModel):
    """Scale the router probability of some experts at one MoE layer, for the tokens in
    `positions`: their router logits shift by log(scale) before the model's own routing
    (top-k, softmax, renormalisation) runs, so 0 means never routed to, and for softmax
    routers (Mixtral, Qwen MoE, GPT-OSS) the others are renormalised as the router does."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    layer: int
    experts: list[int]
    scale: float = 0.0
    positions: Positions = "all"

    _layer_range = field_validator("layer")(_moe_layer)

    @field_validator("scale")
    @classmethod
    def _non_negative(cls, scale: float) -> float:
        if scale < 0:
            raise _fail("scale_range", "must be >= 0 (a factor on router probabilities)")
        return scale

    @field_validator("experts")
    @classmethod
    def _expert_list(cls, experts: list[int], info: ValidationInfo) -> list[int]:
        if not experts:
            raise _fail("empty_experts", "must name at least one expert")
        if len(set(experts)) != len(experts):
            raise _fail("duplicate_experts", "lists an expert more than once")
        ctx = _context(info)
        layer = info.data.get("layer")
        if ctx is not None and layer is not None:
            n = ctx.shape.experts_of(layer)
            bad = [e for e in experts if not 0 <= e < n]
            if bad:
                raise _fail(
                    "expert_range",
                    "expert(s) {bad} out of range: layer {layer} has {n} experts (0..{last})",
                    bad=bad,
                    layer=layer,
                    n=n,
                    last=n - 1,
                )
        return sorted(experts)


class DecodingSpec(BaseModel):
    """Decoding that reads intermediate layers (docs/spec.md, layer-fused and contrastive).

    fuse:     logits <- (1-w) log_softmax(z_F) + w log_softmax(z_L); L fixed or "auto" (the
              latter-half layer with the lowest IKS at the last prompt row, once per request).
    contrast: DoLa; per row M = argmax_j JSD(q_F, q_j), logits <- log q_F - log q_M on
              {x: q_F(x) >= alpha max q_F}, -inf elsewhere.
    lfd:      LFD as its official code does it: per row, the candidate with the lowest IKS
              (the code's JS variant), logits <- log q_F + log_softmax(lm_head(h_L)) (no final
              norm on h_L) on the same plausible set, -inf elsewhere.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: Literal["fuse", "contrast", "lfd"]
    layer: int | Literal["auto"] | None = None
    weight: float | None = None
    layers: list[int] | Literal["low", "high", "latter_half"] | None = None
    alpha: float | None = None

    # Resolved: the fixed fuse layer or the candidate layers, ascending.
    _candidates: list[int] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> DecodingSpec:
        ctx = _context(info)
        n = ctx.shape.num_layers if ctx is not None else None
        if self.mode == "fuse":
            if self.layer is None:
                raise _fail("fuse_layer", "mode 'fuse' needs 'layer' (an index or \"auto\")")
            if self.weight is None or not 0.0 <= self.weight <= 1.0:
                raise _fail("fuse_weight", "mode 'fuse' needs 'weight' between 0 and 1")
            if self.layers is not None or self.alpha is not None:
                raise _fail("fuse_fields", "mode 'fuse' takes 'layer' and 'weight' only")
            if n is not None:
                if self.layer == "auto":
                    self._candidates = list(range((n + 1) // 2, n - 1))
                    if not self._candidates:
                        raise _fail("auto_layers", "layer 'auto' needs a model of 3+ layers")
                else:
                    self._check_early_layer(self.layer, n)
                    self._candidates = [int(self.layer)]
        else:
            if self.mode == "lfd" and self.layers is None:
                self.layers = "latter_half"
            if self.layers is None:
                raise _fail("contrast_layers", "mode 'contrast' needs 'layers' (a list, low, high)")
            if self.alpha is None:
                self.alpha = 0.1
            if not 0.0 <= self.alpha <= 1.0:
                raise _fail("contrast_alpha", "'alpha' must be between 0 and 1")
            if self.layer is not None or self.weight is not None:
                raise _fail(
                    "contrast_fields",
                    "mode '{mode}' takes 'layers' and 'alpha' only",
                    mode=self.mode,
                )
            if n is not None:
                if isinstance(self.layers, str):
                    if (self.layers == "latter_half") != (self.mode == "lfd"):
                        raise _fail(
                            "contrast_layers",
                            "'layers' of mode {mode} is a list or {named}",
                            mode=self.mode,
                            named="'latter_half'" if self.mode == "lfd" else "'low'/'high'",
                        )
                    layers = lfd_layers(n) if self.mode == "lfd" else dola_buckets(n)[self.layers]
                else:
                    layers = self.layers
                    if not layers or len(set(layers)) != len(layers):
                        raise _fail("contrast_layers", "'layers' must list distinct layers")
                    for layer in layers:
                        self._check_early_layer(layer, n)
                self._candidates = sorted(layers)
                if not self._candidates:
                    raise _fail("contrast_layers", "no candidate layers for this model")
        return self

    def _check_early_layer(self, layer: int, n: int) -> None:
        if not 0 <= layer <= n - 2:
            raise _fail(
                "layer_range",
                "{mode} layer {layer} is out of range (0..{last}; layer {final} is the final "
                "layer itself)",
                mode=self.mode,
                layer=layer,
                last=n - 2,
                final=n - 1,
            )

    @property
    def candidates(self) -> list[int]:
        return self._candidates


class ReadoutEntry(BaseModel):
    """Read the residual stream at the output of `layer`: its projection on the unit vector
    of a registered vector (`name`) or of inline `data`, the activation of SAE feature
    `feature` of `sae` (at the SAE's layer), or the `top_k` most active features of `sae`
    (the server's top-k SAE), per generated token (and per prompt token with `prompt`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = None
    data: list[float] | None = None
    sae: str | None = None
    feature: int | None = None
    top_k: int | None = Field(default=None, ge=1)
    layer: int | None = None
    prompt: bool = False

    _unit: np.ndarray | None = PrivateAttr(default=None)
    # A feature's activation: where(<e, h> + offset > threshold, <e, h> + offset, 0).
    _offset: float = PrivateAttr(default=0.0)
    _threshold: float | None = PrivateAttr(default=None)
    _label: str | None = PrivateAttr(default=None)
    _sae: Any = PrivateAttr(default=None)

    _layer_range = field_validator("layer")(_layer_in_range)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ReadoutEntry:
        sources = [x is not None for x in (self.name, self.data, self.sae)]
        if sum(sources) != 1:
            raise _fail(
                "source",
                "give exactly one of 'name' (a registered vector), 'data' (inline) or 'sae' "
                "with 'feature' or 'top_k'",
            )
        if self.sae is None and (self.feature is not None or self.top_k is not None):
            raise _fail("sae", "'feature' and 'top_k' read an SAE: give 'sae'")
        if self.sae is not None and (self.feature is None) == (self.top_k is None):
            raise _fail("feature", "'sae' takes one of 'feature' (its activation) or 'top_k'")
        if self.sae is None and self.layer is None:
            raise _fail("layer", "a vector readout needs 'layer'")
        ctx = _context(info)
        if ctx is None:
            return self
        if self.top_k is not None:
            return self._resolve_topk(ctx)
        if self.sae is not None:
            return self._resolve_feature(ctx)
        assert self.layer is not None
        vec = _direction_at(self.name, self.data, self.layer, ctx, "the vector")
        self._unit = unit(vec)
        return self

    def _resolve_feature(self, ctx: SpecContext) -> ReadoutEntry:
        assert self.sae is not None and self.feature is not None
        sae = self._sae_at_its_layer(ctx)
        _check_feature(sae, self.sae, self.feature)
        rows = sae.feature_rows(self.feature)
        self._unit, self._offset, self._threshold = rows.enc, rows.offset, rows.threshold
        self._label = sae.label(self.feature)
        return self

    def _resolve_topk(self, ctx: SpecContext) -> ReadoutEntry:
        assert self.sae is not None and self.top_k is not None
        if ctx.topk_sae is None:
            raise _fail(
                "topk_off",
                "top-k readout needs an engine started with a top-k SAE "
                "(steerserve serve --steering-topk-sae NAME; additional_config.steerserve."
                "topk_sae)",
            )
        if self.sae != ctx.topk_sae:
            raise _fail(
                "topk_sae",
                "top-k readout on this server reads SAE {want} (one per server), not {name}",
                want=repr(ctx.topk_sae),
                name=repr(self.sae),
            )
        sae = self._sae_at_its_layer(ctx)
        limit = min(ctx.max_topk, sae.width)
        if self.top_k > limit:
            raise _fail(
                "topk_range",
                "top_k {k} is more than this server allows ({limit}: max_topk {m}, SAE width {w})",
                k=self.top_k,
                limit=limit,
                m=ctx.max_topk,
                w=sae.width,
            )
        return self

    def _sae_at_its_layer(self, ctx: SpecContext) -> Any:
        assert self.sae is not None
        sae = _sae_of(self.sae, ctx)
        if self.layer is not None and self.layer != sae.layer:
            raise _fail(
                "layer",
                "SAE {name} reads layer {have}, not {layer} (omit 'layer')",
                name=repr(self.sae),
                have=sae.layer,
                layer=self.layer,
            )
        self.layer = int(sae.layer)
        self._sae = sae
        return sae

    @property
    def resolved_sae(self) -> Any:
        """The SAE of a feature readout (None for a vector)."""
        return self._sae

    @property
    def unit_vector(self) -> np.ndarray:
        """The direction read: a unit vector, or a feature's encoder row (not unit norm)."""
        assert self._unit is not None, "validated without a model context"
        return self._unit

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def threshold(self) -> float | None:
        """None for a vector (the projection itself); a feature's activation threshold."""
        return self._threshold

    @property
    def label(self) -> str | None:
        return self._label


ConditionReduce = Literal["prompt_mean", "last_prompt", "token"]
ConditionMeasure = Literal["cosine", "projection", "activation"]
ConditionOp = Literal[">", ">=", "<", "<="]
_CONDITION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Condition(BaseModel):
    """A test on the residual stream at the output of `layer` (docs/spec.md#conditions),
    measured against a direction and compared with `threshold`:

    request-level (CAST, Lee et al. 2024): the stream reduced over the prompt (mean of
        every prompt row, `prompt_mean`, or the last one, `last_prompt`), decided once
        the prompt is read, gating the rest of the request;
    token-level (`token`): each token's own row, gating that token at later layers.

    cosine     : cos(h, tanh(P h)) with P = c c^T / (c^T c), CAST's similarity
    projection : <h, c / |c|>
    activation : SAE feature `feature` of `sae`'s activation a_f(h) (at the SAE's layer)

    `vector` names a registered vector (its direction at `layer`), `data` is inline.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str
    vector: str | None = None
    data: list[float] | None = None
    sae: str | None = None
    feature: int | None = None
    layer: int | None = None
    reduce: ConditionReduce = "prompt_mean"
    measure: ConditionMeasure | None = None
    op: ConditionOp = ">"
    threshold: float

    _direction: np.ndarray | None = PrivateAttr(default=None)
    _rows: Any = PrivateAttr(default=None)  # FeatureRows for measure "activation"
    _sae: Any = PrivateAttr(default=None)

    _layer_range = field_validator("layer")(_layer_in_range)

    @field_validator("name")
    @classmethod
    def _identifier(cls, name: str) -> str:
        if not _CONDITION_NAME.fullmatch(name) or name in ("and", "or", "not"):
            raise _fail(
                "condition_name",
                "must be an identifier (letters, digits, _; not and/or/not): it is used in "
                "'when' expressions",
            )
        return name

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> Condition:
        sources = [self.vector is not None, self.data is not None, self.sae is not None]
        if sum(sources) != 1:
            raise _fail(
                "condition_source",
                "give exactly one of 'vector' (registered), 'data' (inline) or 'sae' with "
                "'feature'",
            )
        if (self.sae is None) != (self.feature is None):
            raise _fail("condition_source", "'sae' and 'feature' go together")
        if self.measure is None:
            self.measure = "activation" if self.sae is not None else "cosine"
        if (self.measure == "activation") != (self.sae is not None):
            raise _fail(
                "condition_measure",
                "measure 'activation' reads an SAE feature ('sae', 'feature'); a vector is "
                "measured by 'cosine' or 'projection'",
            )
        ctx = _context(info)
        if ctx is None:
            return self
        if self.sae is not None:
            assert self.feature is not None
            sae = _sae_of(self.sae, ctx)
            _check_feature(sae, self.sae, self.feature)
            if self.layer is not None and self.layer != sae.layer:
                raise _fail(
                    "condition_layer",
                    "SAE {name} reads layer {sae_layer}, not {layer} (omit 'layer')",
                    name=repr(self.sae),
                    sae_layer=sae.layer,
                    layer=self.layer,
                )
            self.layer = int(sae.layer)
            _check_condition_layer(self.layer, ctx)
            self._sae = sae
            self._rows = sae.feature_rows(self.feature)
            return self
        if self.layer is None:
            raise _fail("condition_layer", "'layer' is required with a vector")
        _check_condition_layer(self.layer, ctx)
        vec = _direction_at(self.vector, self.data, self.layer, ctx, "the condition's direction")
        self._direction = vec
        return self

    @property
    def direction(self) -> np.ndarray | None:
        """The condition vector c (float32) at `layer`; None for an SAE feature."""
        return self._direction

    @property
    def rows(self) -> Any:
        """The SAE feature's rows (steering.sae.FeatureRows) for measure 'activation'."""
        return self._rows

    @property
    def resolved_sae(self) -> Any:
        return self._sae

    @property
    def per_token(self) -> bool:
        return self.reduce == "token"

    def met(self, value: Any) -> Any:
        """Whether `value` passes (a float, or element-wise for an array or tensor)."""
        return {
            ">": value > self.threshold,
            ">=": value >= self.threshold,
            "<": value < self.threshold,
            "<=": value <= self.threshold,
        }[self.op]


def _check_condition_layer(layer: int, ctx: SpecContext) -> None:
    if ctx.condition_layers is not None and layer not in ctx.condition_layers:
        raise _fail(
            "condition_layer",
            "layer {layer}: this engine reads conditions at layers {layers} only "
            "(additional_config.steerserve.condition_layers; steerserve serve "
            "--steering-condition-layers)",
            layer=layer,
            layers=list(ctx.condition_layers),
        )


def gate_truth(expression: str, names: list[str]) -> list[bool]:
    """Whether `expression` holds for each combination of the conditions `names`: entry m
    is the value when condition i is met iff bit i of m is set (2 ** len(names) entries).

    Raises ValueError naming what is wrong (syntax, an unknown name, another construct)."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{expression!r} is not an expression of names, and, or, not") from None

    def check(node: ast.AST) -> None:
        if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
            for v in node.values:
                check(v)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            check(node.operand)
        elif isinstance(node, ast.Name):
            if node.id not in names:
                known = ", ".join(names) or "none"
                raise ValueError(f"unknown condition {node.id!r} (the spec's conditions: {known})")
        else:
            raise ValueError(f"{expression!r}: only condition names, and, or, not, parentheses")

    def value(node: ast.AST, met: dict[str, bool]) -> bool:
        if isinstance(node, ast.BoolOp):
            parts = [value(v, met) for v in node.values]
            return all(parts) if isinstance(node.op, ast.And) else any(parts)
        if isinstance(node, ast.UnaryOp):
            return not value(node.operand, met)
        assert isinstance(node, ast.Name)
        return met[node.id]

    check(tree)
    return [
        value(tree, {n: bool(m >> i & 1) for i, n in enumerate(names)})
        for m in range(1 << len(names))
    ]


def _check_gate_timing(i: int, entry: VectorEntry, conds: list[Condition]) -> None:
    """A gate must be known where its entry acts: request-level conditions once the prompt
    is read (so on generated tokens only), token-level ones after their layer."""
    request_level = [c.name for c in conds if not c.per_token]
    if request_level and entry.positions != "generated":
        raise PydanticCustomError(
            "when_positions",
            "vectors[{i}].when: request-level condition(s) {names} are decided once the "
            "prompt is read, so an entry gated by them acts on generated tokens only: set "
            "positions to 'generated' (token-level conditions, reduce 'token', gate any "
            "position)",
            {"i": i, "names": request_level},
        )
    for c in conds:
        early = sorted(layer for layer in entry.resolved if layer <= c.layer) if c.per_token else []
        if early:
            raise PydanticCustomError(
                "when_layer",
                "vectors[{i}].when: token condition {name} reads layer {layer}, so a token's "
                "gate is known only after that layer; this entry acts at layer(s) {early}: "
                "steer at later layers only",
                {"i": i, "name": repr(c.name), "layer": c.layer, "early": early},
            )


def folded_gate(entries: list[VectorEntry]) -> str | None:
    """The `when` whose constant adds fold into the constants: the first gated entry's
    that is not dynamic otherwise (docs/design.md#gated-adds). One gate per request
    folds; entries under another expression are dynamic adds (`dynamic_entries`)."""
    return next((e.when for e in entries if e.when is not None and not e.is_dynamic), None)


def dynamic_entries(entries: list[VectorEntry]) -> list[VectorEntry]:
    """The entries the forward pass adds with a per-token coefficient (max_dynamic of them
    per request): scheduled and RMS-relative adds, and adds gated by another expression
    than the folded one."""
    gate = folded_gate(entries)
    return [e for e in entries if e.is_dynamic or (e.when is not None and e.when != gate)]


def gate_names(expression: str) -> set[str]:
    """The condition names an expression (already checked by gate_truth) refers to."""
    tree = ast.parse(expression, mode="eval")
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


class SteeringSpec(BaseModel):
    """A request's intervention spec."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    preset: str | None = None
    vectors: list[VectorEntry] = []
    heads: list[HeadMask] = []
    experts: list[ExpertMask] = []
    features: list[FeatureEntry] = []
    decoding: DecodingSpec | None = None
    readout: list[ReadoutEntry] = []
    conditions: list[Condition] = []

    @field_validator("experts")
    @classmethod
    def _experts_left(cls, masks: list[ExpertMask], info: ValidationInfo) -> list[ExpertMask]:
        """Each MoE layer keeps at least top-k experts a token can be routed to."""
        ctx = _context(info)
        if ctx is None:
            return masks
        if len(masks) > ctx.max_head_masks:
            raise _fail(
                "too_many",
                "at most {n} expert masks per request (got {got})",
                n=ctx.max_head_masks,
                got=len(masks),
            )
        off: dict[int, set[int]] = {}
        for m in masks:
            if m.scale == 0.0:
                off.setdefault(m.layer, set()).update(m.experts)
        k = ctx.shape.experts_per_token
        for layer, gone in sorted(off.items()):
            left = ctx.shape.experts_of(layer) - len(gone)
            if left < k:
                raise _fail(
                    "too_few_experts",
                    "layer {layer} would keep {left} expert(s) with "
                    "scale > 0, fewer than the {k} each token is routed to",
                    layer=layer,
                    left=left,
                    k=k,
                )
        return masks

    @field_validator("features")
    @classmethod
    def _features_fit(cls, entries: list[FeatureEntry], info: ValidationInfo) -> list:
        ctx = _context(info)
        if ctx is None or not entries:
            return entries
        per_layer: dict[int, int] = {}
        for e in entries:
            if e.op != "add":
                per_layer[e.layer] = per_layer.get(e.layer, 0) + 1
        for layer, n in sorted(per_layer.items()):
            if n > ctx.max_features:
                raise _fail(
                    "too_many",
                    "{n} feature clamps/scales at layer {layer}; this engine allows {lim} per "
                    "layer (additional_config.steerserve.max_features; steerserve serve "
                    "--max-steering-features)",
                    n=n,
                    layer=layer,
                    lim=ctx.max_features,
                )
        return entries

    @field_validator("readout")
    @classmethod
    def _readout_limit(cls, entries: list, info: ValidationInfo) -> list:
        ctx = _context(info)
        if ctx is None or not entries:
            return entries
        problem = _readout_misfit(entries, ctx)
        if problem is not None:
            raise _fail(*problem)
        return entries

    @field_validator("conditions")
    @classmethod
    def _conditions_fit(cls, conds: list[Condition], info: ValidationInfo) -> list[Condition]:
        ctx = _context(info)
        names = [c.name for c in conds]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _fail("duplicate_condition", "condition name(s) {dup} used twice", dup=dup)
        if ctx is not None and len(conds) > ctx.max_conditions:
            raise _fail(*_conditions_misfit(len(conds), ctx))
        return conds

    @model_validator(mode="after")
    def _gates_known(self, info: ValidationInfo) -> SteeringSpec:
        names = [c.name for c in self.conditions]
        for i, e in enumerate(self.vectors):
            if e.when is None:
                continue
            try:
                gate_truth(e.when, names)
            except ValueError as err:
                raise PydanticCustomError(
                    "bad_when", "vectors[{i}].when: {why}", {"i": i, "why": str(err)}
                ) from None
            _check_gate_timing(i, e, [c for c in self.conditions if c.name in gate_names(e.when)])
        return self

    @field_validator("vectors")
    @classmethod
    def _dynamic_fit(cls, entries: list[VectorEntry], info: ValidationInfo) -> list:
        ctx = _context(info)
        if ctx is None:
            return entries
        problem = _dynamic_misfit(entries, ctx)
        if problem is not None:
            raise _fail(*problem)
        return entries

    @field_validator("vectors", "heads", "features")
    @classmethod
    def _not_too_many(cls, entries: list, info: ValidationInfo) -> list:
        ctx = _context(info)
        if ctx is None:
            return entries
        limit, what = {
            "vectors": (ctx.max_vectors, "vector entries"),
            "heads": (ctx.max_head_masks, "head masks"),
            "features": (ctx.max_feature_entries, "feature entries"),
        }[info.field_name]
        if len(entries) > limit:
            raise _fail(
                "too_many",
                "at most {n} {what} per request (got {got})",
                n=limit,
                what=what,
                got=len(entries),
            )
        return entries

    def fingerprint(self) -> str:
        """Stable id of what this spec does to the KV cache (content, not names).

        Two specs with equal fingerprints steer identically, so they may share KV-cache
        blocks and an engine slot. Vector *content* is hashed, so replacing a registered
        vector under the same name yields a new fingerprint. `decoding` is not part of it:
        it changes how the final logits are read, not the KV cache.
        """
        h = hashlib.sha256(b"steerserve-spec-v2")
        for e in self.vectors:
            fields = (e.site, e.op, e.scale, e.value, e.weight, e.normalize, e.positions)
            if e.is_dynamic or e.when is not None:  # as before gated adds folded: stable ids
                schedule = e.schedule.model_dump() if e.schedule is not None else None
                fields += (e.relative, schedule)
            resolved = e.resolved  # a pydantic private attribute: read once
            h.update(repr((*fields, sorted(resolved))).encode())
            for layer in sorted(resolved):
                h.update(resolved[layer].tobytes())
        for m in self.heads:
            h.update(repr(("mask", m.layer, m.heads, m.scale, m.target, m.positions)).encode())
        for m in self.experts:
            h.update(repr(("experts", m.layer, m.experts, m.scale, m.positions)).encode())
        for f in self.features:
            # The feature's rows, not the SAE's name: replacing the SAE changes the KV.
            fields = (f.op, f.add_scale, f.value, f.factor, f.positions, f.feature)
            h.update(repr(("feature", *fields)).encode())
            h.update(f.rows.digest)
        for c in self.conditions:
            fields = (c.name, c.layer, c.reduce, c.measure, c.op, c.threshold, c.feature)
            h.update(repr(("condition", *fields)).encode())
            h.update(c.rows.digest if c.rows is not None else c.direction.tobytes())
        for e in self.vectors:
            if e.when is not None:
                h.update(repr(("when", e.when)).encode())
        return h.hexdigest()[:32]


def _loc(loc: Iterable[Any], root: str) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        elif isinstance(part, str) and part.lstrip("-").isdigit() and out.endswith(".data"):
            out += f"[{part}]"
        else:
            out += f".{part}"
    return out


def parse_spec(raw: Any, ctx: SpecContext | None = None, *, root: str = "steering") -> SteeringSpec:
    """Validate a raw spec (dict or JSON string) against the model and registries in `ctx`.

    A preset named by `raw["preset"]` is expanded first: its vectors come before the
    request's own. Raises `SpecError` naming each offending field.
    """
    if raw is None:
        return SteeringSpec()
    if isinstance(raw, SteeringSpec):
        raw = raw.model_dump(exclude_none=True)
    if isinstance(raw, (str, bytes)):
        validate = SteeringSpec.model_validate_json
    elif isinstance(raw, Mapping):
        validate = SteeringSpec.model_validate
    else:
        raise SpecError([(root, f"must be an object, got {type(raw).__name__}")])
    try:
        spec = validate(raw, context={"steering": ctx})
    except ValidationError as e:
        raise _spec_error(e, root) from None
    return _expand_preset(spec, ctx, root)


def _expand_preset(spec: SteeringSpec, ctx: SpecContext | None, root: str) -> SteeringSpec:
    if spec.preset is None or ctx is None:
        return spec
    preset = ctx.presets.get(spec.preset)
    if preset is None:
        known = ", ".join(sorted(ctx.presets)) or "none are registered"
        raise SpecError(
            [(f"{root}.preset", f"unknown preset {spec.preset!r} ({known})")],
            kinds=("unknown_preset",),
        )
    base = parse_spec(
        {k: v for k, v in preset.items() if k != "preset"}, ctx, root=f"preset {spec.preset!r}"
    )
    return compose(base, spec, ctx, root=root, what="preset plus request")


def compose(
    first: SteeringSpec,
    then: SteeringSpec,
    ctx: SpecContext | None,
    *,
    root: str = "steering",
    what: str = "the combined spec",
) -> SteeringSpec:
    """`first`'s entries, then `then`'s; `then`'s decoding wins if it has one.

    Used for presets (preset, then request) and a server's default spec (default, then
    request). The preset name kept is `then`'s, else `first`'s.
    """
    merged = SteeringSpec.model_construct(
        preset=then.preset if then.preset is not None else first.preset,
        vectors=[*first.vectors, *then.vectors],
        heads=[*first.heads, *then.heads],
        experts=[*first.experts, *then.experts],
        features=[*first.features, *then.features],
        decoding=then.decoding if then.decoding is not None else first.decoding,
        readout=[*first.readout, *then.readout],
        conditions=[*first.conditions, *then.conditions],
    )
    if ctx is not None:
        for name, have, limit in (
            ("vectors", len(merged.vectors), ctx.max_vectors),
            ("heads", len(merged.heads), ctx.max_head_masks),
            ("experts", len(merged.experts), ctx.max_head_masks),
            ("features", len(merged.features), ctx.max_feature_entries),
        ):
            if have > limit:
                raise SpecError(
                    [
                        (
                            f"{root}.{name}",
                            f"{what} hold {have} {name} entries, more than the limit of {limit}",
                        )
                    ]
                )
        problem = _readout_misfit(merged.readout, ctx)
        if problem is not None:
            raise SpecError([(f"{root}.readout", f"{what}: {problem[1]}")])
        problem = _dynamic_misfit(merged.vectors, ctx)
        if problem is not None:
            raise SpecError([(f"{root}.vectors", f"{what}: {problem[1]}")])
        names = [c.name for c in merged.conditions]
        if len(set(names)) != len(names):
            raise SpecError([(f"{root}.conditions", f"{what} use a condition name twice")])
        if len(names) > ctx.max_conditions:
            raise SpecError(
                [(f"{root}.conditions", f"{what}: {_conditions_misfit(len(names), ctx)[1]}")]
            )
    return merged


def _conditions_misfit(n: int, ctx: SpecContext) -> tuple[str, str]:
    if ctx.max_conditions == 0:
        return (
            "conditions_off",
            "conditions are off on this server (turn them on with "
            "additional_config.steerserve.max_conditions; steerserve serve "
            "--max-steering-conditions)",
        )
    return (
        "too_many",
        f"{n} conditions, this server allows {ctx.max_conditions} per request "
        "(additional_config.steerserve.max_conditions; steerserve serve "
        "--max-steering-conditions)",
    )


def _dynamic_misfit(entries: list[VectorEntry], ctx: SpecContext) -> tuple[str, str] | None:
    """More dynamic adds (scheduled, RMS-relative, or gated by a second expression) than
    the engine's tables hold (0: off)."""
    n = len(dynamic_entries(entries))
    if n <= ctx.max_dynamic:
        return None
    if ctx.max_dynamic == 0:
        return (
            "dynamic_off",
            "scheduled and RMS-relative adds, and adds gated by more than one 'when' "
            "expression, are off on this server (turn them on with "
            "additional_config.steerserve.max_dynamic; steerserve serve --max-steering-dynamic)",
        )
    return (
        "too_many",
        f"{n} dynamic adds (scheduled, RMS-relative, or gated by a second 'when' "
        f"expression), this server allows {ctx.max_dynamic} per request "
        "(additional_config.steerserve.max_dynamic; steerserve serve --max-steering-dynamic)",
    )


def _readout_misfit(entries: list[ReadoutEntry], ctx: SpecContext) -> tuple[str, str] | None:
    """(kind, message) if the readout entries exceed what the engine reads; top-k entries
    do not take a projection column, and one SAE per server gives at most one of them."""
    projections = sum(1 for e in entries if e.top_k is None)
    if projections and ctx.max_readouts == 0:
        return (
            "readout_off",
            "needs an engine started with readout on (additional_config.steerserve.readout;"
            " steerserve serve --enable-steering-readout)",
        )
    if projections > ctx.max_readouts:
        return (
            "too_many",
            f"at most {ctx.max_readouts} readout entries per request (got {projections})",
        )
    if len(entries) - projections > 1:
        return ("too_many", "at most one top-k readout entry per request")
    return None


def _spec_error(e: ValidationError, root: str) -> SpecError:
    # Element-wise errors in a long list (NaN in a 4096-float vector) collapse into one
    # error on the list: "steering.vectors[0].data[12]: ... (4096 of them, first at index 0)".
    grouped: dict[tuple[str, str], list[int]] = {}
    errors: list[tuple[str, str]] = []
    kinds: set[str] = set()
    for err in e.errors(include_url=False):
        loc, msg = err["loc"], err["msg"]
        kinds.add("too_large" if err["type"] == "too_large" else "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "finite_number" and loc and isinstance(loc[-1], int):
            key = (_loc(loc[:-1], root), "values are not finite numbers")
            if key not in grouped:
                grouped[key] = []
                errors.append(key)
            grouped[key].append(loc[-1])
            continue
        errors.append((_loc(loc, root), msg))
    return SpecError(
        [
            (
                loc,
                f"{msg} ({len(grouped[(loc, msg)])} of them, first at index "
                f"{grouped[(loc, msg)][0]})",
            )
            if (loc, msg) in grouped
            else (loc, msg)
            for loc, msg in errors
        ],
        kinds=kinds,
    )


def inline_float32(values: list[float]) -> np.ndarray:
    """Inline floats (Python floats once pydantic has validated them) as float32, rounded as
    numpy rounds them. struct packs a list of floats as C doubles about 3x faster than numpy
    converts it element by element, and a request's inline vectors are thousands of floats."""
    doubles = np.frombuffer(struct.pack(f"{len(values)}d", *values), dtype=np.float64)
    return doubles.astype(np.float32)


def unit(vec: np.ndarray) -> np.ndarray:
    """v/|v| in float32, with the norm taken in float64 for stability."""
    norm = math.sqrt(float(np.dot(vec.astype(np.float64), vec.astype(np.float64))))
    return (vec.astype(np.float64) / norm).astype(np.float32)
