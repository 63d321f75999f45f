"""Start `steerserve serve` as a subprocess on loopback and wait until it answers /health."""

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
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) of a server started with `steerserve serve ARGS`."""
    port = free_port()
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    # The test session runs engines in-process; a server runs vLLM's default layout.
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # Each server keeps its experiment store next to its log, never in the work tree.
    if "--database-url" not in args:
        full_env["STEERSERVE_DATABASE_URL"] = f"sqlite:///{log.parent / 'steerserve.db'}"
    # Its own process group (so `stop` can kill the engine processes with it) but not its own
    # session: with Linux's autogroup scheduling, a vLLM CPU server in a new session streams
    # in bursts (stalls of 1-4 s, seen with plain vLLM too), which made disconnects race.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1",
             "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env=full_env, process_group=0,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()[-4000:]}")
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


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must all match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
