"""Lower a validated spec into the engine's per-layer operations.

Every residual op has one form, so the forward pass runs the same tensor code for every
row (slot 0, the identity, is all zeros):

    h <- h + v * (coef - gain * <h, v>)      for tokens whose position is in [lo, hi)

    add    : v = scale * w (w = v or v/|v|),  coef = 1,      gain = 0
    ablate : v = u = w/|w|,                   coef = 0,      gain = scale
    clamp  : v = u,                           coef = value,  gain = 1

The window is on rel = position - prompt_len: prompt rows have rel < 0, generated rows
rel >= 0 (DESIGN.md: decided per row from its position, never from the step kind).
Consecutive `add` entries with the same window commute, so they merge into one op.

The compiled form travels to the workers inside `SamplingParams.extra_args` as plain
ints/floats/bytes (cheap to serialise; decoded once per distinct fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steering.spec import SteeringSpec, unit

PAYLOAD_KEY = "steerserve.compiled"
PAYLOAD_VERSION = 1

NEVER = 1 << 62
WINDOWS: dict[str, tuple[int, int]] = {
    "all": (-NEVER, NEVER),
    "prompt": (-NEVER, 0),
    "generated": (0, NEVER),
}


@dataclass
class CompiledOp:
    lo: int
    hi: int
    coef: float
    gain: float
    layers: np.ndarray  # [n] int64, ascending
    vectors: np.ndarray  # [n, hidden] float32

    @property
    def is_add(self) -> bool:
        return self.coef == 1.0 and self.gain == 0.0


@dataclass
class CompiledSpec:
    fingerprint: str
    ops: list[CompiledOp]

    def to_payload(self) -> dict:
        return {
            "v": PAYLOAD_VERSION,
            "fp": self.fingerprint,
            "ops": [
                {
                    "lo": op.lo,
                    "hi": op.hi,
                    "coef": op.coef,
                    "gain": op.gain,
                    "layers": op.layers.astype(np.int64).tolist(),
                    "hidden": int(op.vectors.shape[1]),
                    "data": op.vectors.astype(np.float32).tobytes(),
                }
                for op in self.ops
            ],
        }

    @classmethod
    def from_payload(cls, payload: dict) -> CompiledSpec:
        if payload.get("v") != PAYLOAD_VERSION:
            raise ValueError(f"compiled steering payload version {payload.get('v')!r} unsupported")
        ops = []
        for op in payload["ops"]:
            layers = np.asarray(op["layers"], dtype=np.int64)
            flat = np.frombuffer(op["data"], dtype=np.float32)
            vectors = flat.reshape(len(layers), op["hidden"]).copy()
            ops.append(CompiledOp(op["lo"], op["hi"], op["coef"], op["gain"], layers, vectors))
        return cls(payload["fp"], ops)


def compile_spec(spec: SteeringSpec) -> CompiledSpec:
    """Lower a validated (resolved) spec. The result is empty for an empty spec."""
    ops: list[CompiledOp] = []
    pending: dict[int, np.ndarray] | None = None  # merged adds awaiting emission
    pending_window: tuple[int, int] | None = None

    def flush() -> None:
        nonlocal pending, pending_window
        if pending:
            layers = np.array(sorted(pending), dtype=np.int64)
            vecs = np.stack([pending[int(i)] for i in layers]).astype(np.float32)
            ops.append(CompiledOp(*pending_window, 1.0, 0.0, layers, vecs))
        pending, pending_window = None, None

    for entry in spec.vectors:
        window = WINDOWS[entry.positions]
        if entry.op == "add":
            if pending is not None and pending_window != window:
                flush()
            if pending is None:
                pending, pending_window = {}, window
            for layer, vec in entry.resolved.items():
                w = unit(vec) if entry.normalize else vec
                delta = np.float64(entry.scale) * w.astype(np.float64)
                prev = pending.get(layer)
                pending[layer] = delta if prev is None else prev + delta
            continue
        flush()
        layers = np.array(sorted(entry.resolved), dtype=np.int64)
        units = np.stack([unit(entry.resolved[int(i)]) for i in layers])
        if entry.op == "ablate":
            ops.append(CompiledOp(*window, 0.0, float(entry.scale), layers, units))
        else:  # clamp
            ops.append(CompiledOp(*window, float(entry.value), 1.0, layers, units))
    flush()
    return CompiledSpec(spec.fingerprint(), ops)
