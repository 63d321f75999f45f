"""Layer-fused and layer-contrastive decoding, applied to the logits of the sampled rows.

Runs at vLLM's sampler step, outside the compiled forward: the decoder layers have copied
each batch row's sampled row of the residual stream into `tables.capture` (and, for every
layer but the last, the stream before the MLP into `tables.capture_mid`, which the IKS of
"auto" fuse and lfd read). Here the rows that
asked for it get their intermediate logits, lm_head(final_norm(h_L)), computed in one batch,
and their final logits replaced by the fused or contrasted scores. Rows without `decoding`
are not touched; the sampler (temperature, top-p, penalties, logprobs) then runs unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from steering.compile import Decoding

# Contrast scores at most this many floats at once ([rows, candidates, vocab]): DoLa's
# buckets can hold 20 layers, and vocabularies 150k tokens.
CONTRAST_CHUNK = 1 << 25


@dataclass
class DecodingState:
    """One request's decoding settings and what was chosen for it so far."""

    spec: Decoding
    fuse_layer: int | None = None  # fixed, or chosen by IKS at the last prompt row ("auto")
    iks: dict[int, float] | None = None  # auto: IKS of every candidate layer
    contrast_layers: list[int] = field(default_factory=list)  # M per generated token

    def __post_init__(self) -> None:
        if self.spec.mode == "fuse" and not self.spec.auto:
            self.fuse_layer = self.spec.candidates[0]

    def report(self) -> dict:
        if self.spec.mode == "fuse":
            return {"mode": "fuse", "layer": self.fuse_layer, "iks": self.iks}
        # contrast: the premature layer M of each token; lfd: the fused layer of each token
        return {"mode": self.spec.mode, "layers": list(self.contrast_layers)}


@dataclass
class PlannedRow:
    row: int  # batch row = index into the step's sampled logits
    state: DecodingState
    rel: int  # position of the sampled row - prompt length (-1: the last prompt row)


def lfd_js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """LFD's code's "JS": 0.5 (KL(M||P) + KL(M||Q)), M = (P+Q)/2, averaged over the vocabulary
    (torch.nn.functional.kl_div(log P, M) is KL(M||P)); not the textbook JSD."""
    m = 0.5 * (logp.exp() + logq.exp())
    logm = torch.log(m)

    def kl_m(logx: torch.Tensor) -> torch.Tensor:
        return torch.where(m > 0, m * (logm - logx), torch.zeros_like(m)).mean(-1)

    return 0.5 * (kl_m(logp) + kl_m(logq))


def jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (natural log) along the last dim, from log-probabilities."""
    p, q = logp.exp(), logq.exp()
    logm = torch.log(0.5 * (p + q))

    def kl(x: torch.Tensor, logx: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x * (logx - logm), torch.zeros_like(x)).sum(-1)

    return 0.5 * (kl(p, logp) + kl(q, logq))


def contrast_scores(
    final_logits: torch.Tensor, early_logits: torch.Tensor, log_alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoLa's scoring of R rows against C candidate layers, as one computation.

    final_logits [R, V], early_logits [R, C, V] (any float dtype), log_alpha [R, 1]
    (log of each row's plausibility alpha; -inf for alpha = 0). Per row: the candidate M of
    largest JSD(q_F, q_M) and the scores log q_F - log q_M where q_F >= alpha * max q_F,
    -inf elsewhere. Written as one expression so that torch.compile fuses the softmaxes,
    the divergences and the mask into a few passes over [R, C, V] (`scorer`); it is also
    what the eager path runs.
    """
    final = torch.log_softmax(final_logits.float(), dim=-1)
    early = torch.log_softmax(early_logits.float(), dim=-1)
    p = final.exp().unsqueeze(1)
    q = early.exp()
    logm = torch.log(0.5 * (p + q))
    zero = torch.zeros_like(logm)
    kl_p = torch.where(p > 0, p * (final.unsqueeze(1) - logm), zero).sum(-1)
    kl_q = torch.where(q > 0, q * (early - logm), zero).sum(-1)
    chosen = torch.argmax(0.5 * (kl_p + kl_q), dim=-1)  # [R]; ties: the first candidate
    at = chosen.view(-1, 1, 1).expand(-1, 1, early.shape[-1])
    premature = torch.gather(early, 1, at).squeeze(1)
    plausible = final >= final.amax(-1, keepdim=True) + log_alpha
    return torch.where(plausible, final - premature, torch.full_like(final, -torch.inf)), chosen


