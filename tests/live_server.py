"""Start `steerserve serve` as a subprocess on loopback and wait until it answers /health."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.server_process import ServerFailed, free_port, running_server, steerserve_command


@contextlib.contextmanager
def live_server(
    args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield (base URL, process) of a server started with `steerserve serve ARGS`."""
    port = free_port()
    env = dict(env or {})
    # Each server keeps its experiment store next to its log, never in the work tree.
    if "--database-url" not in args and "STEERSERVE_DATABASE_URL" not in env:
        env["STEERSERVE_DATABASE_URL"] = f"sqlite:///{log.parent / 'steerserve.db'}"
    try:
        with running_server(steerserve_command(args, port), port, log, env, timeout) as up:
            yield up
    except ServerFailed as e:
        pytest.fail(str(e))


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (labels must all match)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None
