"""Lower a validated spec into the engine's per-layer form.

At one layer, each entry of the spec is an affine map of the residual stream h:

    add    : h <- h + a                              (a = scale*v, or scale*v/|v|)
    ablate : h <- h - g (h.u) u                      (g = scale)
    clamp  : h <- h - (h.u) u + value u

A sequence of affine maps is one affine map: h_out = Lin(h) + b, where Lin applies only the
linear parts (the projections, in order) and b is every constant pushed through the
projections that follow it. b does not depend on h, so it is computed here, once per spec,
and the forward pass does just the projections plus one gathered add. Adds are therefore
free in number and cost; only projections (ablate/clamp) take per-layer work.

Positions: a token at position p of a prompt of length P has rel = p - P; its *class* is
early prompt (rel < -1), last prompt (rel == -1) or generated (rel >= 0), which is enough
to decide every position rule of the spec. b is folded once per class with the entries
active for it; each projection also keeps its window [lo, hi) on rel.

Head site (the input of o_proj, [T, H*D] seen as [T, H, D]): a head mask scales a head's
slice, `add` adds a constant, `mix` is z <- (1-w) z + w v on the heads where v != 0. Each is
a per-head map z_h <- a_h z_h + b_h with a scalar a_h, so any sequence of them is one map
of that form: the engine does one multiply-add per token with the folded (a, b) of its
slot and class. Inside a layer: masks first (in order), then head-site vectors (in order);
all head ops act before o_proj, residual ops after the layer. Query masks (target "query")
scale a head's query inside attention (after its norm and rotary embedding): a per-head
factor folded by product, applied before the attention kernel.

Expert masks (MoE layers) scale router probabilities: a product of scales per expert, kept
as its logarithm, a bias on the router logits (-inf for 0), added before the router runs.

SAE features (spec `features`) act at their SAE's layer after that layer's vector entries,
in order. `add` is a constant (scale * W_dec[f]) and folds into b like a vector add. `clamp`
and `scale` are not affine (the activation has a threshold): each is one in-graph op

    s = alpha + beta * act(<e, h> + c),   act(x) = x if x > theta else 0,   h <- h + s d

with e = W_enc[:, f], d = W_dec[f], c = b_enc[f] - <e, b_dec>, clamp (alpha, beta) =
(value, -1) and scale (0, factor - 1). The constant b deferred to the end of the layer passes
such an op unchanged if its input offset absorbs it: F(h + b) = F_{c + <e, b>}(h) + b. So per
token class, c holds <e, b> of the constant folded so far, and (alpha, beta) are 0 where the
entry's window does not cover the class. The ops are packed per layer (op k of layer i is
the k-th clamp/scale at layer i).

Dynamic adds (a `schedule` or `relative: "rms"`) have a per-token strength, so they cannot
fold into b. Each is a direction per layer and class, d_j = the add's vector pushed through
the projections after it at that layer (linear, so the per-token coefficient factors out),
and the forward pass adds sum_j coef_j(t) d_j after the projections, before the feature ops
(which then see it in the stream). coef_j(t) = scale * window * schedule(g) (host, per token,
`dynamic_coef`), times RMS(h) of the layer's own output for relative adds (in the graph).

Gated constant adds (a `when`, no schedule) fold into b like any add, twice: b and the
feature offsets are kept with the spec's folded gate (spec.folded_gate) closed and open,
rows g * NUM_CLASSES + class of `const` and `features.coef`; `gate` is the gate's truth
table over the conditions met, and the forward pass picks the row per token. Adds under
another expression are dynamic adds whose coefficient the graph multiplies by their gate
(spec.dynamic_entries; docs/design.md#gated-adds).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, get_args

import msgspec
import numpy as np

from steering.sae import FeatureRows
from steering.spec import (
    Condition,
    FeatureEntry,
    ModelShape,
    ScheduleKind,
    SteeringSpec,
    VectorEntry,
    dynamic_entries,
    folded_gate,
    gate_truth,
    unit,
)

PAYLOAD_KEY = "steerserve.compiled"
PAYLOAD_VERSION = 8

NEVER = 1 << 62
WINDOWS: dict[str, tuple[int, int]] = {
    "all": (-NEVER, NEVER),
    "prompt": (-NEVER, 0),
    "generated": (0, NEVER),
    "last_prompt": (-1, 0),
    "from_last_prompt": (-1, NEVER),
}
# Token classes for the folded constants; token_class() computes a token's index.
CLASSES: tuple[tuple[int, int], ...] = ((-NEVER, -1), (-1, 0), (0, NEVER))
NUM_CLASSES = len(CLASSES)


def token_class(rel: np.ndarray) -> np.ndarray:
    """Class index of each token from rel = position - prompt_length (see CLASSES)."""
    return (rel >= -1).astype(np.int64) + (rel >= 0)


def _covers(window: tuple[int, int], cls: tuple[int, int]) -> bool:
    return window[0] <= cls[0] and cls[1] <= window[1]


@dataclass
class Projection:
    """h <- h - gain * (h.u) u at `layers`, for tokens with rel in [lo, hi)."""

    lo: int
    hi: int
    gain: float
    layers: np.ndarray  # [n] int64, ascending
    units: np.ndarray  # [n, hidden] float32, unit norm


@dataclass
class HeadOps:
    """Folded head-site maps z_h <- scale_h z_h + const_h, and query factors q_h <- f_h q_h,
    per layer and token class."""

    num_heads: int
    head_dim: int
    layers: np.ndarray  # [m] int64: layers where some class is not the identity
    scale: np.ndarray  # [m, NUM_CLASSES, num_heads] float32
    const: np.ndarray  # [m, NUM_CLASSES, num_heads * head_dim] float32
    query: np.ndarray  # [m, NUM_CLASSES, num_heads] float32

    @classmethod
    def identity(cls, num_heads: int, head_dim: int) -> HeadOps:
        return cls(
            num_heads,
            head_dim,
            np.zeros(0, dtype=np.int64),
            np.ones((0, NUM_CLASSES, num_heads), dtype=np.float32),
            np.zeros((0, NUM_CLASSES, num_heads * head_dim), dtype=np.float32),
            np.ones((0, NUM_CLASSES, num_heads), dtype=np.float32),
        )


@dataclass
class ExpertOps:
    """Router-logit biases log(scale) per expert (-inf: never routed to), per MoE layer and
    token class."""

    num_experts: int
    layers: np.ndarray  # [m] int64
    bias: np.ndarray  # [m, NUM_CLASSES, num_experts] float32

    @classmethod
    def identity(cls, num_experts: int = 0) -> ExpertOps:
        return cls(
            num_experts,
            np.zeros(0, dtype=np.int64),
            np.zeros((0, NUM_CLASSES, num_experts), dtype=np.float32),
        )


# Columns of FeatureOps.coef: input offset c, threshold theta, alpha, beta.
COEF_OFFSET, COEF_THRESHOLD, COEF_ALPHA, COEF_BETA = range(4)
NUM_COEFS = 4


@dataclass
class FeatureOps:
    """SAE feature clamps/scales, packed per layer: op k of layer i reads enc[i, k], writes
    dec[i, k] with coef[i, class, k] = (c, theta, alpha, beta); all zeros is no op."""

    layers: np.ndarray  # [m] int64
    enc: np.ndarray  # [m, K, hidden] float32
    dec: np.ndarray  # [m, K, hidden] float32
    coef: np.ndarray  # [m, combos * NUM_CLASSES, K, NUM_COEFS] float32 (see CompiledSpec)

    @classmethod
    def identity(cls, hidden: int = 0, rows: int = NUM_CLASSES) -> FeatureOps:
        return cls(
            np.zeros(0, dtype=np.int64),
            np.zeros((0, 0, hidden), dtype=np.float32),
            np.zeros((0, 0, hidden), dtype=np.float32),
            np.zeros((0, rows, 0, NUM_COEFS), dtype=np.float32),
        )

    @property
    def per_layer(self) -> int:
        return int(self.enc.shape[1])


SCHEDULE_KINDS = get_args(ScheduleKind)  # their codes in DynamicAdds.params
# Columns of DynamicAdds.params.
(
    DYN_LO,
    DYN_HI,
    DYN_SCALE,
    DYN_RMS,
    DYN_KIND,
    DYN_START,
    DYN_STEPS,
    DYN_END,
    DYN_HALF_LIFE,
    DYN_STOP,
) = range(10)
NUM_DYN_PARAMS = 10


@dataclass
class DynamicAdds:
    """Adds with a per-token strength (see the module doc): add j's direction at layer
    i and token class c is dirs[i, c, j]; params[j] its window, scale and schedule;
    truth[j, m] whether it acts when the spec's conditions met are the bits of m (all
    true without `when`)."""

    layers: np.ndarray  # [m] int64
    dirs: np.ndarray  # [m, NUM_CLASSES, J, hidden] float32
    params: np.ndarray  # [J, NUM_DYN_PARAMS] float64
    truth: np.ndarray = field(default_factory=lambda: np.ones((0, 1), dtype=np.float32))

    @classmethod
    def identity(cls, hidden: int = 0) -> DynamicAdds:
        return cls(
            np.zeros(0, dtype=np.int64),
            np.zeros((0, NUM_CLASSES, 0, hidden), dtype=np.float32),
            np.zeros((0, NUM_DYN_PARAMS), dtype=np.float64),
        )

    @property
    def count(self) -> int:
        return int(self.params.shape[0])


def dynamic_params(entry: VectorEntry) -> np.ndarray:
    p = np.zeros(NUM_DYN_PARAMS, dtype=np.float64)
    p[DYN_LO], p[DYN_HI] = WINDOWS[entry.positions]
    p[DYN_SCALE] = entry.scale
    p[DYN_RMS] = entry.relative == "rms"
    s = entry.schedule
    if s is not None:
        p[DYN_KIND] = SCHEDULE_KINDS.index(s.kind)
        p[DYN_START] = s.start
        p[DYN_STEPS] = s.steps or 1
        p[DYN_END] = s.end or 0.0
        p[DYN_HALF_LIFE] = s.half_life or 1.0
        p[DYN_STOP] = s.stop or 0
    return p


def dynamic_coef(params: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """scale * window * schedule(rel) for tokens at `rel` with params [..., J, P] per token
    (vectorised over tokens and adds; all-zero params give 0)."""
    g = rel.astype(np.float64)[:, None]
    after = g - params[..., DYN_START]
    kind = params[..., DYN_KIND]
    # Unused columns (all zeros) divide by zero here; np.select never picks those values.
    with np.errstate(all="ignore"):
        linear = 1.0 + (params[..., DYN_END] - 1.0) * np.clip(after / params[..., DYN_STEPS], 0, 1)
        exp = np.exp2(-np.maximum(after, 0.0) / params[..., DYN_HALF_LIFE])
    window = (after >= 0) & (g < params[..., DYN_STOP])
    factor = np.select(
        [kind == 1, kind == 2, kind == 3], [linear, exp, window.astype(np.float64)], 1.0
    )
    inside = (g >= params[..., DYN_LO]) & (g < params[..., DYN_HI])
    return (params[..., DYN_SCALE] * inside * factor).astype(np.float32)


# Columns of Conditions.params.
(
    COND_KIND,
    COND_OFFSET,
    COND_ACT_THRESHOLD,
    COND_SIGN,
    COND_STRICT,
    COND_THRESHOLD,
    COND_TOKEN,
) = range(7)
NUM_COND_PARAMS = 7
COND_CAST, COND_LINEAR = 0, 1  # kinds: CAST's cosine; a projection (+ offset, activation)
REDUCES = ("prompt_mean", "last_prompt", "token")


@dataclass
class Conditions:
    """Conditions (spec.Condition), read by the engine at `layers`:

    CAST:   value = cos(h, tanh(s c)), s = <c, h> / <c, c>       (vec = c)
    LINEAR: pre = <vec, h> + offset; value = pre if pre > act_threshold else 0
            (a projection: vec = c/|c|, offset 0, act_threshold -inf; an SAE feature: its
            encoder row, offset and threshold)
    met = sign * (value - threshold) > 0 (>= 0 when not strict), h the prompt's mean or last
    row at the layer, or (COND_TOKEN set, reduce "token") each token's own row."""

    names: list[str]
    layers: np.ndarray  # [C] int64
    reduce: np.ndarray  # [C] int64: index into REDUCES
    vecs: np.ndarray  # [C, hidden] float32
    params: np.ndarray  # [C, NUM_COND_PARAMS] float64

    @classmethod
    def none(cls, hidden: int = 0) -> Conditions:
        return cls(
            [],
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            np.zeros((0, hidden), dtype=np.float32),
            np.zeros((0, NUM_COND_PARAMS), dtype=np.float64),
        )

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def per_token(self) -> np.ndarray:
        """[C] bool: which are token-level (reduce "token")."""
        return self.reduce == REDUCES.index("token")


