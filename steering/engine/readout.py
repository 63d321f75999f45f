"""Readout: per-token projections of the residual stream, collected at the sampler step.

Inside the forward pass every layer adds its slot's readout projections into
`tables.read_out` ([tokens, max_read], see layers.apply_readout). Here, once per step, the
rows that matter are gathered in one index_select and one copy to the host:

    generated token g   the row that sampled it (position prompt_len - 1 + g), as its
                        log-prob is the distribution of that row
    prompt token p      the row at position p (entries with `prompt`; such requests are
                        kept out of the prefix cache, whose rows are never recomputed)

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
from steering.engine.token_runs import TokenRun, token_runs

MAX_FINISHED = 4096


@dataclass
class ReadoutState:
    entries: int
    prompt_len: int
    prompt: np.ndarray | None  # [prompt_len, entries]; NaN where not computed (yet)
    generated: list[np.ndarray] = field(default_factory=list)  # per token: [entries]
    # Entries whose value is an SAE feature's activation of the projection (compile.Readout).
    features: list[tuple[int, Readout]] = field(default_factory=list)

    def values(self, projections: np.ndarray) -> np.ndarray:
        """[rows, entries] values from the rows' projections."""
        out = projections[:, : self.entries].copy()
        for k, r in self.features:
            out[:, k] = r.value(out[:, k])
        return out

    def result(self) -> dict:
        return {
            "generated": [v.tolist() for v in self.generated],
            "prompt": None if self.prompt is None else self.prompt.tolist(),
        }


class ReadoutBook:
    def __init__(self, read_out: torch.Tensor):
        self.read_out = read_out
        self.live: dict[str, ReadoutState] = {}
        self.finished: OrderedDict[str, ReadoutState] = OrderedDict()
        self.plan: list[TokenRun[ReadoutState]] = []
        # Engine id without vLLM's random suffix -> engine id, for `pull` (no scan per call).
        self.by_key: dict[str, str] = {}

    def register(self, req_id: str, spec: CompiledSpec, prompt_len: int) -> None:
        n = len(spec.readout)
        prompt = np.full((prompt_len, n), np.nan, dtype=np.float32) if spec.reads_prompt else None
        features = [(k, r) for k, r in enumerate(spec.readout) if r.threshold is not None]
        self.live[req_id] = ReadoutState(n, prompt_len, prompt, features=features)
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
        wanted = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        if not wanted.size:  # only mid-prompt chunks of requests that read generated tokens
            return
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
                if g < len(s.generated):
                    s.generated[g] = value  # recomputed after preemption: the same token
                else:
                    s.generated.extend(
                        [np.full(s.entries, np.nan, np.float32)] * (g - len(s.generated))
                    )
                    s.generated.append(value)

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
                    "generated": [v.tolist() for v in state.generated[start:]],
                    "prompt": None if start or state.prompt is None else state.prompt.tolist(),
                }
                if child in done:
                    self.live.pop(rid, None)
                    self.finished.pop(rid, None)
                    self._forget(rid)
            answers.append(answer)
        return answers
