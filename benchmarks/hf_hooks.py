"""The alternative users have today: HF transformers' `generate` with steering added by
forward hooks on the decoder layers (what repeng-style code does), batched, KV-cached.

Each request of the batch gets its own vector per layer; the hook adds row b's vector to
sequence b's hidden states at every position, which is `"op": "add"` with positions "all"
(the spec semantics that steering/reference.py checks the engine against).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


class HFSteeredGeneration:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model = model.to(device).eval()
        self.dtype, self.device = dtype, device

    @contextmanager
    def _hooks(self, vectors: np.ndarray | None):
        """`vectors`: [batch, layers, hidden] (None: unsteered)."""
        handles = []
        if vectors is not None:
            v = torch.as_tensor(vectors, dtype=self.dtype, device=self.device)
            for i, layer in enumerate(self.model.model.layers):

                def hook(mod, args, output, i=i):
                    hidden = output[0] if isinstance(output, tuple) else output
                    steered = hidden + v[:, i].unsqueeze(1)
                    return (steered, *output[1:]) if isinstance(output, tuple) else steered

                handles.append(layer.register_forward_hook(hook))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], vectors: np.ndarray | None, max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy, exactly `max_new_tokens` each (EOS suppressed, like `ignore_eos`).
        Prompts of one length, so no padding is involved."""
        ids = torch.tensor(prompts, device=self.device)
        with self._hooks(vectors):
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].tolist()


def vectors_of(specs: list[dict | None], num_layers: int, hidden: int) -> np.ndarray | None:
    """The per-request, per-layer added vectors of residual-add specs with inline data."""
    if all(s is None for s in specs):
        return None
    out = np.zeros((len(specs), num_layers, hidden), dtype=np.float32)
    for b, spec in enumerate(specs):
        for entry in (spec or {}).get("vectors", []):
            assert entry.get("op", "add") == "add" and entry.get("site", "residual") == "residual"
            for layer, values in entry["data"].items():
                out[b, int(layer)] += entry.get("scale", 1.0) * np.asarray(values, np.float32)
    return out
