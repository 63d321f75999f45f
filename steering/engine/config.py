"""Per-engine settings of the extension, read from vLLM's config and the environment.

The switch that turns the extension off is per engine, so plain vLLM and steerserve can be
compared inside one process:

- `STEERSERVE_DISABLE=1` in the environment, or
- `additional_config={"steerserve": {"enabled": False}}` (`--additional-config` on the CLI).

Disabled means the hooks return straight to vLLM's own code: no layer is touched, no buffer
is allocated and a `steering` field is ignored, exactly as in plain vLLM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

ENV_DISABLE = "STEERSERVE_DISABLE"
ENV_VECTORS_DIR = "STEERSERVE_VECTORS_DIR"
ENV_SAES_DIR = "STEERSERVE_SAES_DIR"
CONFIG_KEY = "steerserve"
DEFAULT_VECTORS_DIR = "vectors"
DEFAULT_SAES_DIR = "saes"


def _layer_list(mine: dict, key: str) -> tuple[int, ...] | None:
    """additional_config.steerserve[key] as sorted distinct layers (None: not given)."""
    given = mine.get(key)
    if given is None:
        return None
    try:
        return tuple(sorted({int(i) for i in given}))
    except (TypeError, ValueError):
        raise ValueError(f"additional_config.{CONFIG_KEY}.{key} must be a list of layers") from None


def disabled_by_env() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SteeringConfig:
    enabled: bool = True
    # Directory of named vectors; resolved by the API process only (workers get data).
    vectors_dir: str = DEFAULT_VECTORS_DIR
    # Projection entries (ablate/clamp) one request may use; adds are folded and free.
    # Each costs a dot product per token and layer for every request in the batch, and
    # the buffers scale with it (layers x slots x max_projections x hidden).
    max_projections: int = 2
    # Directory of named sparse autoencoders (steering/sae.py); API process only, like
    # vectors (a compiled spec carries the features' rows to the workers).
    saes_dir: str = DEFAULT_SAES_DIR
    # SAE feature clamps/scales (spec `features`, ops "clamp"/"scale") one request may apply
    # at one layer. Each costs a dot product and an axpy per token and layer for every
    # request in the batch (tables layers x slots x max_features x hidden, twice), so it is
    # opt-in: 0 (the default) refuses those ops with the switch to turn on. Feature adds are
    # constants, folded like vector adds, and always available.
    max_features: int = 0
    # The layers where feature ops run (None: every layer). The ops cost every request at
    # every layer they run at, so an engine whose SAEs read two layers can run them there
    # only; specs with clamps/scales elsewhere are refused naming these layers.
    feature_layers: tuple[int, ...] | None = None
    # Head interventions (masks, query masks, head-site vectors): a gathered multiply on
    # every layer's queries and a multiply-add on its o_proj input, with tables of
    # layers x slots x 3 x (H, H, H*D). Off: none of it exists and specs that use heads are
    # refused.
    heads: bool = True
    # Layer-reading decoding (fuse / contrast / lfd): each layer copies its sampled rows
    # into [layers, max_num_seqs, hidden] buffers every step, a few percent of throughput
    # for every request, so it is opt-in (as vLLM's --enable-lora is). Off: no copy, and
    # specs with `decoding` are refused with the switch to turn on.
    decoding: bool = False
    # Residual-stream capture (capture.py): every layer copies its whole output stream
    # into a [layers, max_num_batched_tokens, hidden] buffer each step. For engines that
    # make vectors (`steerserve vectors train/eval`), not for serving.
    capture: bool = False
    # Readout (spec `readout`): each layer projects every token's stream on its request's
    # readout units ([tokens, max_readouts] dot products per layer, for every request in
    # the batch), so it is opt-in like decoding. Off: specs with `readout` are refused.
    readout: bool = False
    max_readouts: int = 4
    # Top-k readout (readout entries {"sae", "top_k"}): the SAE of `saes_dir` whose full
    # encoder the sampler step runs on the rows of requests that ask (engine/topk.py). In
    # the forward pass it costs one copy of the stream at the SAE's layer per step; the
    # encoder ([hidden, width] in the model's dtype, on the device) runs only for asking
    # rows. One SAE per engine; None: top-k entries are refused.
    topk_sae: str | None = None
    max_topk: int = 64
    # Scheduled and RMS-relative adds (vector entries with `schedule` / `relative`) one
    # request may use. Each is an in-graph axpy per token at every layer for every request
    # in the batch (tables layers x slots x 3 x max_dynamic x hidden), so it is opt-in:
    # 0 (the default) refuses them with the switch to turn on. Plain adds stay folded.
    max_dynamic: int = 0
    # Conditions (spec `conditions`, CAST's and token-level) one request may use; entries
    # gate on them with `when`. A gated constant add folds into one constant per
    # combination of conditions met (the constant tables grow 2 ** max_conditions-fold);
    # a gated scheduled / RMS-relative add is a dynamic add (max_dynamic). Each condition
    # layer adds each token's stream, weighted, into its request's accumulator
    # ([2 * max_num_seqs + 1, max_conditions, hidden]); opt-in like the rest: 0 refuses them.
    max_conditions: int = 0
    # The layers conditions may read (None: every layer). The weighted sum runs at each of
    # them for every request (a [C, rows, tokens] @ [tokens, hidden] product), so an engine
    # whose conditions read a layer or two is faster with just those.
    condition_layers: tuple[int, ...] | None = None
    # Steer an architecture that is mapped but not verified against the oracle here
    # (architectures.MAPPED_NOT_VERIFIED names why each is not): at the user's own risk.
    allow_unverified: bool = False

    @classmethod
    def from_vllm(cls, vllm_config: Any) -> SteeringConfig:
        extra = getattr(vllm_config, "additional_config", None) or {}
        mine = dict(extra.get(CONFIG_KEY, {})) if isinstance(extra, dict) else {}
        known = (
            "enabled",
            "vectors_dir",
            "max_projections",
            "saes_dir",
            "max_features",
            "feature_layers",
            "heads",
            "decoding",
            "capture",
            "readout",
            "max_readouts",
            "topk_sae",
            "max_topk",
            "max_dynamic",
            "max_conditions",
            "condition_layers",
            "allow_unverified",
        )
        unknown = set(mine) - set(known)
        if unknown:
            raise ValueError(
                f"additional_config.{CONFIG_KEY}: unknown key(s) {sorted(unknown)}; "
                f"known: {', '.join(known)}"
            )
        enabled = bool(mine.get("enabled", True))
        if disabled_by_env():
            enabled = False
        max_proj = int(mine.get("max_projections", cls.max_projections))
        if not 0 <= max_proj <= 64:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_projections must be in 0..64")
        max_features = int(mine.get("max_features", cls.max_features))
        if not 0 <= max_features <= 64:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_features must be in 0..64")
        feature_layers = _layer_list(mine, "feature_layers")
        condition_layers = _layer_list(mine, "condition_layers")
        max_readouts = int(mine.get("max_readouts", cls.max_readouts))
        if not 1 <= max_readouts <= 64:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_readouts must be in 1..64")
        max_topk = int(mine.get("max_topk", cls.max_topk))
        if not 1 <= max_topk <= 1024:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_topk must be in 1..1024")
        topk_sae = mine.get("topk_sae") or None
        max_dynamic = int(mine.get("max_dynamic", cls.max_dynamic))
        if not 0 <= max_dynamic <= 16:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_dynamic must be in 0..16")
        max_conditions = int(mine.get("max_conditions", cls.max_conditions))
        if not 0 <= max_conditions <= 6:
            raise ValueError(f"additional_config.{CONFIG_KEY}.max_conditions must be in 0..6")
        return cls(
            enabled=enabled,
            vectors_dir=str(
                mine.get("vectors_dir") or os.environ.get(ENV_VECTORS_DIR) or DEFAULT_VECTORS_DIR
            ),
            max_projections=max_proj,
            saes_dir=str(mine.get("saes_dir") or os.environ.get(ENV_SAES_DIR) or DEFAULT_SAES_DIR),
            max_features=max_features,
            feature_layers=feature_layers,
            heads=bool(mine.get("heads", True)),
            decoding=bool(mine.get("decoding", False)),
            capture=bool(mine.get("capture", False)),
            readout=bool(mine.get("readout", False)),
            max_readouts=max_readouts,
            topk_sae=None if topk_sae is None else str(topk_sae),
            max_topk=max_topk,
            max_dynamic=max_dynamic,
            max_conditions=max_conditions,
            condition_layers=condition_layers,
            allow_unverified=bool(mine.get("allow_unverified", False)),
        )
