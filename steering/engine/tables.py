"""Persistent steering buffers and the slot bank that fills them.

Modelled on vLLM's LoRA/punica path: per-spec data lives in fixed slots of tables allocated
once at their maximum size; each step writes only small per-token index/coefficient
buffers in place. The forward pass therefore has one shape-stable set of tensor ops (no
Python branch on per-step state, no host sync), which is what torch.compile's single trace
and CUDA-graph replay require. Slot 0 is the identity (zero directions and constants, unit
head scales), so unsteered rows run the same ops and come out bit-identical.
"""

from __future__ import annotations

import numpy as np
import torch

from steering.compile import (
    NUM_CLASSES,
    NUM_COEFS,
    NUM_COND_PARAMS,
    NUM_DYN_PARAMS,
    CompiledSpec,
)
from steering.engine.capacity import Capacity

IDENTITY_SLOT = 0


def local_heads(num_heads: int, tp_rank: int, tp_size: int) -> range:
    """The query heads a tensor-parallel rank holds: vLLM shards them in contiguous blocks
    (QKVParallelLinear's output, RowParallelLinear's input)."""
    if num_heads % tp_size:
        raise ValueError(f"{num_heads} query heads do not split over {tp_size} TP ranks")
    per_rank = num_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


_EMPTY = -2  # last_used value of a slot that holds nothing
_WARM = -1  # a slot whose spec no live request uses: first to be recycled, reusable if seen again


