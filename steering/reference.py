"""The oracle: a spec applied to the HF transformers model with forward hooks, in float32.

Deliberately independent of the engine path (`compile.py`, `engine/`): it applies each
entry as docs/design.md states it, one after the other, with no folding, slot tables or
per-token buffers, and recomputes the whole sequence at every greedy step (no KV cache),
so every row's position class comes straight from its position.

Residual entries act on each decoder layer's output (forward hook); head masks and
site "heads" vectors on the input of each layer's `self_attn.o_proj` (forward pre-hook),
masks first, then head vectors, in spec order. Query masks scale the query where the
attention function receives it (after the model's q norms, rotary and temperature): the
model runs HF's eager attention, and its `eager_attention_forward` is wrapped while a
spec with query masks is active. Layers without `self_attn` (linear attention) have no
heads. Expert masks add log(scale) to the router logits: while the router of a masked layer
runs, `torch.nn.functional.linear` returns its logits plus the mask's bias (every HF router
computes its logits with F.linear on its own weight), then the family's routing goes on.

Decoding (fuse / contrast) is computed from every layer's output, captured by forward
hooks registered after the steering hooks, and from the stream before each layer's MLP
(the input of `pre_feedforward_layernorm` where the family has one, else of
`post_attention_layernorm`), straight from the formulas of docs/spec.md; the logit lens is
lm_head(final norm(h)) with the model's final logit soft-capping.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from steering.spec import ModelShape, SpecContext, SteeringSpec, gate_truth, parse_spec


class ReferenceModel:
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Eager attention: one Python function per family to wrap for query masks.
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, attn_implementation="eager"
        )
        self.model.eval()
        self.softcap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.shape = ModelShape.from_hf_config(self.model.config)
        self.dtype = dtype
        # Rows of the last `logprobs` call whose plausibility filter had a tie (tie_logprob).
        self.plausible_ties: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Which request-level conditions the current request met (`conditions`), while it
        # is steered; token-level ones' values per row in this forward pass, once read.
        self._met: dict[str, bool] = {}
        self._token_values: dict[str, torch.Tensor] = {}

    def context(self, **kwargs) -> SpecContext:
        return SpecContext(self.shape, **kwargs)

    def spec(self, raw, **context_kwargs) -> SteeringSpec:
        return parse_spec(raw, self.context(**context_kwargs))

    # --- the intervention ----------------------------------------------------------------

    @staticmethod
    def _window(positions: str, rel: torch.Tensor) -> torch.Tensor:
        return {
            "all": torch.ones_like(rel, dtype=torch.bool),
            "prompt": rel < 0,
            "generated": rel >= 0,
            "last_prompt": rel == -1,
            "from_last_prompt": rel >= -1,
        }[positions]

    def _apply(self, spec: SteeringSpec, layer: int, h: torch.Tensor, rel: torch.Tensor):
        if layer == 0:  # a new forward pass: no token-level condition read yet
            self._token_values = {}
        # RMS-relative adds scale by the RMS of the stream the layer itself produced.
        rms = h.to(torch.float64).square().mean(dim=-1, keepdim=True).sqrt()
        for entry in spec.vectors:
            if entry.site != "residual" or layer not in entry.resolved:
                continue
            gate = torch.ones(h.shape[-2], dtype=torch.bool)
            if entry.when is not None:
                gate = self._gate(spec, entry.when, h.shape[-2])
            v = torch.as_tensor(entry.resolved[layer], dtype=torch.float64)
            hd = h.to(torch.float64)
            if entry.op == "add":
                w = v / v.norm() if entry.normalize else v
                strength = torch.full_like(rel, entry.scale, dtype=torch.float64).unsqueeze(-1)
                if entry.schedule is not None:
                    factor = entry.schedule.factor(rel.cpu().numpy())
                    strength = strength * torch.as_tensor(factor).to(hd.device).unsqueeze(-1)
                if entry.relative == "rms":
                    strength = strength * rms
                delta = strength * w
            else:
                u = v / v.norm()
                proj = (hd @ u).unsqueeze(-1)
                if entry.op == "ablate":
                    delta = -entry.scale * proj * u
                else:  # clamp
                    delta = (entry.value - proj) * u
            mask = (self._window(entry.positions, rel) & gate).to(torch.float64).unsqueeze(-1)
            h = (hd + mask * delta).to(h.dtype)
        for f in spec.features:
            if f.layer == layer:
                h = self._apply_feature(f, h, rel)
        for c in spec.conditions:  # token-level ones read each row after the layer's steering
            if c.per_token and c.layer == layer:
                rows = h.to(torch.float64).reshape(-1, h.shape[-1])  # one sequence
                self._token_values[c.name] = self._measure(c, rows)
        return h

    def _gate(self, spec: SteeringSpec, when: str, rows: int) -> torch.Tensor:
        """[rows] bool: whether `when` holds at each row, from the request-level conditions
        met and each row's own token-level values (not met before their layer)."""
        names = [c.name for c in spec.conditions]
        combo = torch.zeros(rows, dtype=torch.int64)
        for i, c in enumerate(spec.conditions):
            if c.per_token:
                values = self._token_values.get(c.name)
                met = torch.zeros(rows, dtype=torch.bool) if values is None else c.met(values)
            else:
                met = torch.full((rows,), self._met.get(c.name, False))
            combo += met.to(torch.int64) << i
        return torch.tensor(gate_truth(when, names))[combo]

    @staticmethod
    def _measure(c, h: torch.Tensor) -> torch.Tensor:
        """A condition's value on stream rows h [..., hidden] (float64), as CAST defines
        its similarity (see `conditions`), a projection, or an SAE feature's activation."""
        if c.measure == "activation":
            return ReferenceModel._feature_activation(c.resolved_sae, c.feature, h)
        vec = torch.as_tensor(c.direction, dtype=torch.float64)
        if c.measure == "projection":
            return h @ (vec / vec.norm())
        p = torch.tanh((h @ vec / torch.dot(vec, vec)).unsqueeze(-1) * vec)
        return (h * p).sum(dim=-1) / (h.norm(dim=-1) * p.norm(dim=-1))

    @torch.no_grad()
    def conditions(self, prompt_ids: Sequence[int], spec: SteeringSpec) -> dict[str, tuple]:
        """Each condition's (value, met) on this prompt, as CAST decides it.

        From IBM/activation-steering (github.com/IBM/activation-steering), as read in its
        `activation_steering/leash_layer.py`: on the first forward call (the prompt) a
        condition layer reduces the hidden states to their mean over the tokens ("mean")
        or the last token ("last"), projects with P = c c^T / (c^T c), squashes with tanh
        and takes the cosine similarity of h and tanh(P h); the comparator then decides
        (its "larger" means met when similarity < threshold, "smaller" when >=, so ops
        "<" and ">=" here). CAST reads each layer's input, the stream after layer i - 1:
        `layer` here is the layer whose output is read (docs/design.md#layer-convention).
        The stream read is after that layer's own steering; entries gated by request-level
        conditions act on generated tokens only, so none act on the prompt rows read here
        (entries gated by token-level conditions alone may, and do here as in the engine).
        Token-level conditions (reduce "token") are not in the result: `token_conditions`.
        """
        self._met = {}
        streams = self._streams(prompt_ids, len(prompt_ids), spec)
        out = {}
        for c in spec.conditions:
            if c.per_token:
                continue
            rows = streams[c.layer].to(torch.float64)
            h = rows.mean(dim=0) if c.reduce == "prompt_mean" else rows[-1]
            value = float(self._measure(c, h))
            out[c.name] = (value, c.met(value))
        return out

    @torch.no_grad()
    def token_conditions(
        self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec
    ) -> dict[str, np.ndarray]:
        """Each token-level condition's value at every row of `token_ids` (float64), read
        at its layer after that layer's steering (the request-level gates as decided)."""
        self.logprobs(token_ids, prompt_len, spec)
        return {n: v.numpy() for n, v in self._token_values.items()}

    def _apply_feature(self, f, h: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """An SAE feature op straight from the SAE's weights (docs/spec.md#sae-features)."""
        sae = f.resolved_sae
        hd = h.to(torch.float64)
        d = torch.as_tensor(sae.w_dec[f.feature], dtype=torch.float64)
        if f.op == "add":
            coeff = f.scale * (float(sae.typical[f.feature]) if f.relative else 1.0)
            delta = (coeff * d).expand_as(hd)
        else:
            a = self._feature_activation(sae, f.feature, hd).unsqueeze(-1)
            delta = (f.value - a) * d if f.op == "clamp" else (f.factor - 1.0) * a * d
        mask = self._window(f.positions, rel).to(torch.float64).unsqueeze(-1)
        return (hd + mask * delta).to(h.dtype)

    @staticmethod
    def _feature_activation(sae, feature: int, h: torch.Tensor) -> torch.Tensor:
        """a_f(h) = act(W_enc[:, f] . (h - b_dec) + b_enc[f]): ReLU, Gemma Scope's
        relu(pre) * (pre > threshold), or (TopK SAEs) ReLU of the feature alone."""
        x = h.to(torch.float64)
        if sae.subtract_b_dec:
            x = x - torch.as_tensor(sae.b_dec, dtype=torch.float64)
        pre = x @ torch.as_tensor(sae.w_enc[:, feature], dtype=torch.float64) + float(
            sae.b_enc[feature]
        )
        act = torch.relu(pre)
        if sae.activation == "jumprelu":
            act = act * (pre > float(sae.threshold[feature]))
        return act

    def _query_factor(self, spec: SteeringSpec, layer: int, rel: torch.Tensor) -> torch.Tensor:
        """Per-token, per-head query factor [T, H] of the layer's query masks (float64)."""
        factor = torch.ones(rel.shape[0], self.shape.num_heads, dtype=torch.float64)
        for mask in spec.heads:
            if mask.layer == layer and mask.target == "query":
                active = self._window(mask.positions, rel).nonzero(as_tuple=True)[0]
                factor[active.unsqueeze(-1), torch.tensor(mask.heads)] *= mask.scale
        return factor

    def _apply_heads(self, spec: SteeringSpec, layer: int, z: torch.Tensor, rel: torch.Tensor):
        """z: o_proj input [..., T, H*D]; returns it with masks then head vectors applied."""
        n, d = self.shape.num_heads, self.shape.head_dim
        zd = z.to(torch.float64).unflatten(-1, (n, d))  # [..., T, H, D]
        for mask in spec.heads:
            if mask.layer != layer or mask.target != "output":
                continue
            active = self._window(mask.positions, rel)  # [T]
            factor = torch.ones(rel.shape[0], n, dtype=torch.float64)
            factor[active.nonzero(as_tuple=True)[0].unsqueeze(-1), torch.tensor(mask.heads)] = (
                mask.scale
            )
            zd = zd * factor.unsqueeze(-1)
        for entry in spec.vectors:
            if entry.site != "heads" or layer not in entry.resolved:
                continue
            v = torch.as_tensor(entry.resolved[layer], dtype=torch.float64)
            if entry.normalize:
                v = v / v.norm()
            v = v.view(n, d)
            active = self._window(entry.positions, rel).view(-1, 1, 1)  # [T, 1, 1]
            if entry.op == "add":
                zd = torch.where(active, zd + entry.scale * v, zd)
            else:  # mix, on heads whose slice of v is non-zero
                on = (v != 0).any(dim=-1).view(1, n, 1)
                mixed = (1.0 - entry.weight) * zd + entry.weight * v
                zd = torch.where(active & on, mixed, zd)
        return zd.flatten(-2).to(z.dtype)

    @contextmanager
    def _queries_scaled(self, spec: SteeringSpec, prompt_len: int):
        """Wrap each attention module's eager attention function: query [B, H, T, D] times
        the layer's query factor, then the family's own function."""
        modules = {sys.modules[type(m.self_attn).__module__] for m in self._attention_layers()}
        originals = {mod: mod.eager_attention_forward for mod in modules}

        def wrap(original):
            def attention(module, query, *args, **kwargs):
                rel = torch.arange(query.shape[2]) - prompt_len
                factor = self._query_factor(spec, module.layer_idx, rel)  # [T, H]
                scaled = query.double() * factor.T.unsqueeze(0).unsqueeze(-1)
                return original(module, scaled.to(query.dtype), *args, **kwargs)

            return attention

        for mod, original in originals.items():
            mod.eager_attention_forward = wrap(original)
        try:
            yield
        finally:
            for mod, original in originals.items():
                mod.eager_attention_forward = original

    def _expert_bias(self, spec: SteeringSpec, layer: int, rel: torch.Tensor, n: int):
        """[T, n] router-logit bias of the layer's expert masks (float64, -inf for 0)."""
        bias = torch.zeros(rel.shape[0], n, dtype=torch.float64)
        for m in spec.experts:
            if m.layer == layer:
                active = self._window(m.positions, rel).nonzero(as_tuple=True)[0]
                bias[active.unsqueeze(-1), torch.tensor(m.experts)] += (
                    math.log(m.scale) if (m.scale > 0) else -math.inf
                )
        return bias

    def _router_of(self, layer: torch.nn.Module) -> torch.nn.Module:
        for block in ("mlp", "feed_forward", "block_sparse_moe"):
            for name in ("gate", "router"):
                router = getattr(getattr(layer, block, None), name, None)
                if isinstance(router, torch.nn.Module) and hasattr(router, "weight"):
                    return router
        raise ValueError(f"{type(layer).__name__}: no MoE router")

    @contextmanager
    def _routers_biased(self, spec: SteeringSpec, prompt_len: int):
        import torch.nn.functional as F

        # The masked layers, by their router's weight: F.linear is called with it.
        layer_of = {
            id(self._router_of(self.model.model.layers[i]).weight): i
            for i in {m.layer for m in spec.experts}
        }
        linear = F.linear

        def biased(x, weight, bias=None):
            out = linear(x, weight, bias)
            layer = layer_of.get(id(weight))
            if layer is None:
                return out
            rel = torch.arange(out.shape[-2]) - prompt_len
            return (out.double() + self._expert_bias(spec, layer, rel, out.shape[-1])).to(out.dtype)

        F.linear = biased
        try:
            yield
        finally:
            F.linear = linear

    def _attention_layers(self):
        return [m for m in self.model.model.layers if hasattr(m, "self_attn")]

    @contextmanager
    def steered(self, spec: SteeringSpec | None, prompt_len: int):
        """Hooks on each decoder layer's output for one unpadded sequence."""
        handles = []
        residual = spec is not None and (
            any(e.site == "residual" for e in spec.vectors)
            or bool(spec.features)
            or any(c.per_token for c in spec.conditions)
        )
        heads = spec is not None and (spec.heads or any(e.site == "heads" for e in spec.vectors))
        query = spec is not None and any(m.target == "query" for m in spec.heads)
        for i, module in enumerate(self.model.model.layers):

            def hook(mod, args, output, i=i):
                hidden = output[0] if isinstance(output, tuple) else output
                rel = torch.arange(hidden.shape[-2]) - prompt_len
                new = self._apply(spec, i, hidden, rel)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            def pre_hook(mod, args, i=i):
                z = args[0]
                rel = torch.arange(z.shape[-2]) - prompt_len
                return (self._apply_heads(spec, i, z, rel), *args[1:])

            if residual:
                handles.append(module.register_forward_hook(hook))
            if heads and hasattr(module, "self_attn"):
                handles.append(module.self_attn.o_proj.register_forward_pre_hook(pre_hook))
        try:
            with contextlib.ExitStack() as stack:
                if query:
                    stack.enter_context(self._queries_scaled(spec, prompt_len))
                if spec is not None and spec.experts:
                    stack.enter_context(self._routers_biased(spec, prompt_len))
                yield
        finally:
            for handle in handles:
                handle.remove()

    # --- queries -------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec | None):
        """log_softmax of the logits at every row of `token_ids`: [len, vocab], float32.

        With `decoding`, the rows from the last prompt row on carry the decoded scores.
        """
        ids = torch.tensor([list(token_ids)])
        after: dict[int, torch.Tensor] = {}
        before: dict[int, torch.Tensor] = {}
        met = {}
        if spec is not None and spec.conditions:
            met = {n: m for n, (_, m) in self.conditions(token_ids[:prompt_len], spec).items()}
        self._met = met
        self.plausible_ties = {}
        with self.steered(spec, prompt_len), self._captured(spec, after, before):
            logits = self.model(input_ids=ids, use_cache=False).logits[0].float()
        if spec is not None and spec.decoding is not None:
            logits = self._decode(spec.decoding, logits, after, before, prompt_len)
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def readout(self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec):
        """[len(token_ids), len(spec.readout)]: each row's stream at the output of each
        readout entry's layer (after that layer's steering) projected on its unit vector
        (top-k entries: see `topk_readout`)."""
        streams = self._streams(token_ids, prompt_len, spec)
        columns = []
        for e in spec.readout:
            if e.top_k is not None:
                continue
            if e.sae is not None:
                sae = e.resolved_sae
                columns.append(self._feature_activation(sae, e.feature, streams[e.layer]).float())
            else:
                columns.append(streams[e.layer] @ torch.from_numpy(e.unit_vector))
        return torch.stack(columns, dim=1).numpy()

    def topk_readout(
        self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec
    ) -> list[list[tuple[int, float]]]:
        """Per row, the spec's top-k entry: the k largest activations > 0 of its SAE's full
        encoding (`SparseAutoencoder.encode`, TopK competition included), descending."""
        (entry,) = [e for e in spec.readout if e.top_k is not None]
        streams = self._streams(token_ids, prompt_len, spec)
        acts = entry.resolved_sae.encode(streams[entry.layer].numpy())
        out = []
        for row in acts:
            order = np.argsort(-row, kind="stable")[: entry.top_k]
            out.append([(int(f), float(row[f])) for f in order if row[f] > 0.0])
        return out

    @torch.no_grad()
    def _streams(self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec):
        """Each layer's output stream (after its steering), float32 [tokens, hidden]."""
        ids = torch.tensor([list(token_ids)])
        streams: dict[int, torch.Tensor] = {}
        handles = []
        with self.steered(spec, prompt_len):
            # Registered after the steering hooks, so they see the steered output.
            for i, module in enumerate(self.model.model.layers):

                def keep(mod, args, output, i=i):
                    streams[i] = (output[0] if isinstance(output, tuple) else output)[0].float()

                handles.append(module.register_forward_hook(keep))
            try:
                self.model(input_ids=ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
        return streams

    @contextmanager
    def _captured(self, spec, after: dict, before: dict):
        handles = []
        if spec is not None and spec.decoding is not None:
            for i, module in enumerate(self.model.model.layers):

                def out_hook(mod, args, output, i=i):
                    after[i] = (output[0] if isinstance(output, tuple) else output)[0]

                def mid_hook(mod, args, i=i):
                    before[i] = args[0][0]

                handles.append(module.register_forward_hook(out_hook))
                mid = getattr(module, "pre_feedforward_layernorm", None)
                mid = module.post_attention_layernorm if mid is None else mid
                handles.append(mid.register_forward_pre_hook(mid_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _lens(self, h: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """The model's logits of stream h: lm_head(final norm(h)), soft-capped as the model's
        own head does (Gemma 2)."""
        logits = self.model.lm_head(self.model.model.norm(h) if norm else h)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _layer_logp(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self._lens(h).float(), dim=-1)

    @staticmethod
    def _jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
        p, q = logp.double().exp(), logq.double().exp()
        m = 0.5 * (p + q)
        kl_p = torch.where(p > 0, p * (p.log() - m.log()), torch.zeros_like(p)).sum(-1)
        kl_q = torch.where(q > 0, q * (q.log() - m.log()), torch.zeros_like(q)).sum(-1)
        return 0.5 * (kl_p + kl_q)

    # A token whose final log-prob is this close to the plausibility threshold (DoLa, LFD)
    # is a tie: float rounding decides it, and another implementation (vLLM's, or this one
    # on another CPU) may keep what this one drops.
    PLAUSIBLE_TIE = 1e-5

    def _plausible(
        self, r: int, final_row: torch.Tensor, alpha: float, scores: torch.Tensor
    ) -> torch.Tensor:
        if alpha <= 0:
            return scores
        threshold = final_row.max() + math.log(alpha)
        keep = final_row >= threshold
        tied = (final_row - threshold).abs() <= self.PLAUSIBLE_TIE
        if tied.any():
            self.plausible_ties[r] = (keep ^ tied, scores)
        return torch.where(keep, scores, -torch.inf)

    def tie_logprob(self, row: int, token: int) -> float | None:
        """`token`'s log-prob at `row` of the last `logprobs` call with the plausibility
        filter's ties decided the other way; None where that row had no tie (or the
        token itself would be filtered out)."""
        if row not in self.plausible_ties:
            return None
        keep, scores = self.plausible_ties[row]
        if not keep[token]:
            return None
        return float(scores[token] - torch.logsumexp(scores[keep], dim=-1))

    def _lfd(self, d, final, out, after, before, rows) -> torch.Tensor:
        """As LFD's `_lfd_select`/`_lfd_decoding`: its JS via F.kl_div, argmin, un-normed
        early logits added to the final log-probs under the relative-top filter."""
        import torch.nn.functional as F

        self.last_contrast_layers = []
        for r in rows:
            scores = []
            for c in d.candidates:
                p = torch.softmax(self._lens(after[c][r]), -1)
                q = torch.softmax(self._lens(before[c][r]), -1)
                m = 0.5 * (p + q)
                kl1 = F.kl_div(torch.log(p), m, reduction="none").mean(-1)
                kl2 = F.kl_div(torch.log(q), m, reduction="none").mean(-1)
                scores.append(float(0.5 * (kl1 + kl2)))
            layer = d.candidates[min(range(len(scores)), key=scores.__getitem__)]
            self.last_contrast_layers.append(layer)
            raw = torch.log_softmax(self._lens(after[layer][r], norm=False).float(), dim=-1)
            out[r] = self._plausible(r, final[r], d.alpha, final[r] + raw)
        return out

    def _decode(self, d, logits, after, before, prompt_len: int) -> torch.Tensor:
        out = logits.clone()
        final = torch.log_softmax(logits, dim=-1)
        rows = range(prompt_len - 1, logits.shape[0])
        if d.mode == "fuse":
            layer = d.candidates[0]
            if d.layer == "auto":  # lowest IKS at the last prompt row
                r = prompt_len - 1
                iks = [
                    float(self._jsd(self._layer_logp(before[c][r]), self._layer_logp(after[c][r])))
                    for c in d.candidates
                ]
                layer = d.candidates[min(range(len(iks)), key=iks.__getitem__)]
            self.last_fuse_layer = layer
            early = self._layer_logp(after[layer])
            for r in rows:
                out[r] = (1.0 - d.weight) * final[r] + d.weight * early[r]
            return out
        if d.mode == "lfd":
            return self._lfd(d, final, out, after, before, rows)
        early = {c: self._layer_logp(after[c]) for c in d.candidates}
        self.last_contrast_layers = []
        for r in rows:
            scores = [float(self._jsd(final[r], early[c][r])) for c in d.candidates]
            m = d.candidates[max(range(len(scores)), key=scores.__getitem__)]
            self.last_contrast_layers.append(m)
            out[r] = self._plausible(r, final[r], d.alpha, final[r] - early[m][r])
        return out

    def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], spec=None):
        """Teacher-forced log-prob of each completion token given the prompt."""
        ids = list(prompt_ids) + list(completion_ids)
        lp = self.logprobs(ids, len(prompt_ids), spec)
        p = len(prompt_ids)
        return [float(lp[p - 1 + j, tok]) for j, tok in enumerate(completion_ids)]

    def greedy(self, prompt_ids: Sequence[int], max_tokens: int, spec=None):
        """Greedy continuation: (tokens, log-prob of each chosen token)."""
        ids = list(prompt_ids)
        tokens, lps = [], []
        for _ in range(max_tokens):
            lp = self.logprobs(ids, len(prompt_ids), spec)[-1]
            tok = int(torch.argmax(lp))
            tokens.append(tok)
            lps.append(float(lp[tok]))
            ids.append(tok)
        return tokens, lps
