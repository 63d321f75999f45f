"""A server with keys, presets, a default spec and limits; ends by killing its engine."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import numpy as np
import psutil
import pytest
from live_server import live_server
from test_server import MODEL, PROMPT, api_error, client, complete, offline, server_args

API_KEY, ADMIN_KEY = "k-user", "k-admin"
DEFAULT = {"vectors": [{"name": "happy", "scale": 0.5}]}
PRESETS = {
    "calm": {
        "vectors": [{"name": "happy_gguf", "scale": -1.0}],
        "heads": [{"layer": 1, "heads": [2]}],
    },
    "loud": {"vectors": [{"name": "happy", "layers": [2], "scale": 2.0}]},
}
OWN = {"data": {"3": (np.random.default_rng(8).standard_normal(128) * 4).tolist()}}


@pytest.fixture(scope="module")
def configured(model_dirs, vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("configured")
    (d / "presets.yaml").write_text(json.dumps(PRESETS))  # JSON is YAML
    args = [
        *server_args(model_dirs["llama"], vectors_dir),
        "--api-key",
        API_KEY,
        "--admin-key",
        ADMIN_KEY,
        "--presets",
        str(d / "presets.yaml"),
        "--default-steering",
        json.dumps(DEFAULT),
        "--max-request-body-bytes",
        "100000",
        "--max-inline-floats",
        "300",
        "--max-num-queued-reqs",
        "2",
    ]
    # Keep serving (503) after the engine dies, instead of exiting, so the test can look.
    env = {"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}
    with live_server(args, d / "serve.log", env=env) as (base, proc):
        yield base, proc


def test_keys(configured):
    base, _ = configured
    status, err = api_error(lambda: complete(client(base)))
    assert status == 401 and err["type"] == "AuthenticationError"
    assert api_error(lambda: complete(client(base, api_key="wrong")))[0] == 401
    assert complete(client(base, api_key=API_KEY))[1]
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # not guarded
    reload = f"{base}/v1/admin/reload"
    user = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(reload, headers=user, timeout=30).status_code == 401
    r = httpx.post(reload, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert r.status_code == 200 and r.json()["presets"] == ["calm", "loud"]


# Every route steerserve guards: (method, path, body, admin only). Bodies are small and
# mostly wrong on purpose: with the right key a route answers its own 2xx/4xx, never 401/403.
ROUTES = [
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "the cat", "max_tokens": 2}, False),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hé"}], "max_tokens": 2},
        False,
    ),
    ("GET", "/v1/models", None, False),
    ("GET", "/v1/vectors", None, False),
    ("GET", "/v1/vectors/happy", None, False),
    ("GET", "/v1/vectors/happy?format=safetensors", None, False),
    ("PUT", "/v1/vectors/auth_probe", b"", True),
    ("DELETE", "/v1/vectors/no_such_vector", None, True),
    ("GET", "/v1/presets", None, False),
    ("GET", "/v1/saes", None, False),
    ("GET", "/v1/saes/no_such_sae", None, False),
    ("PUT", "/v1/saes/auth_probe", b"", True),
    ("DELETE", "/v1/saes/no_such_sae", None, True),
    ("GET", "/v1/steering/capabilities", None, False),
    ("POST", "/v1/admin/reload", None, True),
    ("GET", "/v1/admin/experiments", None, True),
    ("POST", "/v1/admin/experiments", {}, True),
    ("GET", "/v1/admin/experiments/no_such", None, True),
    ("PUT", "/v1/admin/experiments/no_such", {}, True),
    ("POST", "/v1/admin/experiments/no_such/pause", {}, True),
    ("POST", "/v1/feedback", {"id": "chatcmpl-none", "metric": "thumbs", "value": True}, False),
    ("GET", "/v1/experiments/no_such/report", None, False),
]
KEYS = {"none": None, "user": API_KEY, "admin": ADMIN_KEY}


@pytest.mark.parametrize("key", sorted(KEYS))
@pytest.mark.parametrize(
    "method,path,body,admin_only", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES]
)
def test_every_route_checks_its_key(configured, method, path, body, admin_only, key):
    base, _ = configured
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if KEYS[key] else {}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.request(method, f"{base}{path}", headers=headers, timeout=60, **kw)
    refused = key == "none" or (admin_only and key == "user")
    if refused:
        err = r.json()["error"]
        assert r.status_code == 401 and err["type"] == "AuthenticationError", r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert ("admin key" if admin_only else "API key") in err["message"]
    else:
        assert r.status_code not in (401, 403) and r.status_code < 500, (r.status_code, r.text)
        if r.status_code >= 400:  # the route's own refusal, in OpenAI's shape
            assert r.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/health", "/metrics", "/playground", "/openapi.json"])
def test_outside_v1_needs_no_key(configured, path):
    assert httpx.get(f"{configured[0]}{path}", timeout=30).status_code == 200


@pytest.mark.parametrize(
    "steering, composed",
    [
        (None, [*DEFAULT["vectors"]]),
        (
            {"preset": "calm"},
            {
                "vectors": [*DEFAULT["vectors"], *PRESETS["calm"]["vectors"]],
                "heads": PRESETS["calm"]["heads"],
            },
        ),
        (
            {"preset": "loud", "vectors": [OWN]},
            {"vectors": [*DEFAULT["vectors"], *PRESETS["loud"]["vectors"], OWN]},
        ),
        ({"default": False, "preset": "calm"}, PRESETS["calm"]),
        ({"default": False, "vectors": [OWN]}, {"vectors": [OWN]}),
        ({"default": False}, None),
    ],
)
def test_default_and_presets_compose_as_documented(configured, engines, steering, composed):
    """default spec, then the preset, then the request's own entries (README)."""
    base, _ = configured
    if isinstance(composed, list):
        composed = {"vectors": composed}
    r, tokens, logprobs = complete(client(base, api_key=API_KEY), steering)
    want = offline(engines, composed)
    assert tokens == want.tokens
    np.testing.assert_allclose(logprobs, want.logprobs, atol=1e-4)
    echo = r.model_extra["steering"]
    assert echo["default"] == (steering is None or steering.get("default", True))
    assert echo["preset"] == (steering or {}).get("preset")
    assert (echo["fingerprint"] is None) == (composed is None)


