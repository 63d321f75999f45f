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
prompt (rel < 0) or generated (rel >= 0). b is folded once per class with the entries
active for it; each projection also keeps its window [lo, hi) on rel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from steering.spec import SteeringSpec, unit

PAYLOAD_KEY = "steerserve.compiled"
PAYLOAD_VERSION = 2

NEVER = 1 << 62
WINDOWS: dict[str, tuple[int, int]] = {
    "all": (-NEVER, NEVER),
    "prompt": (-NEVER, 0),
    "generated": (0, NEVER),
}
# Token classes for the folded constant: rel < 0 (prompt), rel >= 0 (generated).
CLASSES: tuple[tuple[int, int], ...] = ((-NEVER, 0), (0, NEVER))
NUM_CLASSES = len(CLASSES)


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
class CompiledSpec:
    fingerprint: str
    hidden_size: int
    projections: list[Projection]
    const_layers: np.ndarray  # [m] int64: layers with a non-zero folded constant
    const: np.ndarray  # [m, NUM_CLASSES, hidden] float32

    @property
    def is_identity(self) -> bool:
        return not self.projections and not self.const_layers.size

    def to_payload(self) -> dict:
        """Plain ints/floats/bytes: cheap for vLLM to serialise to its workers."""
        return {
            "v": PAYLOAD_VERSION,
            "fp": self.fingerprint,
            "hidden": self.hidden_size,
            "proj": [
                {
                    "lo": p.lo,
                    "hi": p.hi,
                    "gain": p.gain,
                    "layers": p.layers.tolist(),
                    "units": p.units.astype(np.float32).tobytes(),
                }
                for p in self.projections
            ],  # fmt: skip
            "const_layers": self.const_layers.tolist(),
            "const": self.const.astype(np.float32).tobytes(),
        }

    @classmethod
    def from_payload(cls, payload: dict) -> CompiledSpec:
        if payload.get("v") != PAYLOAD_VERSION:
            raise ValueError(f"compiled steering payload version {payload.get('v')!r} unsupported")
        hidden = payload["hidden"]

        def floats(raw: bytes, *shape: int) -> np.ndarray:
            return np.frombuffer(raw, dtype=np.float32).reshape(*shape).copy()

        projections = [
            Projection(p["lo"], p["hi"], p["gain"], np.asarray(p["layers"], dtype=np.int64),
                       floats(p["units"], len(p["layers"]), hidden))
            for p in payload["proj"]
        ]  # fmt: skip
        const_layers = np.asarray(payload["const_layers"], dtype=np.int64)
        const = floats(payload["const"], len(const_layers), NUM_CLASSES, hidden)
        return cls(payload["fp"], hidden, projections, const_layers, const)


def compile_spec(spec: SteeringSpec, hidden_size: int) -> CompiledSpec:
    """Lower a validated (resolved) spec; an empty spec compiles to the identity."""
    projections: list[Projection] = []
    for entry in spec.vectors:
        if entry.op == "add":
            continue
        layers = np.array(sorted(entry.resolved), dtype=np.int64)
        units = np.stack([unit(entry.resolved[int(i)]) for i in layers]).astype(np.float32)
        gain = float(entry.scale) if entry.op == "ablate" else 1.0
        projections.append(Projection(*WINDOWS[entry.positions], gain, layers, units))

    # Fold constants per layer and class, in float64, through the later projections. When
    # every entry applies at all positions the classes agree: fold once, copy.
    classes = CLASSES if any(e.positions != "all" for e in spec.vectors) else CLASSES[:1]
    consts: dict[int, np.ndarray] = {}
    for layer in sorted({layer for e in spec.vectors for layer in e.resolved}):
        b = np.zeros((NUM_CLASSES, hidden_size), dtype=np.float64)
        for c, cls in enumerate(classes):
            for entry in spec.vectors:
                vec = entry.resolved.get(layer)
                if vec is None or not _covers(WINDOWS[entry.positions], cls):
                    continue
                if entry.op == "add":
                    w = unit(vec) if entry.normalize else vec
                    b[c] += entry.scale * w.astype(np.float64)
                    continue
                u = unit(vec).astype(np.float64)
                gain = entry.scale if entry.op == "ablate" else 1.0
                b[c] -= gain * np.dot(b[c], u) * u
                if entry.op == "clamp":
                    b[c] += entry.value * u
        b[len(classes) :] = b[0]
        if np.any(b):
            consts[layer] = b
    const_layers = np.array(sorted(consts), dtype=np.int64)
    const = (
        np.stack([consts[int(i)] for i in const_layers]).astype(np.float32)
        if consts
        else np.zeros((0, NUM_CLASSES, hidden_size), dtype=np.float32)
    )
    return CompiledSpec(spec.fingerprint(), hidden_size, projections, const_layers, const)