class SteeringTables:
    """Device tensors read inside the forward pass (never re-bound, only updated in place).

    units    [layers, slots, max_proj, hidden]       projection directions (model dtype)
    const    [layers, slots * combos * NUM_CLASSES, hidden]  folded constant per slot,
                                                     folded gate (closed, open) and token
                                                     class (combos 2 with conditions, else 1)
    tok_slot [max_tokens]                            slot of each scheduled token (int64)
    tok_const[max_tokens]                            slot * NUM_CLASSES + class (int64)
    tok_crow [max_tokens]                            (slot * 2 + open) * NUM_CLASSES + class:
                                                     each token's row of const and feat_coef
                                                     (in-graph; tok_const itself when
                                                     combos is 1)
    tok_gain [max_tokens, max_proj]                  projection gains, 0 outside the op's
                                                     position window (float32)
    head_scale [layers, slots * NUM_CLASSES, H_local]        per-head factor (1 = identity)
    head_const [layers, slots * NUM_CLASSES, H_local * D]    per-head constant (o_proj input)
    query_scale [layers, slots * NUM_CLASSES, H_local]       per-head query factor (1 = identity)
    expert_bias [layers, slots * NUM_CLASSES, experts]       router-logit bias (0 = identity),
                                                             MoE models only (float32)
    feat_enc, feat_dec [layers, slots, max_features, hidden] SAE feature ops' encoder rows and
                                                             decoder rows (model dtype)
    feat_coef [layers, slots * combos * NUM_CLASSES, max_features, 4] their (offset,
                                                             threshold, alpha, beta); zeros
                                                             = no op (float32)
    dyn_dirs [layers, slots * NUM_CLASSES, max_dynamic, hidden]  dynamic adds' directions
                                                             (model dtype; compile.DynamicAdds)
    tok_dyn  [max_tokens, max_dynamic]       their per-token coefficients (float32; 0 = none)
    tok_dyn_rms [max_tokens, max_dynamic]    whether each is RMS-relative (bool)
    dyn_truth [slots, max_dynamic, 2**max_conditions]  whether add j acts for each set of
                                             conditions met (1 without `when`; float32)
    gate_open [slots, 2**max_conditions]     whether the folded gate (compile.CompiledSpec
                                             .gate) is open for each set (int64)
    cond_vec [slots, max_conditions, hidden] conditions' directions (float32)
    cond_par [slots, max_conditions, 7]      their kind, offset, thresholds, sign, whether
                                             token-level (float32; compile.Conditions)
    cond_acc [2 * max_rows + 1, max_conditions, hidden]  each request's weighted sum of its
                                             prompt rows at the condition's layer (float32;
                                             the last row, NaN, is read by other tokens)
    tok_req  [max_tokens]                    the accumulator row of each token (int64)
    tok_cw   [max_tokens, max_conditions]    its weight in each sum (0: not summed)
    tok_clayer [max_tokens, max_conditions]  the layer each sum reads (-1: none; int64)
    tok_gate [max_tokens, max_dynamic]       each dynamic add's gate this step (in-graph;
                                             with conditions and dynamic adds both on)
    tok_cval [max_tokens, max_conditions]    each token's condition values this step: its
                                             request's, or its own row's for token-level
                                             ones (NaN until their layer; in-graph)

    sample_idx [max_rows]                    token index of each batch row's sampled row (int64)
    capture    [layers, max_rows, hidden]    residual stream after each layer, sampled rows
    capture_mid[layers, max_rows, hidden]    stream after attention (before the MLP), ditto
    stream_all [layers, max_tokens, hidden]  stream after each layer, every token (capture.py)
    read_units [layers, slots, max_read, hidden]  readout unit vectors (zero where unused)
    read_out   [max_tokens, max_read]         each token's readout projections (float32)
    topk_stream[max_tokens, hidden]           stream after layer `topk_layer`, every token
                                              (top-k readout's SAE reads it, topk.py)

    The head tables hold only this rank's heads (`heads`, a range of query heads) and are
    absent (None) when the engine runs without head interventions; the capture buffers are
    absent without layer-reading decoding, `stream_all` without capture.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        hidden_size: int,
        num_slots: int,
        max_proj: int,
        max_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
        heads: range | None = None,
        head_dim: int = 0,
        capture: bool = False,
        stream_all: bool = False,
        max_read: int = 0,
        num_experts: int = 0,
        max_features: int = 0,
        feature_layers: tuple[int, ...] | None = None,
        topk_layer: int | None = None,
        max_topk: int = 0,
        max_dynamic: int = 0,
        max_conditions: int = 0,
        condition_layers: tuple[int, ...] | None = None,
        max_rows: int = 0,
    ):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_slots = num_slots
        self.max_proj = max_proj
        self.max_tokens = max_tokens
        self.device = device
        self.units = torch.zeros(
            num_layers, num_slots, max_proj, hidden_size, dtype=dtype, device=device
        )
        self.max_conditions = max_conditions
        self.combos = 2 if max_conditions else 1
        self.const = torch.zeros(
            num_layers,
            num_slots * self.combos * NUM_CLASSES,
            hidden_size,
            dtype=dtype,
            device=device,
        )
        self.tok_slot = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.tok_const = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        # Without conditions a token's constant row is its tok_const.
        self.tok_crow = (
            torch.zeros(max_tokens, dtype=torch.int64, device=device)
            if max_conditions
            else self.tok_const
        )
        self.tok_gain = torch.zeros(max_tokens, max_proj, dtype=torch.float32, device=device)
        self.heads = heads
        self.head_dim = head_dim
        self.head_scale: torch.Tensor | None = None
        self.head_const: torch.Tensor | None = None
        self.query_scale: torch.Tensor | None = None
        if heads is not None:
            rows = num_slots * NUM_CLASSES
            self.head_scale = torch.ones(num_layers, rows, len(heads), dtype=dtype, device=device)
            self.head_const = torch.zeros(
                num_layers, rows, len(heads) * head_dim, dtype=dtype, device=device
            )
            self.query_scale = torch.ones_like(self.head_scale)
        self.num_experts = num_experts
        self.expert_bias: torch.Tensor | None = None
        if num_experts:
            rows = num_slots * NUM_CLASSES
            self.expert_bias = torch.zeros(
                num_layers, rows, num_experts, dtype=torch.float32, device=device
            )
        self.max_features = max_features
        # Layers whose forward runs the feature ops (a constant of the trace, like `layer`).
        self.feature_layers = frozenset(
            range(num_layers) if feature_layers is None else feature_layers
        )
        # Layers whose forward sums prompt rows into the condition accumulators (likewise).
        self.condition_layers = frozenset(
            range(num_layers) if condition_layers is None else condition_layers
        )
        self.feat_enc: torch.Tensor | None = None
        self.feat_dec: torch.Tensor | None = None
        self.feat_coef: torch.Tensor | None = None
        if max_features:
            shape = (num_layers, num_slots, max_features, hidden_size)
            self.feat_enc = torch.zeros(shape, dtype=dtype, device=device)
            self.feat_dec = torch.zeros(shape, dtype=dtype, device=device)
            self.feat_coef = torch.zeros(
                num_layers,
                num_slots * self.combos * NUM_CLASSES,
                max_features,
                NUM_COEFS,
                dtype=torch.float32,
                device=device,
            )
        self.max_dynamic = max_dynamic
        self.dyn_dirs: torch.Tensor | None = None
        per_token: tuple[torch.Tensor, ...] = ()
        if max_dynamic:
            self.dyn_dirs = torch.zeros(
                num_layers,
                num_slots * NUM_CLASSES,
                max_dynamic,
                hidden_size,
                dtype=dtype,
                device=device,
            )
            self.tok_dyn = torch.zeros(max_tokens, max_dynamic, dtype=torch.float32, device=device)
            self.tok_dyn_rms = torch.zeros(max_tokens, max_dynamic, dtype=torch.bool, device=device)
            per_token = (self.tok_dyn, self.tok_dyn_rms)
        # Accumulator rows: one per live request, preempted ones included (they keep
        # theirs), so twice the running batch; the last row is NaN, read by every token
        # without a row of its own, so that no condition is met from it.
        self.condition_rows = 2 * max_rows
        self.scratch_row = self.condition_rows
        if self.max_conditions:
            c = self.max_conditions
            f32 = dict(dtype=torch.float32, device=device)
            self.dyn_truth = torch.ones(num_slots, max_dynamic, 1 << c, **f32)
            self.gate_open = torch.zeros(num_slots, 1 << c, dtype=torch.int64, device=device)
            self.cond_vec = torch.zeros(num_slots, c, hidden_size, **f32)
            self.cond_par = torch.zeros(num_slots, c, NUM_COND_PARAMS, **f32)
            self.cond_acc = torch.zeros(self.condition_rows + 1, c, hidden_size, **f32)
            self.cond_acc[self.scratch_row] = float("nan")
            self.tok_req = torch.full(
                (max_tokens,), self.scratch_row, dtype=torch.int64, device=device
            )
            self.tok_cw = torch.zeros(max_tokens, c, **f32)
            self.tok_clayer = torch.full((max_tokens, c), -1, dtype=torch.int64, device=device)
            self.tok_gate = torch.ones(max_tokens, max_dynamic, **f32)  # unused if 0 wide
            self.tok_cval = torch.zeros(max_tokens, c, **f32)
            per_token += (self.tok_req, self.tok_cw, self.tok_clayer)
        self.sample_idx: torch.Tensor | None = None
        self.capture: torch.Tensor | None = None
        self.capture_mid: torch.Tensor | None = None
        if capture:
            rows = num_slots - 1
            self.sample_idx = torch.zeros(rows, dtype=torch.int64, device=device)
            shape = (num_layers, rows, hidden_size)
            self.capture = torch.zeros(shape, dtype=dtype, device=device)
            self.capture_mid = torch.zeros(shape, dtype=dtype, device=device)
            self._sample_host = self._staging(self.sample_idx)
            self.np_sample = self._sample_host.numpy()
        self.max_read = max_read
        self.first_layer = 0  # of this rank (set by layers.install)
        self.read_units: torch.Tensor | None = None
        self.read_out: torch.Tensor | None = None
        if max_read:
            self.read_units = torch.zeros(
                num_layers, num_slots, max_read, hidden_size, dtype=dtype, device=device
            )
            self.read_out = torch.zeros(max_tokens, max_read, dtype=torch.float32, device=device)
        self.stream_all: torch.Tensor | None = None
        if stream_all:
            self.stream_all = torch.zeros(
                num_layers, max_tokens, hidden_size, dtype=dtype, device=device
            )
        # Top-k readout: one layer's stream, every token (a constant of the trace like `layer`).
        self.topk_layer = topk_layer
        self.max_topk = max_topk if topk_layer is not None else 0
        self.topk_stream: torch.Tensor | None = None
        if topk_layer is not None:
            self.topk_stream = torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
        # Whether the layers form the stream (hidden + residual) for any buffer above.
        self.reads_stream = bool(self.max_conditions) or any(
            t is not None
            for t in (self.capture, self.stream_all, self.read_units, self.topk_stream)
        )
        # Host staging: the same memory on CPU, pinned buffers copied asynchronously on GPU.
        self._per_token = (self.tok_slot, self.tok_const, self.tok_gain, *per_token)
        self._staged = tuple(self._staging(t) for t in self._per_token)
        host = iter(t.numpy() for t in self._staged)
        self.np_slot, self.np_const, self.np_gain = next(host), next(host), next(host)
        if max_dynamic:
            self.np_dyn, self.np_dyn_rms = next(host), next(host)
        if self.max_conditions:
            self.np_req, self.np_cw, self.np_clayer = next(host), next(host), next(host)

    @staticmethod
    def _staging(t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t
        host = torch.zeros_like(t, device="cpu")
        return host.pin_memory() if torch.cuda.is_available() else host

    @property
    def nbytes(self) -> int:
        heads = (self.head_scale, self.head_const, self.query_scale)
        capture = (
            self.sample_idx,
            self.capture,
            self.capture_mid,
            self.stream_all,
            self.read_units,
            self.read_out,
            self.topk_stream,
        )
        features = (self.feat_enc, self.feat_dec, self.feat_coef, self.dyn_dirs)
        if self.max_conditions:
            features += (self.dyn_truth, self.gate_open, self.cond_vec, self.cond_par)
            features += (self.cond_acc,)
            features += (self.tok_gate, self.tok_cval, self.tok_crow)
        tensors = (
            self.units,
            self.const,
            *heads,
            self.expert_bias,
            *features,
            *capture,
            *self._per_token,
        )
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def publish(self, num_tokens: int) -> None:
        """Make host-staged per-token values visible to the device (no-op on CPU)."""
        for dev, host in zip(self._per_token, self._staged, strict=True):
            if dev is not host:
                dev[:num_tokens].copy_(host[:num_tokens], non_blocking=True)

    def publish_samples(self) -> None:
        assert self.sample_idx is not None
        if self._sample_host is not self.sample_idx:
            self.sample_idx.copy_(self._sample_host, non_blocking=True)

    def reset_tokens(self, start: int, stop: int) -> None:
        """Point tokens [start, stop) back at the identity slot (host side; then publish)."""
        self.np_slot[start:stop] = IDENTITY_SLOT
        self.np_const[start:stop] = IDENTITY_SLOT
        if self.max_conditions:  # a stale weight would sum another token into a request
            self.np_cw[start:stop] = 0.0
            self.np_req[start:stop] = self.scratch_row

    def write_slot(self, slot: int, spec: CompiledSpec) -> None:
        problem = self.misfit(spec)
        if problem:
            raise ValueError(f"compiled spec does not fit the steering tables: {problem}")
        self.units[:, slot].zero_()
        rows = slice(slot * NUM_CLASSES, (slot + 1) * NUM_CLASSES)
        n = self.combos * NUM_CLASSES
        crows = slice(slot * n, (slot + 1) * n)
        # A spec without a folded gate has one constant: both of the slot's versions.
        spec_rows = np.arange(n) % (spec.combos * NUM_CLASSES)
        self.const[:, crows].zero_()
        for k, proj in enumerate(spec.projections):
            layers = torch.from_numpy(proj.layers).to(self.device)
            data = torch.from_numpy(proj.units).to(device=self.device, dtype=self.units.dtype)
            self.units[layers, slot, k] = data
        if spec.const_layers.size:
            layers = torch.from_numpy(spec.const_layers).to(self.device)
            data = np.ascontiguousarray(spec.const[:, spec_rows])
            self.const[layers, crows] = torch.from_numpy(data).to(self.device, self.const.dtype)
        if self.heads is not None:
            self._write_heads(rows, spec)
        if self.expert_bias is not None:
            self.expert_bias[:, rows].zero_()
            ops = spec.experts
            if ops.layers.size:
                layers = torch.from_numpy(ops.layers).to(self.device)
                self.expert_bias[layers, rows] = torch.from_numpy(ops.bias).to(self.device)
        if self.feat_enc is not None:
            self._write_features(slot, crows, spec_rows, spec)
        if self.dyn_dirs is not None:
            self.dyn_dirs[:, rows].zero_()
            ops = spec.dynamic
            if ops.layers.size:
                layers = torch.from_numpy(ops.layers).to(self.device)
                data = torch.from_numpy(ops.dirs).to(self.device, self.dyn_dirs.dtype)
                self.dyn_dirs[layers, rows, : ops.count] = data
        if self.max_conditions:
            self._write_conditions(slot, spec)
        if self.read_units is not None:
            self.read_units[:, slot].zero_()
            for k, r in enumerate(spec.projection_readouts):  # top-k entries: no column
                self.read_units[r.layer, slot, k] = torch.from_numpy(r.unit).to(
                    device=self.device, dtype=self.read_units.dtype
                )

    def misfit(self, spec: CompiledSpec) -> str | None:
        """Why a compiled spec cannot go into these tables (the engine core admitted it
        against the whole model's capacity, so this is this rank's last guard)."""
        return Capacity(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            max_proj=self.max_proj,
            max_read=self.max_read,
            heads=self.heads,
            head_dim=self.head_dim,
            decoding=self.capture is not None,
            num_experts=self.num_experts,
            max_features=self.max_features,
            feature_layers=tuple(sorted(self.feature_layers)),
            max_topk=self.max_topk,
            topk_layer=self.topk_layer,
            max_dynamic=self.max_dynamic,
            max_conditions=self.max_conditions,
            condition_layers=tuple(sorted(self.condition_layers)),
        ).misfit(spec)

    def _write_conditions(self, slot: int, spec: CompiledSpec) -> None:
        conds, dyn = spec.conditions, spec.dynamic
        self.cond_vec[slot].zero_()
        self.cond_par[slot].zero_()  # sign 0: never met
        self.dyn_truth[slot].fill_(1.0)
        self.gate_open[slot].zero_()
        n = conds.count
        if n:
            self.cond_vec[slot, :n] = torch.from_numpy(conds.vecs).to(self.device)
            par = torch.from_numpy(conds.params.astype(np.float32))
            self.cond_par[slot, :n] = par.to(self.device)
        # Conditions past the spec's own are never met: combination m reads m's low bits.
        combos = np.arange(1 << self.max_conditions) & ((1 << n) - 1)
        if dyn.count:
            truth = torch.from_numpy(np.ascontiguousarray(dyn.truth[:, combos]))
            self.dyn_truth[slot, : dyn.count] = truth.to(self.device)
        if spec.gate.size:
            self.gate_open[slot] = torch.from_numpy(spec.gate[combos] > 0).to(self.device)

    def clear_condition_row(self, row: int) -> None:
        """A request's accumulator row, zeroed when the request takes it."""
        self.cond_acc[row].zero_()

    def _write_features(
        self, slot: int, rows: slice, spec_rows: np.ndarray, spec: CompiledSpec
    ) -> None:
        assert self.feat_enc is not None and self.feat_dec is not None
        assert self.feat_coef is not None
        self.feat_enc[:, slot].zero_()
        self.feat_dec[:, slot].zero_()
        self.feat_coef[:, rows].zero_()
        ops = spec.features
        if not ops.layers.size:
            return
        k = ops.per_layer
        layers = torch.from_numpy(ops.layers).to(self.device)
        dtype = self.feat_enc.dtype
        self.feat_enc[layers, slot, :k] = torch.from_numpy(ops.enc).to(self.device, dtype)
        self.feat_dec[layers, slot, :k] = torch.from_numpy(ops.dec).to(self.device, dtype)
        coef = torch.from_numpy(np.ascontiguousarray(ops.coef[:, spec_rows])).to(self.device)
        self.feat_coef[layers, rows, :k] = coef

    def _write_heads(self, rows: slice, spec: CompiledSpec) -> None:
        assert self.head_scale is not None and self.head_const is not None
        assert self.query_scale is not None
        self.head_scale[:, rows].fill_(1.0)
        self.head_const[:, rows].zero_()
        self.query_scale[:, rows].fill_(1.0)
        ops = spec.heads
        if not ops.layers.size:
            return
        lo, hi = self.heads.start, self.heads.stop
        m = len(ops.layers)
        scale = ops.scale[:, :, lo:hi]
        const = ops.const.reshape(m, NUM_CLASSES, ops.num_heads, ops.head_dim)[:, :, lo:hi]
        layers = torch.from_numpy(ops.layers).to(self.device)
        self.head_scale[layers, rows] = torch.from_numpy(np.ascontiguousarray(scale)).to(
            device=self.device, dtype=self.head_scale.dtype
        )
        self.head_const[layers, rows] = torch.from_numpy(
            np.ascontiguousarray(const).reshape(m, NUM_CLASSES, -1)
        ).to(device=self.device, dtype=self.head_const.dtype)
        query = np.ascontiguousarray(ops.query[:, :, lo:hi])
        self.query_scale[layers, rows] = torch.from_numpy(query).to(
            device=self.device, dtype=self.query_scale.dtype
        )