def _compile_conditions(conds: list[Condition], hidden: int) -> Conditions:
    if not conds:
        return Conditions.none(hidden)
    vecs = np.zeros((len(conds), hidden), dtype=np.float32)
    params = np.zeros((len(conds), NUM_COND_PARAMS), dtype=np.float64)
    for i, c in enumerate(conds):
        p = params[i]
        p[COND_SIGN] = 1.0 if c.op in (">", ">=") else -1.0
        p[COND_STRICT] = c.op in (">", "<")
        p[COND_THRESHOLD] = c.threshold
        p[COND_TOKEN] = c.per_token
        if c.measure == "activation":
            vecs[i] = c.rows.enc
            p[COND_KIND], p[COND_OFFSET] = COND_LINEAR, c.rows.offset
            p[COND_ACT_THRESHOLD] = c.rows.threshold
        elif c.measure == "projection":
            vecs[i] = unit(c.direction)
            p[COND_KIND], p[COND_ACT_THRESHOLD] = COND_LINEAR, -np.inf
        else:
            vecs[i] = c.direction
            p[COND_KIND] = COND_CAST
    return Conditions(
        [c.name for c in conds],
        np.array([c.layer for c in conds], dtype=np.int64),
        np.array([REDUCES.index(c.reduce) for c in conds], dtype=np.int64),
        vecs,
        params,
    )


