"""Readout: per-token projections of the residual stream, collected at the sampler step.

Inside the forward pass every layer adds its slot's readout projections into
`tables.read_out` ([tokens, max_read], see layers.apply_readout). Here, once per step, the
rows that matter are gathered in one index_select and one copy to the host:

    generated token g   the row that sampled it (position prompt_len - 1 + g), as its
                        log-prob is the distribution of that row
    prompt token p      the row at position p (entries with `prompt`; such requests are
                        kept out of the prefix cache, whose rows are never recomputed)

A top-k entry (topk.py) reads the same rows of `tables.topk_stream` instead, and only its
requests' rows go through the SAE's encoder, in one call per step.

Rows are placed by position, so chunked prefill and recomputation after preemption give
each position once. Values wait per engine request until fetched: all at once (`fetch`,
the offline engine), or as they come (`pull`, the server: each call takes what was added
since the caller's last, and the last one drops the request). A finished request's values
are kept for `MAX_FINISHED` more requests.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from steering.compile import CompiledSpec, Readout
from steering.engine.request_ids import api_request_key, choice_index
from steering.engine.token_runs import TokenRun, put_token, token_runs
from steering.engine.topk import TopKEncoder, active_pairs

MAX_FINISHED = 4096


@dataclass
class TopKState:
    """A request's top-k entry: its place among the readout entries, its k, its values."""

    column: int
    k: int  # effective k (topk.TopKEncoder.effective_k)
    prompt: bool
    # Per token: features [k] (int32, -1: not computed) and activations [k].
    generated: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    prompt_ids: np.ndarray | None = None  # [prompt_len, k]
    prompt_values: np.ndarray | None = None

    def not_computed(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(self.k, -1, np.int32), np.zeros(self.k, np.float32)


@dataclass
class ReadoutState:
    entries: int  # projection columns
    prompt_len: int
    prompt: np.ndarray | None  # [prompt_len, entries]; NaN where not computed (yet)
    generated: list[np.ndarray] = field(default_factory=list)  # per token: [entries]
    # Entries whose value is an SAE feature's activation of the projection (compile.Readout).
    features: list[tuple[int, Readout]] = field(default_factory=list)
    topk: TopKState | None = None

    def not_computed(self) -> np.ndarray:
        return np.full(self.entries, np.nan, np.float32)

    def values(self, projections: np.ndarray) -> np.ndarray:
        """[rows, entries] values from the rows' projections."""
        out = projections[:, : self.entries].copy()
        for k, r in self.features:
            out[:, k] = r.value(out[:, k])
        return out

    def rows(self, start: int = 0) -> list[list]:
        """Generated tokens from `start`: per token, each entry's value in spec order (a
        top-k entry's is its [[feature, activation], ...])."""
        out = [v.tolist() for v in self.generated[start:]]
        t = self.topk
        if t is not None:
            for row, (ids, values) in zip(out, t.generated[start:], strict=True):
                row.insert(t.column, active_pairs(ids, values))
        return out

    def prompt_rows(self) -> list[list] | None:
        if self.prompt is None:
            return None
        out = self.prompt.tolist()
        t = self.topk
        if t is not None:
            for p, row in enumerate(out):
                pairs = None
                if t.prompt_ids is not None and t.prompt_values is not None:
                    pairs = active_pairs(t.prompt_ids[p], t.prompt_values[p])
                row.insert(t.column, pairs)
        return out

    def result(self) -> dict:
        return {"generated": self.rows(), "prompt": self.prompt_rows()}


class ReadoutBook:
    def __init__(
        self,
        read_out: torch.Tensor | None,
        topk_stream: torch.Tensor | None = None,
        encoder: TopKEncoder | None = None,
    ):
        self.read_out = read_out
        self.topk_stream = topk_stream
        self.encoder = encoder
        self.live: dict[str, ReadoutState] = {}
        self.finished: OrderedDict[str, ReadoutState] = OrderedDict()
        self.plan: list[TokenRun[ReadoutState]] = []
        # Engine id without vLLM's random suffix -> engine id, for `pull` (no scan per call).
        self.by_key: dict[str, str] = {}

    def register(self, req_id: str, spec: CompiledSpec, prompt_len: int) -> None:
        projections = spec.projection_readouts
        n = len(projections)
        reads = any(r.prompt for r in spec.readout)
        prompt = np.full((prompt_len, n), np.nan, dtype=np.float32) if reads else None
        features = [(k, r) for k, r in enumerate(projections) if r.threshold is not None]
        topk = None
        for column, r in enumerate(spec.readout):
            if r.top_k and self.encoder is not None:
                topk = TopKState(column, self.encoder.effective_k(r.top_k), r.prompt)
                if r.prompt:
                    topk.prompt_ids = np.full((prompt_len, topk.k), -1, np.int32)
                    topk.prompt_values = np.zeros((prompt_len, topk.k), np.float32)
        self.live[req_id] = ReadoutState(n, prompt_len, prompt, features=features, topk=topk)
        self.by_key[api_request_key(req_id)] = req_id

    def plan_step(self, req_ids: list[str], req_indices: np.ndarray, positions: np.ndarray) -> None:
        self.plan = token_runs(req_ids, req_indices, positions, self.live)

    def collect(self) -> None:
        """One gather and one host copy for all planned rows of this step."""
        # Per run: how many prompt rows it reads, and the generated token it sampled (if any).
        reads: list[tuple[TokenRun[ReadoutState], int, int | None]] = []
        rows: list[np.ndarray] = []
        for p in self.plan:
            s = p.state
            prompt_rows = 0
            if s.prompt is not None:
                prompt_rows = min(p.count, max(s.prompt_len - p.first_pos, 0))
                rows.append(np.arange(p.start, p.start + prompt_rows))
            g = p.first_pos + p.count - s.prompt_len  # the token its last row sampled
            if g >= 0:
                rows.append(np.array([p.start + p.count - 1]))
            reads.append((p, prompt_rows, g if g >= 0 else None))
        self.plan = []
        self._collect_topk(reads)
        wanted = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        if not wanted.size:  # only mid-prompt chunks of requests that read generated tokens
            return
        if self.read_out is None:  # top-k entries only (readout off)
            values = np.zeros((wanted.size, 0), np.float32)
        else:
            index = torch.from_numpy(wanted).to(self.read_out.device)
            values = self.read_out.index_select(0, index).cpu().numpy()
        at = 0
        for p, prompt_rows, g in reads:
            s = p.state
            if prompt_rows:
                s.prompt[p.first_pos : p.first_pos + prompt_rows] = s.values(
                    values[at : at + prompt_rows]
                )
                at += prompt_rows
            if g is not None:
                value = s.values(values[at : at + 1])[0]
                at += 1
                put_token(s.generated, g, value, s.not_computed)

    def _collect_topk(self, reads: list[tuple[TokenRun[ReadoutState], int, int | None]]) -> None:
        """The top-k entries' rows of this step through the SAE's encoder, in one call."""
        asking = [(p, n, g) for p, n, g in reads if p.state.topk is not None]
        if not asking or self.encoder is None or self.topk_stream is None:
            return
        rows: list[np.ndarray] = []
        for p, prompt_rows, g in asking:
            t = p.state.topk
            assert t is not None
            if t.prompt and prompt_rows:
                rows.append(np.arange(p.start, p.start + prompt_rows))
            if g is not None:
                rows.append(np.array([p.start + p.count - 1]))
        if not rows:
            return
        index = torch.from_numpy(np.concatenate(rows)).to(self.topk_stream.device)
        k = max(p.state.topk.k for p, _, _ in asking)  # type: ignore[union-attr]
        ids, values = self.encoder.encode(self.topk_stream.index_select(0, index), k)
        at = 0
        for p, prompt_rows, g in asking:
            t = p.state.topk
            assert t is not None
            if t.prompt and prompt_rows:
                assert t.prompt_ids is not None and t.prompt_values is not None
                where = slice(p.first_pos, p.first_pos + prompt_rows)
                t.prompt_ids[where] = ids[at : at + prompt_rows, : t.k]
                t.prompt_values[where] = values[at : at + prompt_rows, : t.k]
                at += prompt_rows
            if g is not None:
                token = (ids[at, : t.k].copy(), values[at, : t.k].copy())
                at += 1
                put_token(t.generated, g, token, t.not_computed)

    def release(self, req_id: str) -> None:
        state = self.live.pop(req_id, None)
        if state is not None:
            self.finished[req_id] = state
            while len(self.finished) > MAX_FINISHED:
                self._forget(self.finished.popitem(last=False)[0])

    def _forget(self, req_id: str) -> None:
        key = api_request_key(req_id)
        if self.by_key.get(key) == req_id:
            del self.by_key[key]

    def fetch(self, request_id: str) -> dict[int, dict]:
        """Values of every choice of API request `request_id` (live or finished), by choice
        index; finished ones are handed over once."""
        out: dict[int, dict] = {}
        for rid in list(self.live) + list(self.finished):
            index = choice_index(rid, request_id)
            if index is None:
                continue
            state = self.live.get(rid)
            if state is None:
                state = self.finished.pop(rid)
                self._forget(rid)
            out[index] = state.result()
        return out

    def pull(self, queries: list[tuple[str, int, list[int], list[int]]]) -> list[dict[int, dict]]:
        """For each query (API request id, n, values already held per choice, choices that
        are done), each choice's values from there on; done choices are dropped here.

        A choice's first answer also carries its prompt values (complete by then: the
        caller asks only for tokens it has seen, and the step that sampled the first token
        read the last prompt row)."""
        answers = []
        for request_id, n, held, done in queries:
            answer: dict[int, dict] = {}
            for child in range(n):
                rid = self.by_key.get(request_id if n == 1 else f"{child}_{request_id}")
                state = None if rid is None else self.live.get(rid) or self.finished.get(rid)
                if state is None or choice_index(rid, request_id) != child:
                    continue
                start = held[child]
                answer[child] = {
                    "start": start,
                    "generated": state.rows(start),
                    "prompt": None if start else state.prompt_rows(),
                }
                if child in done:
                    self.live.pop(rid, None)
                    self.finished.pop(rid, None)
                    self._forget(rid)
            answers.append(answer)
        return answers
