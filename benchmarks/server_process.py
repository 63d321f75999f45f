"""Start an HTTP server (steerserve or plain vLLM) as a subprocess on loopback, wait until
it answers /health, and stop it with its engine processes. Used by the tests and the
serving benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steerserve_command(args: list[str], port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


def vllm_command(model: str, args: list[str], port: int) -> list[str]:
    """`vllm serve MODEL ARGS` (through vllm_cli.py, which also runs on the CPU wheel)."""
    return [
        sys.executable,
        str(Path(__file__).with_name("vllm_cli.py")),
        "serve",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]


@contextlib.contextmanager
def running_server(
    command: list[str],
    port: int,
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) of `command` (serving on `port`) once /health answers."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    # An in-process caller (the tests) sets this for its own engines; a server runs vLLM's
    # default layout.
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # Its own process group (so `stop` can kill the engine processes with it) but not its own
    # session: with Linux's autogroup scheduling, a vLLM CPU server in a new session streams
    # in bursts (stalls of 1-4 s, seen with plain vLLM too).
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=full_env, process_group=0
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerFailed(
                    f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise ServerFailed(f"server did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