@dataclass(frozen=True)
class Decoding:
    """What the sampler step does with intermediate layers (spec.DecodingSpec, resolved)."""

    mode: str  # "fuse" | "contrast"
    candidates: tuple[int, ...]  # fuse: the layer, or the "auto" range; contrast: the set
    auto: bool = False
    weight: float = 0.0
    alpha: float = 0.0

    def to_payload(self) -> dict:
        return {
            "mode": self.mode,
            "cand": list(self.candidates),
            "auto": self.auto,
            "w": self.weight,
            "alpha": self.alpha,
        }

    @classmethod
    def from_payload(cls, p: dict | None) -> Decoding | None:
        if p is None:
            return None
        return cls(p["mode"], tuple(p["cand"]), p["auto"], p["w"], p["alpha"])


_NO_UNIT = np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class Readout:
    """One readout entry: the stream at the output of `layer` projected on `unit`; for an
    SAE feature, `unit` is its encoder row and the value is where(x + offset > threshold,
    x + offset, 0) of that projection x (threshold None: the projection itself).

    `top_k` > 0: the engine's top-k SAE's `top_k` most active features at `layer` instead
    (engine/topk.py); no unit, no projection column."""

    layer: int
    unit: np.ndarray  # [hidden] float32 (unit norm for vectors); empty for top-k
    prompt: bool  # also per prompt token
    offset: float = 0.0
    threshold: float | None = None
    top_k: int = 0

    def value(self, projection: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            return projection
        pre = projection.astype(np.float64) + self.offset
        return np.where(pre > self.threshold, pre, 0.0).astype(np.float32)


@dataclass
class CompiledSpec:
    fingerprint: str
    hidden_size: int
    projections: list[Projection]
    const_layers: np.ndarray  # [m] int64: layers with a non-zero folded constant
    # [m, combos * NUM_CLASSES, hidden] float32: row g * NUM_CLASSES + c is class c's
    # constant with the folded gate closed (g 0) or open (g 1); combos is 1 without one.
    const: np.ndarray
    heads: HeadOps
    # Layer-reading decoding (plain data, see Decoding) or None.
    decoding: Decoding | None = None
    readout: list[Readout] = field(default_factory=list)
    experts: ExpertOps = field(default_factory=ExpertOps.identity)
    features: FeatureOps = field(default_factory=FeatureOps.identity)
    dynamic: DynamicAdds = field(default_factory=DynamicAdds.identity)
    conditions: Conditions = field(default_factory=Conditions.none)
    # The folded gate (spec.folded_gate): gate[m] = 1 if its adds act when the conditions
    # met are the bits of m; empty without one (then combos is 1). [2 ** conditions]
    gate: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def combos(self) -> int:
        """How many versions of the constants (and feature offsets) there are: 2 with a
        folded gate (closed, open), else 1."""
        return int(self.const.shape[1]) // NUM_CLASSES

    @property
    def key(self) -> str:
        """Identity of an engine slot: the KV fingerprint, plus the readout units (which
        live in the slot too but do not change the KV cache)."""
        if not self.readout:
            return self.fingerprint
        h = hashlib.sha256(self.fingerprint.encode())
        for r in self.readout:
            h.update(repr((r.layer, r.prompt, r.offset, r.threshold, r.top_k)).encode())
            h.update(r.unit.astype(np.float32).tobytes())
        return f"{self.fingerprint}+r{h.hexdigest()[:16]}"

    @property
    def projection_readouts(self) -> list[Readout]:
        """The readout entries that take a projection column (all but top-k), in order."""
        return [r for r in self.readout if not r.top_k]

    @property
    def reads_prompt(self) -> bool:
        """Every prompt row must be computed (no prefix-cache hits): prompt readout, and
        request-level conditions, which reduce over the prompt's rows (a token-level one
        reads each row alone, so a cached row's gate was what it would be again)."""
        request_level = self.conditions.count and not self.conditions.per_token.all()
        return any(r.prompt for r in self.readout) or bool(request_level)

    @property
    def affects_kv(self) -> bool:
        """Whether the forward pass changes (so the KV cache must be salted, a slot used)."""
        return bool(
            self.projections
            or self.const_layers.size
            or self.heads.layers.size
            or self.experts.layers.size
            or self.features.layers.size
            or self.dynamic.layers.size
        )

    @property
    def is_identity(self) -> bool:
        return (
            not self.affects_kv
            and self.decoding is None
            and not self.readout
            and not self.conditions.count
        )

    @property
    def uses_heads(self) -> bool:
        return bool(self.heads.layers.size)

    def to_payload(self) -> dict:
        """Plain ints/floats/bytes: cheap for vLLM to serialise to its workers."""
        heads = self.heads
        return {
            "v": PAYLOAD_VERSION,
            "fp": self.fingerprint,
            "key": self.key,
            "hidden": self.hidden_size,
            "heads": {
                "n": heads.num_heads,
                "dim": heads.head_dim,
                "layers": heads.layers.tolist(),
                "scale": heads.scale.astype(np.float32).tobytes(),
                "const": heads.const.astype(np.float32).tobytes(),
                "query": heads.query.astype(np.float32).tobytes(),
            },
            "proj": [
                {
                    "lo": p.lo,
                    "hi": p.hi,
                    "gain": p.gain,
                    "layers": p.layers.tolist(),
                    "units": p.units.astype(np.float32).tobytes(),
                }
                for p in self.projections
            ],
            "const_layers": self.const_layers.tolist(),
            "combos": self.combos,
            "const": self.const.astype(np.float32).tobytes(),
            "decoding": self.decoding.to_payload() if self.decoding else None,
            "readout": [
                {
                    "layer": r.layer,
                    "prompt": r.prompt,
                    "unit": r.unit.astype(np.float32).tobytes(),
                    "off": r.offset,
                    "thr": r.threshold,
                    "k": r.top_k,
                }
                for r in self.readout
            ],
            "features": {
                "layers": self.features.layers.tolist(),
                "k": self.features.per_layer,
                "enc": self.features.enc.astype(np.float32).tobytes(),
                "dec": self.features.dec.astype(np.float32).tobytes(),
                "coef": self.features.coef.astype(np.float32).tobytes(),
            },
            "experts": {
                "n": self.experts.num_experts,
                "layers": self.experts.layers.tolist(),
                "bias": self.experts.bias.astype(np.float32).tobytes(),
            },
            "dynamic": {
                "layers": self.dynamic.layers.tolist(),
                "dirs": self.dynamic.dirs.astype(np.float32).tobytes(),
                "params": self.dynamic.params.astype(np.float64).tobytes(),
                "truth": self.dynamic.truth.astype(np.float32).tobytes(),
            },
            "conditions": {
                "names": self.conditions.names,
                "layers": self.conditions.layers.tolist(),
                "reduce": self.conditions.reduce.tolist(),
                "vecs": self.conditions.vecs.astype(np.float32).tobytes(),
                "params": self.conditions.params.astype(np.float64).tobytes(),
            },
            "gate": self.gate.astype(np.float32).tobytes(),
        }

    def to_wire(self) -> bytes:
        """The payload as one msgpack blob: what rides in `extra_args`. vLLM deep-copies
        a request's params once per request; a blob is copied by reference, a dict of
        lists walked element by element."""
        return msgspec.msgpack.encode(self.to_payload())

    @classmethod
    def from_payload(cls, payload: dict | bytes) -> CompiledSpec:
        payload = read_payload(payload)
        if payload.get("v") != PAYLOAD_VERSION:
            raise ValueError(f"compiled steering payload version {payload.get('v')!r} unsupported")
        hidden = payload["hidden"]

        def floats(raw: bytes, *shape: int) -> np.ndarray:
            return np.frombuffer(raw, dtype=np.float32).reshape(*shape).copy()

        projections = [
            Projection(
                p["lo"],
                p["hi"],
                p["gain"],
                np.asarray(p["layers"], dtype=np.int64),
                floats(p["units"], len(p["layers"]), hidden),
            )
            for p in payload["proj"]
        ]
        const_layers = np.asarray(payload["const_layers"], dtype=np.int64)
        rows = payload["combos"] * NUM_CLASSES
        const = floats(payload["const"], len(const_layers), rows, hidden)
        h = payload["heads"]
        m = len(h["layers"])
        heads = HeadOps(
            h["n"],
            h["dim"],
            np.asarray(h["layers"], dtype=np.int64),
            floats(h["scale"], m, NUM_CLASSES, h["n"]),
            floats(h["const"], m, NUM_CLASSES, h["n"] * h["dim"]),
            floats(h["query"], m, NUM_CLASSES, h["n"]),
        )
        decoding = Decoding.from_payload(payload.get("decoding"))
        readout = [
            Readout(
                r["layer"],
                floats(r["unit"], 0 if r.get("k") else hidden),
                r["prompt"],
                r["off"],
                r["thr"],
                int(r.get("k") or 0),
            )
            for r in payload.get("readout", ())
        ]
        f = payload["features"]
        m, k = len(f["layers"]), f["k"]
        features = FeatureOps(
            np.asarray(f["layers"], dtype=np.int64),
            floats(f["enc"], m, k, hidden),
            floats(f["dec"], m, k, hidden),
            floats(f["coef"], m, rows, k, NUM_COEFS),
        )
        e = payload["experts"]
        experts = ExpertOps(
            e["n"],
            np.asarray(e["layers"], dtype=np.int64),
            floats(e["bias"], len(e["layers"]), NUM_CLASSES, e["n"]),
        )
        d = payload["dynamic"]
        params = np.frombuffer(d["params"], dtype=np.float64).reshape(-1, NUM_DYN_PARAMS).copy()
        c = payload["conditions"]
        n = len(c["names"])
        conditions = Conditions(
            list(c["names"]),
            np.asarray(c["layers"], dtype=np.int64),
            np.asarray(c["reduce"], dtype=np.int64),
            floats(c["vecs"], n, hidden),
            np.frombuffer(c["params"], dtype=np.float64).reshape(n, NUM_COND_PARAMS).copy(),
        )
        dynamic = DynamicAdds(
            np.asarray(d["layers"], dtype=np.int64),
            floats(d["dirs"], len(d["layers"]), NUM_CLASSES, len(params), hidden),
            params,
            floats(d["truth"], len(params), 1 << n),
        )
        return cls(
            payload["fp"],
            hidden,
            projections,
            const_layers,
            const,
            heads,
            decoding,
            readout,
            experts,
            features,
            dynamic,
            conditions,
            np.frombuffer(payload["gate"], dtype=np.float32).copy(),
        )


def read_payload(payload: Any) -> dict:
    """A payload as a dict: the msgpack blob of `to_wire`, or a dict already."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = msgspec.msgpack.decode(payload)
    if not isinstance(payload, dict):
        raise ValueError(f"compiled steering payload must be a mapping, got {type(payload)}")
    return payload


def compile_spec(spec: SteeringSpec, shape: ModelShape) -> CompiledSpec:
    """Lower a validated (resolved) spec; an empty spec compiles to the identity."""
    residual = [e for e in spec.vectors if e.site == "residual"]
    names = [c.name for c in spec.conditions]
    projections, const_layers, const, features, dynamic = _compile_residual(
        residual, spec.features, shape.hidden_size
    )
    dyn = dynamic_entries(residual)
    dynamic.truth = np.array(
        [gate_truth(e.when, names) if e.when else [True] * (1 << len(names)) for e in dyn],
        dtype=np.float32,
    ).reshape(len(dyn), 1 << len(names))
    gate = folded_gate(residual)
    gate_table = np.array(gate_truth(gate, names) if gate else [], dtype=np.float32)
    heads = _compile_heads(spec, shape)
    decoding = None
    if spec.decoding is not None:
        d = spec.decoding
        decoding = Decoding(
            d.mode,
            tuple(d.candidates),
            auto=d.layer == "auto",
            weight=float(d.weight or 0.0),
            alpha=float(d.alpha or 0.0),
        )
    readout = [
        Readout(e.layer, _NO_UNIT, e.prompt, top_k=e.top_k)
        if e.top_k is not None
        else Readout(e.layer, e.unit_vector, e.prompt, e.offset, e.threshold)
        for e in spec.readout
    ]
    return CompiledSpec(
        spec.fingerprint(),
        shape.hidden_size,
        projections,
        const_layers,
        const,
        heads,
        decoding,
        readout,
        _compile_experts(spec, shape),
        features,
        dynamic,
        _compile_conditions(spec.conditions, shape.hidden_size),
        gate_table,
    )


def _compile_experts(spec: SteeringSpec, shape: ModelShape) -> ExpertOps:
    num = shape.num_experts
    if not spec.experts:
        return ExpertOps.identity(num)
    classes = _classes([m.positions for m in spec.experts])
    layers = sorted({m.layer for m in spec.experts})
    bias = np.zeros((len(layers), NUM_CLASSES, num), dtype=np.float64)
    with np.errstate(divide="ignore"):  # log(0) = -inf: never routed to
        for k, layer in enumerate(layers):
            for c, cls in enumerate(classes):
                for m in spec.experts:
                    if m.layer == layer and _covers(WINDOWS[m.positions], cls):
                        bias[k, c, m.experts] += np.log(m.scale)
            bias[k, len(classes) :] = bias[k, 0]
    return ExpertOps(num, np.array(layers, dtype=np.int64), bias.astype(np.float32))


def _classes(windows: list[str]) -> tuple[tuple[int, int], ...]:
    # When every entry applies at all positions the classes agree: fold once, then copy.
    return CLASSES if any(w != "all" for w in windows) else CLASSES[:1]


def _compile_residual(
    entries: list[VectorEntry], features: list[FeatureEntry], hidden_size: int
) -> tuple[list[Projection], np.ndarray, np.ndarray, FeatureOps, DynamicAdds]:
    # Fold constants per layer, gate and class, in float64, through the later projections;
    # the feature ops of a layer (after its vector entries) take <e, b> into their offsets.
    # With a folded gate there are two constants, closed (its adds left out) and open.
    # Entries apply in order; each acts on all its layers, gates and classes in one array
    # op, masked by the (gate, class) rows it covers: at one layer the order of entries is
    # kept, and a loop per layer and row would cost ~20 us a layer (most of a compile).
    classes = _classes([e.positions for e in entries] + [f.positions for f in features])
    nc = len(classes)
    combos = 2 if folded_gate(entries) is not None else 1
    at_layer: dict[int, list[tuple[FeatureEntry, FeatureRows]]] = {}
    for f in features:
        rows = f.rows  # a pydantic private attribute: read once
        at_layer.setdefault(rows.layer, []).append((f, rows))
    dynamic_adds = dynamic_entries(entries)
    dyn_index = {id(e): j for j, e in enumerate(dynamic_adds)}

    def covered(positions: str, gated: bool = False) -> np.ndarray:
        """[combos, nc, 1]: 1.0 on the rows an entry acts on (a gated add: gate open only)."""
        window = WINDOWS[positions]
        on = [
            [float(_covers(window, cls) and (g == 1 or not gated)) for cls in classes]
            for g in range(combos)
        ]
        return np.array(on)[..., None]

    # `resolved` is a pydantic private attribute (a slow __getattr__): read once.
    resolved = [e.resolved for e in entries]
    layers = sorted({layer for res in resolved for layer in res} | set(at_layer))
    row_of = {layer: i for i, layer in enumerate(layers)}
    # The fold over the spec's own classes (nc: 1 when every entry acts at all positions);
    # class 0 is copied to the rest at the end.
    bv = np.zeros((len(layers), combos, nc, hidden_size), dtype=np.float64)
    # Dynamic adds' directions, pushed through later projections (a gate changes none).
    dv = np.zeros((len(layers), nc, len(dyn_index), hidden_size), dtype=np.float64)
    with_dyn = np.zeros(len(layers), dtype=bool)
    projections: list[Projection] = []
    for entry, res in zip(entries, resolved, strict=True):
        own = sorted(res)
        # Its layers in the fold: a view when it has every layer (no gather and scatter).
        at: slice | np.ndarray = (
            slice(None)
            if len(own) == len(layers)
            else np.array([row_of[layer] for layer in own], dtype=np.int64)
        )
        on = covered(entry.positions, entry.when is not None)[None]  # [1, combos, nc, 1]
        if entry.op == "add":
            vecs = [unit(res[i]) if entry.normalize else res[i] for i in own]
            w = np.stack(vecs).astype(np.float64)  # [n, hidden]
            if id(entry) in dyn_index:  # its window and strength are applied per token
                dv[at, :, dyn_index[id(entry)]] = w[:, None, :]
                with_dyn[at] = True
            else:  # on the rows it covers only: most of a gated spec's rows are zero
                for g, c in zip(*np.nonzero(on[0, :, :, 0]), strict=True):
                    bv[at, g, c] += entry.scale * w
            continue
        units = np.stack([unit(res[i]) for i in own])  # [n, hidden] float32
        gain = float(entry.scale) if entry.op == "ablate" else 1.0
        projections.append(
            Projection(*WINDOWS[entry.positions], gain, np.array(own, dtype=np.int64), units)
        )
        u = units.astype(np.float64)
        ub = u[:, None, None, :]  # broadcasts over [n, combos, nc, hidden] and [n, nc, J, hidden]
        folded = bv[at]
        folded -= (on * (gain * (folded @ u[:, None, :, None]))) * ub
        if entry.op == "clamp":
            folded += on * (entry.value * ub)
        bv[at] = folded
        if dyn_index:  # a projection is never gated: gate row 0 says which classes
            dirs = dv[at]
            dirs -= gain * ((on[0, 0][None, :, None] * (dirs @ u[:, None, :, None])) * ub)
            dv[at] = dirs
    ops: dict[int, tuple[list[FeatureRows], np.ndarray]] = {}
    for layer, here in at_layer.items():
        bl = bv[row_of[layer]]  # [combos, nc, hidden], after the layer's vector entries
        clamps = [rows for f, rows in here if f.op != "add"]
        coef = np.zeros((combos, NUM_CLASSES, len(clamps), NUM_COEFS), dtype=np.float64)
        k = 0
        for f, rows in here:
            active = covered(f.positions)[0, :, 0] > 0.0  # [nc]
            if f.op == "add":
                bl += active[:, None] * (f.add_scale * rows.dec.astype(np.float64))
                continue
            alpha, beta = (f.value, -1.0) if f.op == "clamp" else (0.0, f.factor - 1.0)
            ck = coef[:, :nc, k]
            ck[..., COEF_OFFSET] = rows.offset + bl @ rows.enc.astype(np.float64)
            ck[..., COEF_THRESHOLD] = rows.threshold
            ck[..., COEF_ALPHA] = np.where(active, alpha, 0.0)
            ck[..., COEF_BETA] = np.where(active, beta, 0.0)
            k += 1
        if clamps:
            coef[:, nc:] = coef[:, :1]
            ops[layer] = (clamps, coef.reshape(combos * NUM_CLASSES, len(clamps), NUM_COEFS))
    kept = bv.any(axis=(1, 2, 3))
    const_layers = np.array(layers, dtype=np.int64)[kept]
    const = _all_classes(bv[kept], axis=2).reshape(-1, combos * NUM_CLASSES, hidden_size)
    dynamic = DynamicAdds.identity(hidden_size)
    if dyn_index:
        dynamic = DynamicAdds(
            np.array(layers, dtype=np.int64)[with_dyn],
            _all_classes(dv[with_dyn], axis=1),
            np.stack([dynamic_params(e) for e in dynamic_adds]),
        )
    features_ops = _pack_features(ops, combos * NUM_CLASSES, hidden_size)
    return projections, const_layers, const, features_ops, dynamic


def _all_classes(folded: np.ndarray, axis: int) -> np.ndarray:
    """`folded` (float64, its first `nc` classes along `axis`) as float32 with all
    NUM_CLASSES, the classes it does not have copied from class 0 (see `_classes`)."""
    nc = folded.shape[axis]
    if nc == NUM_CLASSES:
        return folded.astype(np.float32)
    shape = list(folded.shape)
    shape[axis] = NUM_CLASSES
    out = np.empty(shape, dtype=np.float32)
    lead = (slice(None),) * axis
    out[lead + (slice(0, nc),)] = folded
    out[lead + (slice(nc, None),)] = folded[lead + (slice(0, 1),)]
    return out


def _pack_features(
    ops: dict[int, tuple[list[FeatureRows], np.ndarray]], rows: int, hidden_size: int
) -> FeatureOps:
    if not ops:
        return FeatureOps.identity(hidden_size, rows)
    layers = sorted(ops)
    width = max(len(gated) for gated, _ in ops.values())
    enc = np.zeros((len(layers), width, hidden_size), dtype=np.float32)
    dec = np.zeros_like(enc)
    coef = np.zeros((len(layers), rows, width, NUM_COEFS), dtype=np.float32)
    for i, layer in enumerate(layers):
        gated, c = ops[layer]
        for k, rows in enumerate(gated):
            enc[i, k] = rows.enc
            dec[i, k] = rows.dec
        coef[i, :, : len(gated)] = c
    return FeatureOps(np.array(layers, dtype=np.int64), enc, dec, coef)


def _compile_heads(spec: SteeringSpec, shape: ModelShape) -> HeadOps:
    n, d = shape.num_heads, shape.head_dim
    entries = [e for e in spec.vectors if e.site == "heads"]
    if not entries and not spec.heads:
        return HeadOps.identity(n, d)
    classes = _classes([e.positions for e in entries] + [m.positions for m in spec.heads])

    def covered(positions: str) -> list[int]:
        window = WINDOWS[positions]
        return [c for c, cls in enumerate(classes) if _covers(window, cls)]

    # Each entry's vectors read once (`resolved` is a pydantic private attribute); all
    # layers at once, masks before entries and entries in order at each layer and class.
    vectors = [(e, e.resolved, covered(e.positions)) for e in entries]
    layers = sorted({m.layer for m in spec.heads} | {i for _, res, _ in vectors for i in res})
    row = {layer: i for i, layer in enumerate(layers)}
    a = np.ones((len(layers), NUM_CLASSES, n), dtype=np.float64)
    b = np.zeros((len(layers), NUM_CLASSES, n, d), dtype=np.float64)
    q = np.ones((len(layers), NUM_CLASSES, n), dtype=np.float64)
    # Masks come first at a layer, while b is still zero there: they scale `a` (or `q`).
    for mask in spec.heads:
        at = (row[mask.layer], np.array(covered(mask.positions))[:, None], mask.heads)
        (q if mask.target == "query" else a)[at] *= mask.scale
    for entry, res, cs in vectors:
        for layer, vec in res.items():
            i = row[layer]
            v = (unit(vec) if entry.normalize else vec).astype(np.float64).reshape(n, d)
            if entry.op == "add":
                b[i, cs] += entry.scale * v
                continue
            on = np.any(v != 0.0, axis=1)  # mix, on the heads where v is non-zero
            w = float(entry.weight)
            for c in cs:
                a[i, c, on] *= 1.0 - w
                b[i, c, on] = (1.0 - w) * b[i, c, on] + w * v[on]
    a[:, len(classes) :] = a[:, :1]
    b[:, len(classes) :] = b[:, :1]
    q[:, len(classes) :] = q[:, :1]
    flat = len(layers), -1
    kept = (
        np.any(a.reshape(flat) != 1.0, axis=1)
        | np.any(b.reshape(flat) != 0.0, axis=1)
        | np.any(q.reshape(flat) != 1.0, axis=1)
    )
    if not kept.any():
        return HeadOps.identity(n, d)
    return HeadOps(
        n,
        d,
        np.array(layers, dtype=np.int64)[kept],
        a[kept].astype(np.float32),
        b[kept].reshape(-1, NUM_CLASSES, n * d).astype(np.float32),
        q[kept].astype(np.float32),
    )