def test_presets_route_and_unknown_preset(configured):
    base, _ = configured
    auth = {"Authorization": f"Bearer {API_KEY}"}
    p = httpx.get(f"{base}/v1/presets", headers=auth, timeout=30).json()
    assert {x["id"]: x["spec"] for x in p["data"]} == PRESETS and p["default"] == DEFAULT
    status, err = api_error(lambda: complete(client(base, api_key=API_KEY), {"preset": "nope"}))
    assert status == 404 and err["param"] == "steering.preset" and "calm" in err["message"]


def test_oversized_body_and_inline_vector_are_413(configured):
    base, _ = configured
    c = client(base, api_key=API_KEY)
    status, err = api_error(
        lambda: c.chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "the cat " * 20000}]
        )
    )
    assert status == 413 and "100000" in err["message"]
    three_layers = {"data": {str(i): [0.1] * 128 for i in range(3)}}  # 384 > 300 floats
    status, err = api_error(lambda: complete(c, {"vectors": [three_layers]}))
    assert status == 413 and err["param"] == "steering.vectors[0].data", err
    assert complete(c, {"vectors": [{"data": {"1": [0.1] * 128}}]})[1]  # 128 floats: fine


def test_queue_over_limit_is_503(configured):
    base, _ = configured
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 1000,
        "ignore_eos": True,
        "stream": True,
    }
    auth = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=60, headers=auth) as http:
        http.get(f"{base}/health")
        streams = [http.stream("POST", f"{base}/v1/completions", json=body) for _ in range(2)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200, 200]
            # Headers go out before vLLM adds the engine request: wait for each one's tokens.
            # (Keep the line iterators: a dropped one closes its stream, and the server
            # rightly aborts the request.)
            lines = [r.iter_lines() for r in responses]
            assert all(next(it).startswith("data: {") for it in lines)
            r = http.post(f"{base}/v1/completions", json={**body, "stream": False})
            assert r.status_code == 503 and r.json()["error"]["code"] == 503
            r = http.post(f"{base}/v1/completions", json=body)  # streamed: refused up front
            assert r.status_code == 503
        finally:
            for s in streams:
                s.__exit__(None, None, None)


def test_dead_engine_is_503_and_health_says_so(configured):
    """Last test of the module: it kills the engine."""
    base, proc = configured
    for child in psutil.Process(proc.pid).children(recursive=True):
        os.kill(child.pid, signal.SIGKILL)
    deadline = time.time() + 60
    while httpx.get(f"{base}/health", timeout=30).status_code != 503:
        assert time.time() < deadline, "/health still reports a live engine"
        time.sleep(0.5)
    status, err = api_error(lambda: complete(client(base, api_key=API_KEY)))
    assert status == 503 and "engine" in err["message"]