_compiled_scores = None


def scorer(compiled: bool):
    """`contrast_scores`, torch.compile'd (one graph for every R, C and V) when the engine
    is compiled, as is (enforce_eager) otherwise."""
    global _compiled_scores
    if not compiled:
        return contrast_scores
    if _compiled_scores is None:
        _compiled_scores = torch.compile(contrast_scores, dynamic=True)
    return _compiled_scores


def warm_up(compiled: bool, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Compile the scorer at engine start, not in the first contrastive request's step."""
    if not compiled:
        return
    final = torch.zeros(2, vocab_size, dtype=dtype, device=device)
    early = torch.zeros(2, 2, vocab_size, dtype=dtype, device=device)
    scorer(True)(final, early, torch.zeros(2, 1, device=device))


class LayerLogits:
    """lm_head(final_norm(.)) (or lm_head alone, norm=False) of captured (layer, row) pairs,
    one batched call per use."""

    def __init__(self, model, tables):
        self.model, self.tables = model, tables
        self.norm = model.model.norm

    def __call__(
        self, pairs: list[tuple[int, int]], mid: bool = False, norm: bool = True
    ) -> torch.Tensor:
        return self.grid([p[0] for p in pairs], [p[1] for p in pairs], mid, norm).float()

    def grid(
        self, layers: list[int], rows: list[int], mid: bool = False, norm: bool = True
    ) -> torch.Tensor:
        """Logits of (layers[i], rows[i]) in the model's dtype, [len(rows), V]; `layers`
        and `rows` may also be [R, C] nested lists, giving [R, C, V]."""
        buffer = self.tables.capture_mid if mid else self.tables.capture
        device = buffer.device
        states = buffer[torch.tensor(layers, device=device), torch.tensor(rows, device=device)]
        flat = states.reshape(-1, states.shape[-1])
        out = self.model.compute_logits(self.norm(flat) if norm else flat)
        return out.reshape(*states.shape[:-1], out.shape[-1])


def apply(
    model, tables, logits: torch.Tensor, plan: list[PlannedRow], compiled: bool = False
) -> torch.Tensor:
    """`logits` with the planned rows replaced by fused / contrasted scores (in place).

    `plan` holds only rows whose sample vLLM keeps (hooks._hook_sample drops the rows of
    unfinished prefill chunks, recomputed ones after preemption included)."""
    if not plan:
        return logits
    layer_logits = LayerLogits(model, tables)
    for p in plan:
        s = p.state
        if s.spec.mode == "fuse" and s.fuse_layer is None:
            _choose_by_iks(layer_logits, p)
    todo = [p for p in plan if p.state.spec.mode != "fuse" or p.state.fuse_layer is not None]
    if not todo:
        return logits
    pairs = sorted(
        {(layer, p.row) for p in todo if p.state.spec.mode != "contrast" for layer in _layers(p)}
    )
    z = layer_logits(pairs) if pairs else None
    index = {pair: i for i, pair in enumerate(pairs)}
    # The step's logits are not read again after sampling: rewrite the planned rows in place.
    fuse = [p for p in todo if p.state.spec.mode == "fuse"]
    if fuse:
        device = logits.device
        rows = torch.tensor([p.row for p in fuse], device=device)
        early = z[torch.tensor([index[(p.state.fuse_layer, p.row)] for p in fuse], device=device)]
        w = torch.tensor([p.state.spec.weight for p in fuse], device=device).unsqueeze(1)
        final = torch.log_softmax(logits[rows].float(), dim=-1)
        fused = (1.0 - w) * final + w * torch.log_softmax(early, dim=-1)
        logits[rows] = fused.to(logits.dtype)
    # Contrast rows with the same candidates are scored together: one fused computation
    # and one host read (the chosen layers) per group, not per row.
    groups: dict[tuple, list[PlannedRow]] = {}
    for p in todo:
        if p.state.spec.mode == "contrast":
            groups.setdefault(tuple(p.state.spec.candidates), []).append(p)
    score = scorer(compiled)
    for cands, rows in groups.items():
        step = max(1, CONTRAST_CHUNK // (len(cands) * logits.shape[-1]))
        for i in range(0, len(rows), step):
            _contrast(logits, rows[i : i + step], list(cands), layer_logits, score)
    for p in todo:
        if p.state.spec.mode == "lfd":
            final = torch.log_softmax(logits[p.row].float(), dim=-1)
            logits[p.row] = _lfd(layer_logits, p, final, z, index).to(logits.dtype)
    return logits


def _layers(p: PlannedRow) -> list[int]:
    if p.state.spec.mode == "fuse":
        return [p.state.fuse_layer]
    return list(p.state.spec.candidates)  # contrast, lfd


def _choose_by_iks(layer_logits: LayerLogits, p: PlannedRow) -> None:
    """IKS_L = JSD(softmax(lm_head(norm(m_L))), softmax(z_L)); the lowest wins (ties: lowest L).

    Chosen once, at the request's last prompt row; a row before that keeps plain logits.
    """
    if p.rel != -1:
        return
    cands = list(p.state.spec.candidates)
    after = layer_logits([(c, p.row) for c in cands])
    before = layer_logits([(c, p.row) for c in cands], mid=True)
    scores = jsd(torch.log_softmax(before, -1), torch.log_softmax(after, -1))
    p.state.iks = {c: float(v) for c, v in zip(cands, scores.tolist(), strict=True)}
    p.state.fuse_layer = cands[int(torch.argmin(scores))]


def _plausible(final: torch.Tensor, alpha: float, scores: torch.Tensor) -> torch.Tensor:
    """`scores` where q_F(x) >= alpha * max q_F (DoLa's adaptive plausibility), -inf elsewhere
    (along the last dim; `final` may hold several rows)."""
    threshold = final.amax(-1, keepdim=True) + (math.log(alpha) if alpha > 0 else -math.inf)
    return torch.where(final >= threshold, scores, torch.full_like(final, -torch.inf))


def _contrast(
    logits: torch.Tensor, rows: list[PlannedRow], cands: list[int], layer_logits: LayerLogits, score
) -> None:
    """DoLa for `rows` (same candidates): per row, the candidate M of largest JSD(q_F, q_M),
    and scores log q_F - log q_M on the plausible set."""
    device = logits.device
    # One compiled graph serves every size but 1, which torch.compile specialises: a lone
    # row or candidate is scored twice over (the duplicate's result is dropped; argmax ties
    # keep the first), so no request recompiles the scorer mid-serving.
    rows_in = [p.row for p in rows]
    padded = rows_in if len(rows_in) > 1 else rows_in * 2
    layers = cands if len(cands) > 1 else cands * 2
    early = layer_logits.grid([layers] * len(padded), [[r] * len(layers) for r in padded])
    at = torch.tensor(padded, device=device)
    log_alpha = torch.tensor(
        [[math.log(p.state.spec.alpha) if p.state.spec.alpha > 0 else -math.inf] for p in rows],
        device=device,
    )
    if len(rows_in) == 1:
        log_alpha = log_alpha.expand(2, 1)
    scores, chosen = score(logits[at], early, log_alpha)
    n = len(rows_in)
    logits[at[:n]] = scores[:n].to(logits.dtype)
    for p, m in zip(rows, chosen[:n].tolist(), strict=True):
        p.state.contrast_layers.append(layers[m])


def _lfd(layer_logits: LayerLogits, p: PlannedRow, final, z, index) -> torch.Tensor:
    """LFD's code: per token, the lowest-IKS candidate's un-normed logits, added to q_F's."""
    cands = list(p.state.spec.candidates)
    after = torch.log_softmax(z[[index[(c, p.row)] for c in cands]], dim=-1)
    before = torch.log_softmax(layer_logits([(c, p.row) for c in cands], mid=True), dim=-1)
    layer = cands[int(torch.argmin(lfd_js(after, before)))]
    p.state.contrast_layers.append(layer)
    raw = torch.log_softmax(layer_logits([(layer, p.row)], norm=False)[0], dim=-1)
    return _plausible(final, p.state.spec.alpha, final + raw)
