"""Contrastive pairs in the tiny test models' vocabulary (steering/tiny_models.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

SUBJECTS = [
    "the cat",
    "a dog",
    "the bird",
    "one fish",
    "some tree",
    "the river",
    "a stone",
    "the city",
]
VERBS = ["sees", "finds", "likes", "holds", "wants", "knows"]
OBJECTS = ["the house", "a road", "the light", "the cloud"]
SWAPS = [("happy", "sad"), ("bright", "dark"), ("warm", "cold"), ("calm", "angry")]


def make_pairs(n: int = 24) -> list[dict[str, str]]:
    triples = itertools.islice(itertools.product(SUBJECTS, VERBS, OBJECTS), 0, 4 * n, 4)
    pairs = []
    for i, (s, v, o) in enumerate(triples):
        pos, neg = SWAPS[i % len(SWAPS)]
        pairs.append(
            {"positive": f"{s} is {pos} and {v} {o}", "negative": f"{s} is {neg} and {v} {o}"}
        )
    return pairs


def write_pairs(path: Path, n: int = 24) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(n)))
    return path
