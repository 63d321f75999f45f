"""Token-level conditions' values, read back at the sampler step for the response's report.

Inside the forward pass each token's condition values land in `tables.tok_cval`
(layers.decide_token_conditions). Once per step the row that sampled each generated token
(position prompt_len - 1 + g, as readout.py places them: the row whose gates shaped token
g's distribution) is gathered in one index_select and one copy to the host. Rows are placed
by generated index, so a recomputation after preemption writes the same token again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from steering.compile import Conditions
from steering.engine.layers import conditions_met
from steering.engine.token_runs import TokenRun, put_token, token_runs


@dataclass
class TokenConditionState:
    prompt_len: int
    columns: np.ndarray  # the token-level conditions' places among the spec's conditions
    params: np.ndarray  # [k, NUM_COND_PARAMS]: their ops and thresholds
    values: list[np.ndarray] = field(default_factory=list)  # per generated token: [k]

    def not_computed(self) -> np.ndarray:
        return np.full(len(self.columns), np.nan, np.float32)

    def report(self, k: int) -> dict:
        """Token-level condition k's values and whether it fired, per generated token:
        decided as the graph decides (layers.conditions_met, float32; NaN: not met)."""
        values = np.array([v[k] for v in self.values], dtype=np.float32)
        par = torch.from_numpy(self.params[k]).expand(len(values), -1)
        fired = conditions_met(torch.from_numpy(values), par).tolist()
        known = [f for f, v in zip(fired, values, strict=True) if not np.isnan(v)]
        return {
            "values": [None if np.isnan(v) else float(v) for v in values],
            "fired": fired,
            "fired_rate": sum(known) / len(known) if known else None,
        }


class TokenConditionBook:
    def __init__(self, tok_cval: torch.Tensor):
        self.tok_cval = tok_cval
        self.live: dict[str, TokenConditionState] = {}
        self.plan: list[TokenRun[TokenConditionState]] = []

    def register(self, req_id: str, conds: Conditions, prompt_len: int) -> None:
        columns = np.flatnonzero(conds.per_token)
        if columns.size:
            params = conds.params[columns].astype(np.float32)
            self.live[req_id] = TokenConditionState(prompt_len, columns, params)

    def plan_step(self, req_ids: list[str], req_indices: np.ndarray, positions: np.ndarray) -> None:
        self.plan = token_runs(req_ids, req_indices, positions, self.live)

    def collect(self) -> None:
        """One gather and one host copy for this step's sampled rows of these requests."""
        sampled = [
            (p, p.first_pos + p.count - p.state.prompt_len)
            for p in self.plan
            if p.first_pos + p.count >= p.state.prompt_len
        ]
        self.plan = []
        if not sampled:
            return
        rows = torch.tensor([p.start + p.count - 1 for p, _ in sampled], dtype=torch.int64)
        values = self.tok_cval.index_select(0, rows.to(self.tok_cval.device)).cpu().numpy()
        for (p, g), row in zip(sampled, values, strict=True):
            s = p.state
            put_token(s.values, g, row[s.columns].copy(), s.not_computed)

    def get(self, req_id: str) -> TokenConditionState | None:
        return self.live.get(req_id)

    def release(self, req_id: str) -> None:
        self.live.pop(req_id, None)
