"""Make and check steering vectors from contrastive pairs (`steerserve vectors train/eval`).

Pairs are JSONL lines `{"positive": ..., "negative": ...}`, each side a string or a list of
chat messages. Both sides go through the engine (`steering.capture.Capturer`) and their
activations at the chosen positions give, per layer i (the output of decoder layer i):

    mean_diff    mean over pairs of (positive - negative)          (CAA; keeps its norm)
    pca_diff     first principal component of the differences      (repeng's default;
                 (centred, as sklearn's PCA does), unit norm         unit norm)
    pca_center   first principal component of both sides, each pair centred on its mean

A PCA direction's sign is arbitrary: as repeng does, it is flipped when fewer pairs project
higher on the positive side than on the negative side (a tie keeps sklearn's sign rule).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("mean_diff", "pca_diff", "pca_center")
TEMPLATES = ("raw", "chat")

Side = str | list[dict[str, Any]]


class PairsError(ValueError):
    pass


@dataclass(frozen=True)
class Pair:
    positive: Side
    negative: Side


def load_pairs(path: str | Path) -> list[Pair]:
    """Read a JSONL file of pairs; errors name the line and the field."""
    pairs: list[Pair] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairsError(f"{where}: not JSON: {e}") from None
            if not isinstance(row, dict):
                raise PairsError(f"{where}: must be an object with 'positive' and 'negative'")
            sides = []
            for key in ("positive", "negative"):
                side = row.get(key)
                if not _valid_side(side):
                    raise PairsError(
                        f"{where}: '{key}' must be a non-empty string or a list of chat "
                        "messages ({'role', 'content'})"
                    )
                sides.append(side)
            pairs.append(Pair(*sides))
    if len(pairs) < 2:
        raise PairsError(f"{path}: {len(pairs)} pair(s); at least 2 are needed")
    return pairs


def _valid_side(side: Any) -> bool:
    if isinstance(side, str):
        return bool(side)
    return (
        isinstance(side, list)
        and bool(side)
        and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in side
        )
    )


def render(side: Side, tokenizer: Any, template: str) -> str:
    """The prompt text of one side: as written ("raw"), or through the tokenizer's chat
    template with a generation prompt ("chat"; a string is one user message)."""
    if template == "raw":
        if not isinstance(side, str):
            raise PairsError("chat messages need --template chat")
        return side
    messages = [{"role": "user", "content": side}] if isinstance(side, str) else side
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def capture_pairs(
    capturer: Any,
    pairs: Sequence[Pair],
    layers: Sequence[int],
    positions: str = "last",
    template: str = "raw",
    progress: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Activations [pairs, layers, hidden] of the positive and of the negative sides."""
    sides = [side for p in pairs for side in (p.positive, p.negative)]
    prompts = [render(side, capturer.tokenizer, template) for side in sides]
    got = np.stack(capturer.capture(prompts, layers, positions, progress=progress))
    return got[0::2], got[1::2]


def first_component(x: np.ndarray) -> np.ndarray:
    """Unit first principal component of the rows of x (centred first, as sklearn's PCA),
    signed as sklearn signs it (its largest-magnitude entry positive): `orient` keeps that
    sign when the pairs vote a tie, so ties come out as repeng's do."""
    centred = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    v = vt[0]
    return -v if v[np.argmax(np.abs(v))] < 0 else v


def orient(direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Flip so that more pairs project higher on the positive side (repeng's rule)."""
    higher = np.mean(pos @ direction > neg @ direction)
    lower = np.mean(pos @ direction < neg @ direction)
    return -direction if lower > higher else direction


def directions(pos: np.ndarray, neg: np.ndarray, method: str) -> list[np.ndarray]:
    """One vector per layer from [pairs, layers, hidden] activations."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    out = []
    for k in range(pos.shape[1]):
        p, n = pos[:, k].astype(np.float64), neg[:, k].astype(np.float64)
        if method == "mean_diff":
            v = (p - n).mean(axis=0)
        elif method == "pca_diff":
            v = orient(first_component(p - n), p, n)
        else:
            center = (p + n) / 2
            v = orient(first_component(np.concatenate([p - center, n - center])), p, n)
        out.append(v.astype(np.float32))
    return out


@dataclass(frozen=True)
class Separation:
    """How well one layer's direction separates the pairs (projections on the unit vector)."""

    layer: int
    accuracy: float  # share of pairs whose positive side projects higher
    gap: float  # mean projection difference (positive - negative)
    effect_size: float  # gap / pooled standard deviation of the two sides (Cohen's d)
    pos: np.ndarray  # projections of the positive sides
    neg: np.ndarray

    def row(self) -> dict[str, float]:
        return {
            "layer": self.layer,
            "accuracy": self.accuracy,
            "gap": self.gap,
            "effect_size": self.effect_size,
        }


def separation(layer: int, direction: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> Separation:
    u = direction.astype(np.float64) / np.linalg.norm(direction)
    a, b = pos.astype(np.float64) @ u, neg.astype(np.float64) @ u
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if len(a) > 1 else 0.0
    gap = float((a - b).mean())
    return Separation(
        layer=layer,
        accuracy=float(np.mean(a > b)),
        gap=gap,
        effect_size=gap / pooled if pooled > 0 else float("inf") * np.sign(gap),
        pos=a,
        neg=b,
    )


def provenance(model: str, pairs: int, method: str, positions: str, template: str) -> dict:
    """Metadata stored with a trained vector (safetensors header strings)."""
    return {
        "model": model,
        "samples": str(pairs),
        "positions": positions,
        "template": template,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "trained_with": f"steerserve vectors train --method {method}",
    }
