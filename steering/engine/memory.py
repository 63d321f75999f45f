"""KV cache budgets for the engines steerserve starts on vLLM's CPU backend.

vLLM's CPU worker reads `--gpu-memory-utilization` (default 0.92) as the share of the NUMA
node's RAM to reserve, and refuses to start when that much is not free: beside any other
engine, or a test suite's engines, it fails ("Available memory on node 0 ... is less than
desired CPU memory utilization"). An explicit `--kv-cache-memory-bytes` skips that check
and reserves exactly the KV cache. So every engine steerserve starts on CPU gets an
explicit budget unless its user chose one (either flag); on GPU vLLM's defaults stand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MiB = 1 << 20
# `steerserve serve` of a user's model: room for a few dozen 2k-token sequences of a
# 1B-class model; a long-context model needs --max-model-len or a larger budget.
SERVE_KV_BYTES = 1024 * MiB
# Vector tools (capture, `vectors train/eval`) and the demo model: short sequences.
SMALL_KV_BYTES = 256 * MiB
BUDGET_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def with_cpu_kv_budget(engine_kw: dict[str, Any], default: int) -> dict[str, Any]:
    """`engine_kw` (for `vllm.LLM`) with `kv_cache_memory_bytes=default` on CPU when the
    caller set neither that nor `gpu_memory_utilization`."""
    chosen = any(
        engine_kw.get(k) is not None for k in ("kv_cache_memory_bytes", "gpu_memory_utilization")
    )
    if chosen or not is_cpu():
        return dict(engine_kw)
    return {**engine_kw, "kv_cache_memory_bytes": default}


def has_flag(argv: Sequence[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def cpu_kv_flags(argv: Sequence[str], default: int) -> list[str]:
    """Flags to append to a vLLM command line: the default budget on CPU, when `argv`
    sets neither budget flag."""
    if has_flag(argv, *BUDGET_FLAGS) or not is_cpu():
        return []
    return ["--kv-cache-memory-bytes", str(default)]


def start_failure_hint(default: int | None) -> str:
    """What to say when an engine did not start: which flag sets its memory."""
    if not is_cpu():
        return (
            "if the engine ran out of memory, lower --gpu-memory-utilization or "
            "--max-model-len, or set --kv-cache-memory-bytes"
        )
    used = f" (steerserve's default here: {default // MiB} MiB)" if default else ""
    return (
        "on vLLM's CPU backend the KV cache is reserved from RAM: set "
        f"--kv-cache-memory-bytes{used} to what fits beside other processes, and "
        "--max-model-len to what that budget holds; --gpu-memory-utilization is the share "
        "of the NUMA node's RAM and fails when that much is not free"
    )
