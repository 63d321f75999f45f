"""Where each request's tokens sit in a step's flattened batch (capture, readout and
token-level condition reports), and placing per-token values by generated index."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass
class TokenRun(Generic[T]):
    """One request's contiguous tokens in this step: vLLM lays rows out in batch order."""

    state: T
    start: int  # index of its first token in the step's flattened batch
    first_pos: int  # the position of that token in its sequence
    count: int  # how many tokens it has in this step


def token_runs(
    req_ids: list[str], req_indices: np.ndarray, positions: np.ndarray, wanted: Mapping[str, T]
) -> list[TokenRun[T]]:
    """The runs of the requests in `wanted` (by request id) that have tokens this step."""
    if not wanted:
        return []
    counts = np.bincount(req_indices, minlength=len(req_ids))
    starts = np.cumsum(counts) - counts
    runs = []
    for row, rid in enumerate(req_ids):
        state = wanted.get(rid)
        if state is not None and counts[row]:
            start = int(starts[row])
            runs.append(TokenRun(state, start, int(positions[start]), int(counts[row])))
    return runs


def put_token(tokens: list, g: int, value: object, missing: Callable[[], object]) -> None:
    """tokens[g] = value; a gap before it (tokens no step read) is filled with missing()."""
    if g < len(tokens):
        tokens[g] = value  # recomputed after preemption: the same token
        return
    if g > len(tokens):
        tokens.extend([missing()] * (g - len(tokens)))
    tokens.append(value)
