"""`steerserve serve` (what `make serve` runs) serves the demo model with steering over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import HIDDEN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ, STEERSERVE_CACHE=str(tmp_path_factory.mktemp("cache")))
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", str(port),
             "--host", "127.0.0.1", "--enforce-eager", "--dtype", "float32"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _complete(base: str, steering: dict | None):
    body = {"model": "demo-llama-tiny", "prompt": "the cat sees the dog", "max_tokens": 8,
            "temperature": 0, "logprobs": 1}  # fmt: skip
    if steering is not None:
        body["vllm_xargs"] = {"steering": json.dumps(steering)}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def _logprobs(response) -> list[float]:
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_steering_over_http(server):
    vec = (np.random.default_rng(5).standard_normal(HIDDEN) * 8).tolist()
    plain = _complete(server, None)
    assert plain.status_code == 200, plain.text
    steered = _complete(server, {"vectors": [{"data": {"1": vec}}]})
    assert steered.status_code == 200, steered.text
    lp = lambda r: r.json()["choices"][0]["logprobs"]["token_logprobs"]  # noqa: E731
    assert lp(steered) != lp(plain)
    assert (
        _complete(server, None).json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    )

    bad = _complete(server, {"vectors": [{"data": {"9": vec}}]})
    assert bad.status_code == 400, bad.text
    assert "steering.vectors[0].data" in bad.text and "out of range" in bad.text
    assert _complete(server, None).status_code == 200  # still serving
