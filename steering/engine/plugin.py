"""`vllm.general_plugins` entry point: vLLM imports and calls `register` in every process."""

from __future__ import annotations

import logging
import os

from steering.engine.config import disabled_by_env


def _share_vllm_logging() -> None:
    """Our log lines go where vLLM's go (its handler and format), in every vLLM process."""
    vllm_logger = logging.getLogger("vllm")
    for name in ("steering", "server"):
        ours = logging.getLogger(name)
        if ours.handlers or not vllm_logger.handlers:
            continue
        for handler in vllm_logger.handlers:
            ours.addHandler(handler)
        ours.setLevel(vllm_logger.level or logging.INFO)
        ours.propagate = False


def register() -> None:
    _share_vllm_logging()
    # With the environment switch nothing is patched at all: the process is plain vLLM.
    # (The per-engine switch in additional_config leaves the hooks in place as no-ops.)
    if disabled_by_env():
        return
    # The hooks live in the V1 model runner; vLLM picks Model Runner V2 by default for some
    # models on GPU (Qwen3), which has no per-token request index. Pin V1 unless the user
    # chose explicitly. (The CPU backend always runs V1.)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from steering.engine.hooks import install_hooks

    install_hooks()
