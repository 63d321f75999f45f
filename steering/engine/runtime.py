"""Worker-side state of one model runner: requests -> specs -> slots -> per-token buffers.

Called from the runner hooks (`hooks.py`) once per step, after vLLM's own `_prepare_inputs`
has laid out the batch. All per-token work is vectorised numpy over the step's tokens; the
only Python loop is over the batch rows (dictionary lookups), as in vLLM's own input batch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from steering.compile import (
    DYN_RMS,
    NUM_CLASSES,
    PAYLOAD_KEY,
    CompiledSpec,
    Decoding,
    dynamic_coef,
    read_payload,
    token_class,
)
from steering.engine.capture import REQUEST_KEY as CAPTURE_KEY
from steering.engine.capture import CaptureBook
from steering.engine.decoding import DecodingState, PlannedRow
from steering.engine.readout import ReadoutBook
from steering.engine.request_ids import choice_index
from steering.engine.tables import IDENTITY_SLOT, SlotBank, SteeringTables
from steering.engine.token_conditions import TokenConditionBook
from steering.engine.topk import TopKEncoder

log = logging.getLogger(__name__)

_UNSEEN = object()
# Decoding reports (chosen layers) kept for finished requests, for the API to fetch.
MAX_REPORTS = 4096


class SteeringRuntime:
    def __init__(self, tables: SteeringTables, max_rows: int, topk: TopKEncoder | None = None):
        self.tables = tables
        self.bank = SlotBank(tables)
        self.req_spec: dict[str, CompiledSpec | None] = {}
        self.refcount: dict[str, int] = {}
        self.specs: dict[str, CompiledSpec] = {}
        self.row_slot = np.zeros(max_rows, dtype=np.int64)
        # Conditions: each request with any holds an accumulator row while it lives
        # (kept through preemption); `summed[row]` is how many prompt positions it holds.
        scratch = tables.scratch_row
        self.row_req = np.full(max_rows, scratch, dtype=np.int64)
        self.req_row: dict[str, int] = {}
        self.free_rows = list(range(scratch - 1, -1, -1))
        self.summed = np.zeros(scratch + 1, dtype=np.int64)
        self.prompt_len: dict[str, int] = {}
        self.finished_conditions: OrderedDict[str, list[dict]] = OrderedDict()
        # Prompt rows of conditional requests seen again (recomputed after preemption).
        self.recomputed_condition_rows = 0
        # The previous step's request ids (prepare_step); row_slot still holds their slots.
        self._prev_req_ids: list[str] | None = None
        self.step = 0
        self._dirty = 0  # tokens [0, _dirty) may hold non-identity slots from an earlier step
        self.req_decoding: dict[str, DecodingState] = {}
        self.finished_reports: OrderedDict[str, dict] = OrderedDict()
        self.plan: list[PlannedRow] = []  # this step's rows with layer-reading decoding
        self.compiled_decoding = False  # contrastive scoring through torch.compile
        self.captures = CaptureBook(tables.stream_all) if tables.stream_all is not None else None
        self.readouts: ReadoutBook | None = None
        if tables.read_out is not None or topk is not None:
            self.readouts = ReadoutBook(tables.read_out, tables.topk_stream, topk)
        self.token_conditions: TokenConditionBook | None = None
        if tables.max_conditions:
            self.token_conditions = TokenConditionBook(tables.tok_cval)

    # --- request lifecycle -------------------------------------------------------------

    def _register(self, req_id: str, request: Any) -> CompiledSpec | None:
        sampling_params = getattr(request, "sampling_params", None)
        extra = getattr(sampling_params, "extra_args", None) or {}
        if self.captures is not None and CAPTURE_KEY in extra:
            self.captures.register(req_id, extra[CAPTURE_KEY], request.num_prompt_tokens)
        payload = extra.get(PAYLOAD_KEY)
        if payload is not None:
            try:
                payload = read_payload(payload)
            except Exception:  # admitted by the engine core (capacity.admit): a bug
                log.exception(
                    "steerserve: request %s: unreadable payload, unsteered (the "
                    "engine core admitted it: please report)",
                    req_id,
                )
                payload = None
        spec = None
        if payload is not None and payload.get("decoding") and self.tables.capture is not None:
            self.req_decoding[req_id] = DecodingState(Decoding.from_payload(payload["decoding"]))
        if payload is not None:
            key = payload.get("key", payload["fp"])
            spec = self.specs.get(key)
            if spec is None:
                try:
                    spec = CompiledSpec.from_payload(payload)
                except Exception:  # admitted by the engine core (capacity.admit): a bug
                    log.exception(
                        "steerserve: request %s: bad compiled payload, unsteered "
                        "(the engine core admitted it: please report)",
                        req_id,
                    )
                    spec = None
                else:
                    problem = self.tables.misfit(spec)
                    if problem:  # likewise; never take the engine down over one request
                        log.error(
                            "steerserve: request %s: %s; it runs unsteered (the engine "
                            "core admitted it: please report)",
                            req_id,
                            problem,
                        )
                        spec = None
                    else:
                        self.specs[key] = spec
            if spec is not None and spec.is_identity:
                spec = None
        if spec is not None and spec.conditions.count and self.tables.max_conditions:
            if self.free_rows:
                row = self.free_rows.pop()
                self.tables.clear_condition_row(row)
                self.summed[row] = 0
                self.req_row[req_id] = row
                self.prompt_len[req_id] = request.num_prompt_tokens
                assert self.token_conditions is not None
                self.token_conditions.register(req_id, spec.conditions, request.num_prompt_tokens)
            else:  # more live (preempted) requests than rows: gates stay closed, said so
                log.error(
                    "steerserve: request %s: no condition accumulator row free (%d live "
                    "requests with conditions); its conditions are never met",
                    req_id,
                    len(self.req_row),
                )
                self.finished_conditions[req_id] = [
                    {"name": name, "value": None, "fired": False, "decided": False}
                    for name in spec.conditions.names
                ]
        if spec is not None:
            self.refcount[spec.key] = self.refcount.get(spec.key, 0) + 1
            if spec.readout and self.readouts is not None:
                self.readouts.register(req_id, spec, request.num_prompt_tokens)
        self.req_spec[req_id] = spec
        return spec

    def report(self, req_id: str) -> dict | None:
        """What layer-reading decoding chose for a request (live or recently finished)."""
        state = self.req_decoding.get(req_id)
        return state.report() if state is not None else self.finished_reports.get(req_id)

    def condition_report(self, req_id: str) -> list[dict] | None:
        """Each condition's value and whether it fired (live or recently finished)."""
        row = self.req_row.get(req_id)
        if row is None:
            return self.finished_conditions.get(req_id)
        spec = self.req_spec[req_id]
        assert spec is not None
        from steering.engine.layers import condition_values, conditions_met

        conds = spec.conditions
        acc = self.tables.cond_acc[row, : conds.count].cpu()
        par = torch.from_numpy(conds.params.astype(np.float32))
        values = condition_values(acc, torch.from_numpy(conds.vecs), par)
        met = conditions_met(values, par)
        decided = bool(self.summed[row] >= self.prompt_len[req_id])
        assert self.token_conditions is not None
        tokens = self.token_conditions.get(req_id)
        out: list[dict] = []
        for i, (name, v, m) in enumerate(
            zip(conds.names, values.tolist(), met.tolist(), strict=True)
        ):
            if conds.per_token[i]:
                assert tokens is not None
                k = int(np.searchsorted(tokens.columns, i))
                out.append({"name": name, "reduce": "token", **tokens.report(k)})
                continue
            out.append(
                {
                    "name": name,
                    "value": float(v) if decided else None,
                    "fired": bool(m) and decided,
                    "decided": decided,
                }
            )
        return out

    def conditions_for(self, request_id: str) -> dict[int, list[dict]]:
        """Condition reports of every choice of API request `request_id`, by choice index."""
        out: dict[int, list[dict]] = {}
        for rid in (*self.req_row, *self.finished_conditions):
            index = choice_index(rid, request_id)
            if index is not None:
                report = self.condition_report(rid)
                if report is not None:
                    out[index] = report
        return out

    def reports_for(self, request_id: str) -> dict[int, dict]:
        """Decoding reports of every choice of API request `request_id`, by choice index."""
        out: dict[int, dict] = {}
        for rid in (*self.req_decoding, *self.finished_reports):
            index = choice_index(rid, request_id)
            if index is not None:
                report = self.report(rid)
                if report is not None:
                    out[index] = report
        return out

    def stats(self) -> dict[str, int]:
        return {
            "live_slots": self.live_slots,
            "slots": self.tables.num_slots - 1,  # slot 0 is the identity
            "recomputed_condition_rows": self.recomputed_condition_rows,
        }

    def release(self, req_id: str) -> None:
        self._prev_req_ids = None
        if self.captures is not None:
            self.captures.release(req_id)
        if self.readouts is not None:
            self.readouts.release(req_id)
        state = self.req_decoding.pop(req_id, None)
        if state is not None:
            self.finished_reports[req_id] = state.report()
            while len(self.finished_reports) > MAX_REPORTS:
                self.finished_reports.popitem(last=False)
        if req_id in self.req_row:
            report = self.condition_report(req_id)
            assert report is not None
            self.finished_conditions[req_id] = report
            while len(self.finished_conditions) > MAX_REPORTS:
                self.finished_conditions.popitem(last=False)
            row = self.req_row.pop(req_id)
            self.prompt_len.pop(req_id, None)
            self.free_rows.append(row)
            assert self.token_conditions is not None
            self.token_conditions.release(req_id)
        spec = self.req_spec.pop(req_id, None)
        if spec is None:
            return
        key = spec.key
        left = self.refcount[key] - 1
        if left:
            self.refcount[key] = left
        else:
            del self.refcount[key]
            del self.specs[key]
            self.bank.release(key)

    # --- per step ----------------------------------------------------------------------

    def prepare_step(
        self,
        req_ids: list[str],
        requests: dict[str, Any],
        req_indices: np.ndarray,
        positions: np.ndarray,
        prompt_lens: np.ndarray,
    ) -> None:
        """Fill tok_slot/tok_const/tok_gain for this step's tokens.

        req_indices[t] is the batch row of token t, positions[t] its position, and
        prompt_lens[r] the prompt length of row r.
        """
        self.step += 1
        n = len(req_ids)
        row_slot = self.row_slot[:n]
        row_req = self.row_req[:n]
        if req_ids == self._prev_req_ids:
            # The same rows as last step (most decode steps): their slots are still loaded
            # (slots only change in acquire), so mark them used without the per-row walk.
            steered = bool((row_slot != IDENTITY_SLOT).any())
            if steered:
                self.bank.touch(row_slot, self.step)
        else:
            steered = False
            t_scratch = self.tables.scratch_row
            for i, rid in enumerate(req_ids):
                spec = self.req_spec.get(rid, _UNSEEN)
                if spec is _UNSEEN:
                    spec = self._register(rid, requests.get(rid))
                if spec is None:
                    row_slot[i] = IDENTITY_SLOT
                else:
                    row_slot[i] = self.bank.acquire(spec, self.step)
                    steered = True
                row_req[i] = self.req_row.get(rid, t_scratch)
            self._prev_req_ids = list(req_ids)

        t = self.tables
        written = 0
        if steered:
            written = len(req_indices)
            slot = row_slot[req_indices]
            rel = positions - prompt_lens[req_indices]
            t.np_slot[:written] = slot
            t.np_const[:written] = slot * NUM_CLASSES + token_class(rel)
            if t.max_dynamic:
                params = self.bank.dyn[slot]
                t.np_dyn[:written] = dynamic_coef(params, rel)
                t.np_dyn_rms[:written] = params[..., DYN_RMS] > 0
            if t.max_conditions:
                self._plan_conditions(
                    slot, row_req[req_indices], positions, rel, prompt_lens[req_indices]
                )
            rel = rel[:, None]
            gate = (rel >= self.bank.lo[slot]) & (rel < self.bank.hi[slot])
            np.multiply(self.bank.gain[slot], gate, out=t.np_gain[:written])
        # Rows on slot 0 read zero directions and a zero constant; their gains are
        # irrelevant, so only slot indices left over from an earlier step need resetting.
        if self._dirty > written:
            t.reset_tokens(written, self._dirty)
        if max(written, self._dirty):
            t.publish(max(written, self._dirty))
        self._dirty = written
        if t.capture is not None:
            self._plan_sampled_rows(req_ids, req_indices, positions, prompt_lens)
        if self.captures is not None:
            self.captures.plan_step(req_ids, req_indices, positions)
        if self.readouts is not None:
            self.readouts.plan_step(req_ids, req_indices, positions)
        if self.token_conditions is not None:
            self.token_conditions.plan_step(req_ids, req_indices, positions)

    def _plan_conditions(
        self,
        slot: np.ndarray,
        req: np.ndarray,
        positions: np.ndarray,
        rel: np.ndarray,
        prompt_len: np.ndarray,
    ) -> None:
        """Each token's accumulator row, layer and weight: 1/P for every prompt row
        (prompt_mean), 1 for the last one (last_prompt), 0 for a position already summed
        (a prompt re-computed after preemption), for every other token and for token-level
        conditions (whose layer the graph reads from tok_clayer all the same)."""
        t = self.tables
        written = len(slot)
        layer = self.bank.cond_layer[slot]  # [T, C]
        fresh = (rel < 0) & (positions >= self.summed[req])
        own = req != t.scratch_row
        self.recomputed_condition_rows += int(np.count_nonzero(own & (rel < 0) & ~fresh))
        mean = np.where(fresh, 1.0 / prompt_len, 0.0)[:, None]
        last = (fresh & (rel == -1)).astype(np.float64)[:, None]
        reduce = self.bank.cond_reduce[slot]
        # Token-level conditions (reduce 2) sum nothing: they read each row in the graph.
        w = np.where(reduce == 0, mean, np.where(reduce == 1, last, 0.0)) * (layer >= 0)
        t.np_req[:written] = req
        t.np_cw[:written] = w
        t.np_clayer[:written] = layer
        np.maximum.at(self.summed, req, np.where(rel < 0, positions + 1, 0))

    def _plan_sampled_rows(self, req_ids, req_indices, positions, prompt_lens) -> None:
        """Point the capture at each row's sampled (last scheduled) token; plan decoding.

        Filled every step, whether or not any request uses decoding: the layers gather
        these indices unconditionally, so stale ones must never outlive their step.
        """
        n = len(req_ids)
        last = np.cumsum(np.bincount(req_indices, minlength=n)) - 1
        t = self.tables
        t.np_sample[:] = 0
        t.np_sample[:n] = last
        t.publish_samples()
        self.plan = []
        if self.req_decoding:
            rel = positions[last] - prompt_lens[:n]
            for i, rid in enumerate(req_ids):
                state = self.req_decoding.get(rid)
                if state is not None:
                    self.plan.append(PlannedRow(i, state, int(rel[i])))

    @property
    def live_slots(self) -> int:
        return self.bank.live_slots()
