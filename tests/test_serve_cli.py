"""What `make serve` runs: `steerserve serve` with no model serves the demo model and its
shipped vectors, and answers a steered chat request from the openai client."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from live_server import live_server

from server.demo import DEMO_MODEL, SHIPPED_VECTORS_DIR, demo_vectors
from steering.tiny_models import TinySpec, build_tiny_model
from steering.vectors import read_any


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    log = tmp_path_factory.mktemp("log") / "serve.log"
    args = ["--enforce-eager", "--dtype", "float32"]
    with live_server(args, log, env={"STEERSERVE_CACHE": str(cache)}) as (base, _):
        yield base


def test_demo_server_answers_steered_chat(demo_server):
    c = openai.OpenAI(base_url=f"{demo_server}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "tell me about the river"}]
    kw = dict(model=DEMO_MODEL, messages=messages, max_tokens=12, temperature=0)
    plain = c.chat.completions.create(**kw).choices[0].message.content
    steered = c.chat.completions.create(
        **kw, extra_body={"steering": {"vectors": [{"name": "happy", "scale": 12}]}}
    )
    text = steered.choices[0].message.content
    # The README's example: the demo vector makes the model say its word.
    assert text.count("happy") >= 6 and plain.count("happy") <= 1
    assert steered.model_extra["steering"]["vectors"] == ["happy"]
    vectors = {v["id"]: v for v in c.get("/vectors", cast_to=object)["data"]}
    assert vectors.keys() >= {"happy", "calm"} and vectors["happy"]["usable"]


def test_shipped_demo_vectors_match_the_demo_model(tmp_path):
    """vectors/*.safetensors are what `python -m server.demo` makes from a fresh build."""
    model = build_tiny_model(tmp_path / DEMO_MODEL, TinySpec(arch="llama"))
    for name, fresh in demo_vectors(model).items():
        shipped = read_any(SHIPPED_VECTORS_DIR / f"{name}.safetensors")
        assert shipped.layers == fresh.layers
        for layer in fresh.layers:
            np.testing.assert_array_equal(shipped.directions[layer], fresh.directions[layer])