class SlotBank:
    """Maps spec keys (`CompiledSpec.key`) to table slots: LRU over slots not used by the
    current step.

    There is one slot per possible batch row plus the identity, so the rows of any step
    always fit; a spec whose requests all finished stays resident ("warm") until its slot
    is needed, so a popular spec is written to the device once.
    """

    def __init__(self, tables: SteeringTables):
        self.tables = tables
        n, k = tables.num_slots, tables.max_proj
        self.slot_of: dict[str, int] = {}
        self.fp_of: list[str | None] = [None] * n
        self.last_used = np.full(n, _EMPTY, dtype=np.int64)
        self.last_used[IDENTITY_SLOT] = np.iinfo(np.int64).max  # never a victim
        # Host copies of per-slot projection parameters, gathered per token each step.
        self.gain = np.zeros((n, k), dtype=np.float32)
        self.lo = np.zeros((n, k), dtype=np.int64)  # identity/unused: empty window
        self.hi = np.zeros((n, k), dtype=np.int64)
        # Dynamic adds' windows, scales and schedules (all zeros: none), read per token.
        self.dyn = np.zeros((n, tables.max_dynamic, NUM_DYN_PARAMS), dtype=np.float64)
        # Conditions' layers (-1: unused) and reductions, read per token.
        c = tables.max_conditions
        self.cond_layer = np.full((n, c), -1, dtype=np.int64)
        self.cond_reduce = np.zeros((n, c), dtype=np.int64)
        self.loads = 0

    def acquire(self, spec: CompiledSpec, step: int) -> int:
        slot = self.slot_of.get(spec.key)
        if slot is None:
            slot = int(np.argmin(self.last_used))
            if self.last_used[slot] >= step:
                raise RuntimeError("steering slot bank exhausted: more distinct specs than rows")
            self._load(slot, spec)
        self.last_used[slot] = step
        return slot

    def touch(self, row_slots: np.ndarray, step: int) -> None:
        """Mark the slots of these rows used at `step` (rows on the identity slot skipped:
        it is never a victim)."""
        self.last_used[row_slots[row_slots != IDENTITY_SLOT]] = step

    def release(self, key: str) -> None:
        slot = self.slot_of.get(key)
        if slot is not None:
            self.last_used[slot] = _WARM

    def live_slots(self) -> int:
        return int(np.count_nonzero(self.last_used[1:] >= 0))

    def _load(self, slot: int, spec: CompiledSpec) -> None:
        old = self.fp_of[slot]
        if old is not None:
            del self.slot_of[old]
        self.tables.write_slot(slot, spec)
        self.gain[slot] = 0.0
        self.lo[slot] = 0
        self.hi[slot] = 0
        for k, proj in enumerate(spec.projections):
            self.gain[slot, k] = proj.gain
            self.lo[slot, k] = proj.lo
            self.hi[slot, k] = proj.hi
        self.dyn[slot] = 0.0
        self.dyn[slot, : spec.dynamic.count] = spec.dynamic.params
        if self.tables.max_conditions:
            conds = spec.conditions
            self.cond_layer[slot] = -1
            self.cond_layer[slot, : conds.count] = conds.layers
            self.cond_reduce[slot] = 0
            self.cond_reduce[slot, : conds.count] = conds.reduce
        self.fp_of[slot] = spec.key
        self.slot_of[spec.key] = slot
        self.loads += 1
