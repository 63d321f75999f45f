"""Top-k readout: each token's most active features of one SAE, for the requests that ask.

In the forward pass the SAE's layer copies its output stream (after that layer's steering)
into `tables.topk_stream` [max_tokens, hidden] (layers.py): one copy per step, the same
ops for every row. At the sampler step `ReadoutBook.collect` gathers the rows of requests
with a top-k entry, and only those go through the SAE's full encoder here:

    pre = W_enc^T (x - b_dec) + b_enc,   a = act(pre),   the k largest a > 0

For a TopK SAE, whose output keeps its k_sae largest ReLU activations, the k largest of
that output are the min(k, k_sae) largest of ReLU(pre) (ties aside), so no full top-k_sae
pass is needed. A request's k may be smaller than another's in the same step: one topk of
the largest k, each row keeps its own prefix (torch.topk sorts).
"""

from __future__ import annotations

import numpy as np
import torch

from steering.sae import SparseAutoencoder, load_named
from steering.spec import ModelShape


class TopKEncoder:
    """The SAE's encoder on the device. W_enc is kept in the model's dtype, as the feature
    ops' and readout's rows are: in a bfloat16 model the matmul runs in bfloat16 (float32
    accumulation, one bfloat16 rounding of each pre-activation, about 4x faster on CPU than
    float32 here); biases, threshold and top-k are float32."""

    def __init__(
        self,
        sae: SparseAutoencoder,
        max_k: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        def f32(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)

        self.layer = int(sae.layer)
        self.max_k = min(max_k, sae.width)
        self.sae_k = sae.k if sae.activation == "topk" else None
        self.w_enc = f32(sae.w_enc).to(dtype)  # [hidden, width]
        self.b_enc = f32(sae.b_enc)
        self.b_dec = f32(sae.b_dec) if sae.subtract_b_dec else None
        self.theta: torch.Tensor | None = None  # JumpReLU: fires where pre > max(threshold, 0)
        if sae.activation == "jumprelu":
            assert sae.threshold is not None
            self.theta = f32(np.maximum(sae.threshold, 0.0))

    def effective_k(self, k: int) -> int:
        return min(k, self.max_k) if self.sae_k is None else min(k, self.max_k, self.sae_k)

    def encode(self, rows: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Features [n, k] (int32) and their activations [n, k] (float32) of the k largest
        activations of each row, descending; an activation of 0 is a feature that is off."""
        x = rows
        if self.b_dec is not None:
            x = rows.float() - self.b_dec
        pre = (x.to(self.w_enc.dtype) @ self.w_enc).float() + self.b_enc
        if self.theta is not None:
            acts = torch.where(pre > self.theta, pre, torch.zeros_like(pre))
        else:
            acts = pre.clamp_min(0.0)
        values, ids = acts.topk(k, dim=-1)
        return ids.to(torch.int32).cpu().numpy(), values.cpu().numpy()


def load_encoder(
    saes_dir: str, name: str, shape: ModelShape, max_k: int, device, dtype: torch.dtype
) -> TopKEncoder:
    """The engine's top-k SAE, checked against the model; a clear error at start if not."""
    try:
        sae = load_named(saes_dir, name)
    except KeyError:
        raise ValueError(
            f"steerserve: top-k SAE {name!r} (topk_sae, --steering-topk-sae) is not in the SAE "
            f"directory {saes_dir}"
        ) from None
    except ValueError as e:  # SaeFileError
        raise ValueError(f"steerserve: top-k SAE {name!r} does not load: {e}") from e
    problem = sae.fits(shape)
    if problem is not None:
        raise ValueError(f"steerserve: top-k SAE {name!r} {problem}")
    return TopKEncoder(sae, max_k, device, dtype)


def active_pairs(ids: np.ndarray, values: np.ndarray) -> list[list[float]] | None:
    """One token's [[feature, activation], ...] (active ones only); None if not computed."""
    if ids.size and ids[0] < 0:
        return None
    return [[int(f), float(v)] for f, v in zip(ids.tolist(), values.tolist(), strict=True) if v > 0]
