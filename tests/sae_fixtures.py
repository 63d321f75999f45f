"""SAEs for the tiny test models, written in each format the registry reads.

Random weights scaled so that on the tiny models' residual streams (entries of order 1)
the features' pre-activations straddle their thresholds: some tokens fire, others do not,
so every branch of the activation is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WIDTH = 64


def sae_arrays(seed: int, hidden: int, width: int = WIDTH) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_enc = rng.standard_normal((hidden, width)) * (2.0 / np.sqrt(hidden))
    w_dec = rng.standard_normal((width, hidden))
    w_dec *= 4.0 / np.linalg.norm(w_dec, axis=1, keepdims=True)
    return {
        "W_enc": w_enc.astype(np.float32),
        "W_dec": w_dec.astype(np.float32),
        "b_enc": (rng.standard_normal(width) * 0.3).astype(np.float32),
        "b_dec": (rng.standard_normal(hidden) * 0.2).astype(np.float32),
        "threshold": rng.uniform(0.2, 1.0, width).astype(np.float32),
    }


def write_saelens(directory: Path, arrays: dict[str, np.ndarray], cfg: dict) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    keys = ["W_enc", "W_dec", "b_enc", "b_dec"]
    if cfg.get("architecture") == "jumprelu":
        keys.append("threshold")
    save_file({k: arrays[k] for k in keys}, str(directory / "sae_weights.safetensors"))
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory


def write_sparsify(directory: Path, arrays: dict[str, np.ndarray], k: int) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        "encoder.weight": np.ascontiguousarray(arrays["W_enc"].T),
        "encoder.bias": arrays["b_enc"],
        "W_dec": arrays["W_dec"],
        "b_dec": arrays["b_dec"],
    }
    save_file(tensors, str(directory / "sae.safetensors"))
    width, d_in = arrays["W_dec"].shape
    cfg = {"k": k, "num_latents": width, "expansion_factor": width // d_in, "d_in": d_in}
    (directory / "cfg.json").write_text(json.dumps({**cfg, "normalize_decoder": True}))
    return directory


def write_test_saes(root: Path, hidden: int) -> Path:
    """The registry directory of the test engines:

    relu              our format, ReLU, layer 1, with typical activations and labels
    gs_layer_2.npz    Gemma Scope params (JumpReLU), layer 2 from the file name
    lens_jump/        SAELens jumprelu, the same weights as gs_layer_2 (no b_dec on input)
    lens_relu/        SAELens standard (ReLU, b_dec subtracted), layer 3 (resid_pre of block 4)
    sparsify.layers.1/  sparsify TopK (k=8), layer 1
    """
    from steering.sae import SparseAutoencoder, save_sae

    relu = sae_arrays(1, hidden)
    rng = np.random.default_rng(9)
    save_sae(
        SparseAutoencoder(
            relu["W_enc"],
            relu["b_enc"],
            relu["W_dec"],
            relu["b_dec"],
            layer=1,
            labels={3: "three", 5: "five"},
            typical=rng.uniform(0.5, 2.0, WIDTH),
            description="random test SAE",
        ),
        root / "relu.safetensors",
    )
    gs = sae_arrays(2, hidden)
    np.savez(root / "gs_layer_2.npz", **gs)
    write_saelens(
        root / "lens_jump",
        gs,
        {
            "architecture": "jumprelu",
            "d_in": hidden,
            "d_sae": WIDTH,
            "hook_name": "blocks.2.hook_resid_post",
            "apply_b_dec_to_input": False,
            "normalize_activations": "none",
        },
    )
    write_saelens(
        root / "lens_relu",
        sae_arrays(3, hidden),
        {
            "architecture": "standard",
            "d_in": hidden,
            "d_sae": WIDTH,
            "hook_name": "blocks.4.hook_resid_pre",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
        },
    )
    write_sparsify(root / "sparsify.layers.1", sae_arrays(4, hidden), k=8)
    return root
