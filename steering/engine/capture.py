"""Residual-stream capture for training and checking vectors, inside vLLM's forward.

An engine started with `additional_config.steerserve.capture=true` has every decoder layer
copy its output stream (all scheduled tokens) into `tables.stream_all`, one persistent
[layers, max_tokens, hidden] buffer overwritten each step. A request asks for what it
wants with `extra_args["steerserve_capture"] = {"key", "layers", "positions"}`, and at the
sampler step of every forward its prompt rows are read out of the buffer on the device:

    last   the stream at the last prompt token             -> [layers, hidden]
    mean   the mean over all prompt tokens                 -> [layers, hidden]
    all    every prompt token                              -> [prompt_len, layers, hidden]

Chunked prefill spreads a prompt over steps and preemption recomputes it: rows are kept by
position, so each prompt position is counted once. A prompt row the engine never computed
(a prefix-cache hit) fails the capture rather than averaging over a hole: capture engines
run without prefix caching. A result is final once the last prompt row is read (or the
request ends, with an error if rows are missing); it waits, keyed by the caller's `key`,
until fetched over RPC (`worker.captures(llm, keys)`); the oldest unfetched
results are dropped beyond `MAX_FINISHED`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steering.engine.token_runs import TokenRun, token_runs

log = logging.getLogger(__name__)

REQUEST_KEY = "steerserve_capture"
POSITIONS = ("last", "mean", "all")
MAX_FINISHED = 8192


class CaptureError(ValueError):
    """A bad capture request: `field` within it ("" for the whole object) and why."""

    def __init__(self, field: str, why: str):
        self.field, self.why = field, why
        super().__init__(f"{field}: {why}" if field else why)


def parse_request(raw: Any, num_layers: int) -> tuple[str, list[int], str]:
    """(key, layers, positions) of a capture request; CaptureError names the bad field."""
    if not isinstance(raw, dict):
        raise CaptureError("", "must be an object")
    unknown = set(raw) - {"key", "layers", "positions"}
    if unknown:
        raise CaptureError("", f"unknown field(s) {sorted(unknown)}")
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise CaptureError("key", "must be a non-empty string")
    layers = raw.get("layers")
    if (
        not isinstance(layers, list)
        or not layers
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise CaptureError("layers", "must be a non-empty list of ints")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise CaptureError("layers", f"{bad} out of range 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise CaptureError("layers", "duplicate layers")
    positions = raw.get("positions", "last")
    if positions not in POSITIONS:
        raise CaptureError("positions", f"{positions!r} is not one of {POSITIONS}")
    return key, layers, positions


@dataclass
class CaptureState:
    key: str
    layers: torch.Tensor  # int64 layer indices on the device
    positions: str
    prompt_len: int
    acc: torch.Tensor  # float32: [layers, hidden] or [prompt_len, layers, hidden]
    next_pos: int = 0  # prompt positions below this are already in `acc`
    error: str | None = None

    def result(self) -> np.ndarray | str:
        if self.error is not None:
            return self.error
        if self.next_pos < self.prompt_len:
            return f"the request ended after {self.next_pos} of {self.prompt_len} prompt tokens"
        out = self.acc / self.prompt_len if self.positions == "mean" else self.acc
        return out.cpu().numpy()


@dataclass
class CaptureBook:
    """Live capture requests, this step's plan, and finished results awaiting a fetch."""

    stream_all: torch.Tensor
    live: dict[str, CaptureState] = field(default_factory=dict)
    finished: OrderedDict[str, np.ndarray | str] = field(default_factory=OrderedDict)
    plan: list[TokenRun[CaptureState]] = field(default_factory=list)

    def register(self, req_id: str, raw: Any, prompt_len: int) -> None:
        num_layers, _, hidden = self.stream_all.shape
        try:
            key, layers, positions = parse_request(raw, num_layers)
        except CaptureError as e:  # the offline API validates first; never crash the engine
            log.error("steerserve: request %s: %s", req_id, e)
            return
        shape = (prompt_len, len(layers), hidden) if positions == "all" else (len(layers), hidden)
        device = self.stream_all.device
        self.live[req_id] = CaptureState(
            key=key,
            layers=torch.tensor(layers, dtype=torch.int64, device=device),
            positions=positions,
            prompt_len=prompt_len,
            acc=torch.zeros(shape, dtype=torch.float32, device=device),
        )

    def plan_step(self, req_ids: list[str], req_indices: np.ndarray, positions: np.ndarray) -> None:
        self.plan = token_runs(req_ids, req_indices, positions, self.live)

    def collect(self) -> None:
        """Read this step's planned prompt rows out of `stream_all` (device ops only)."""
        for p in self.plan:
            s = p.state
            if s.error is not None or s.next_pos >= s.prompt_len:
                continue
            if p.first_pos > s.next_pos:
                s.error = (
                    f"prompt positions {s.next_pos}..{p.first_pos - 1} were not computed "
                    "(prefix cache hit?); capture needs an engine without prefix caching"
                )
                continue
            lo = s.next_pos  # skip rows already counted (recomputation after preemption)
            hi = min(p.first_pos + p.count, s.prompt_len)
            if hi <= lo:
                continue
            first = p.start - p.first_pos  # token index of prompt position 0 in this step
            if s.positions == "last":
                if hi == s.prompt_len:  # only the last prompt row is read
                    s.acc.copy_(self.stream_all[:, first + hi - 1].index_select(0, s.layers))
            else:
                # Slice the rows first: a view, so only this request's rows are copied.
                rows = self.stream_all[:, first + lo : first + hi].index_select(0, s.layers)
                if s.positions == "mean":
                    s.acc += rows.float().sum(dim=1)
                else:
                    s.acc[lo:hi] = rows.float().transpose(0, 1)
            s.next_pos = hi
        self.plan = []
        # A finished prompt is final now: the worker frees a request's state only at a
        # later step, and the caller fetches as soon as generation returns.
        for rid in [r for r, s in self.live.items() if s.next_pos >= s.prompt_len]:
            self.release(rid)

    def release(self, req_id: str) -> None:
        state = self.live.pop(req_id, None)
        if state is None:
            return
        self.finished[state.key] = state.result()
        while len(self.finished) > MAX_FINISHED:
            dropped, _ = self.finished.popitem(last=False)
            log.warning("steerserve: capture %s dropped unfetched", dropped)

    def fetch(self, keys: list[str]) -> dict[str, dict | str | None]:
        """Pop finished results: an encoded array (`encode`), an error message, or None
        (unknown or still running)."""
        out: dict[str, dict | str | None] = {}
        for k in keys:
            result = self.finished.pop(k, None)
            out[k] = encode(result) if isinstance(result, np.ndarray) else result
        return out


# vLLM's RPC serialiser turns a bare ndarray into an opaque list; shape + bytes survive it.
def encode(array: np.ndarray) -> dict:
    data = np.ascontiguousarray(array, dtype=np.float32).tobytes()
    return {"shape": list(array.shape), "float32": data}


def decode(blob: dict) -> np.ndarray:
    return np.frombuffer(blob["float32"], dtype=np.float32).reshape(blob["shape"]).copy()
