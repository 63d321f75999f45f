"""Which of vLLM's model runners an engine will run, and the refusal when it is not V1.

The steering hooks live in the V1 model runner (`hooks.py`). vLLM picks Model Runner V2
from `VllmConfig.use_v2_model_runner`: for any truthy `VLLM_USE_V2_MODEL_RUNNER`, for a
config whose feature only V2 has (HiSparse attention, watermarking, which override the
variable), and by default for some models on GPU. An engine on V2 would accept steered
requests, salt their cache and run them unsteered; so a steered engine that would run V2
is refused when its front end is built, before any worker starts. `docs/v2-runner.md`
plans the port.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "VLLM_USE_V2_MODEL_RUNNER"


class NeedsV1Runner(ValueError):
    pass


def v2_runner_cause(vllm_config: Any) -> str | None:
    """Why this config runs Model Runner V2, or None when it runs V1.

    The features that force V2 are named before vLLM's own property is asked: with
    `VLLM_USE_V2_MODEL_RUNNER=0` (which steerserve's plugin sets by default) HiSparse makes
    that property raise an error about a variable the user never set.
    """
    attention = getattr(vllm_config, "attention_config", None)
    if getattr(attention, "hisparse_config", None) is not None:
        return "HiSparse attention (attention_config.hisparse_config) runs only on V2"
    if getattr(vllm_config, "watermark_config", None) is not None:
        return "watermarking (--watermark-config) runs only on V2, whatever the variable says"
    if not vllm_config.use_v2_model_runner:
        return None
    raw = os.environ.get(ENV)
    if raw is not None:
        return f"{ENV}={raw!r} asks for it"
    return "vLLM picked it for this model and platform"


def refuse_v2_runner(vllm_config: Any) -> None:
    """Raise NeedsV1Runner naming the cause when a steered engine would run V2."""
    cause = v2_runner_cause(vllm_config)
    if cause is None:
        return
    raise NeedsV1Runner(
        "steerserve: steering runs in vLLM's V1 model runner, but this engine would run "
        f"Model Runner V2: {cause}. Run V1 ({ENV}=0, without HiSparse or watermarking), or "
        "start the engine with steering off (STEERSERVE_DISABLE=1, or "
        'additional_config={"steerserve": {"enabled": false}})'
    )
