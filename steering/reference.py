"""The oracle: a spec applied to the HF transformers model with forward hooks, in float32.

Deliberately independent of the engine path (`compile.py`, `engine/`): it applies each
vector entry as DESIGN.md states it, entry by entry, with no merging, slot tables or
per-token buffers, and recomputes the whole sequence at every greedy step (no KV cache),
so every row's prompt/generated status comes straight from its position.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from steering.spec import ModelShape, SpecContext, SteeringSpec, parse_spec


class ReferenceModel:
    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.shape = ModelShape.from_hf_config(self.model.config)
        self.dtype = dtype

    def context(self, **kwargs) -> SpecContext:
        return SpecContext(self.shape, **kwargs)

    def spec(self, raw, **context_kwargs) -> SteeringSpec:
        return parse_spec(raw, self.context(**context_kwargs))

    # --- the intervention ----------------------------------------------------------------

    @staticmethod
    def _window(positions: str, rel: torch.Tensor) -> torch.Tensor:
        if positions == "all":
            return torch.ones_like(rel, dtype=torch.bool)
        if positions == "prompt":
            return rel < 0
        return rel >= 0  # generated

    def _apply(self, spec: SteeringSpec, layer: int, h: torch.Tensor, rel: torch.Tensor):
        for entry in spec.vectors:
            if layer not in entry.resolved:
                continue
            v = torch.as_tensor(entry.resolved[layer], dtype=torch.float64)
            hd = h.to(torch.float64)
            if entry.op == "add":
                w = v / v.norm() if entry.normalize else v
                delta = (entry.scale * w).expand_as(hd)
            else:
                u = v / v.norm()
                proj = (hd @ u).unsqueeze(-1)
                if entry.op == "ablate":
                    delta = -entry.scale * proj * u
                else:  # clamp
                    delta = (entry.value - proj) * u
            mask = self._window(entry.positions, rel).to(torch.float64).unsqueeze(-1)
            h = (hd + mask * delta).to(h.dtype)
        return h

    @contextmanager
    def steered(self, spec: SteeringSpec | None, prompt_len: int):
        """Hooks on each decoder layer's output for one unpadded sequence."""
        handles = []
        if spec is not None and spec.vectors:
            layers = self.model.model.layers
            for i, module in enumerate(layers):

                def hook(mod, args, output, i=i):
                    hidden = output[0] if isinstance(output, tuple) else output
                    rel = torch.arange(hidden.shape[-2]) - prompt_len
                    new = self._apply(spec, i, hidden, rel)
                    return (new, *output[1:]) if isinstance(output, tuple) else new

                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- queries -------------------------------------------------------------------------

    @torch.no_grad()
    def logprobs(self, token_ids: Sequence[int], prompt_len: int, spec: SteeringSpec | None):
        """log_softmax of the logits at every row of `token_ids`: [len, vocab], float32."""
        ids = torch.tensor([list(token_ids)])
        with self.steered(spec, prompt_len):
            logits = self.model(input_ids=ids, use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

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
