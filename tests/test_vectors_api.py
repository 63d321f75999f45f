"""The vectors API of a live server: upload (safetensors or GGUF), use without restart,
download, replace, delete while a request that uses the vector is running."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from conftest import HIDDEN, NUM_LAYERS, random_vector
from live_server import live_server
from test_server import MODEL, PROMPT, client, complete, server_args

from steering.vectors import (
    SteeringVector,
    export_gguf,
    import_gguf,
    load_vector,
    save_vector,
)

ADMIN = "k-vectors"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def vec_server(model_dirs, vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("vectors_api")
    vdir = d / "vectors"  # its own copy: this server writes into it
    shutil.copytree(vectors_dir, vdir)
    args = [*server_args(model_dirs["llama"], vdir), "--admin-key", ADMIN]
    with live_server(args, d / "serve.log") as (base, _):
        yield base, vdir


def _file(tmp_path, directions: dict[int, np.ndarray], fmt: str, hidden: int = HIDDEN) -> bytes:
    # GGUF control vectors carry no layer count (as llama.cpp writes them).
    vector = SteeringVector(
        directions=directions,
        hidden_size=hidden,
        architecture="LlamaForCausalLM",
        num_layers=None if fmt == "gguf" else NUM_LAYERS,
        method="test",
    )
    path = tmp_path / f"upload.{fmt}"
    (export_gguf if fmt == "gguf" else save_vector)(vector, path)
    return path.read_bytes()


def _put(base: str, name: str, data: bytes, headers: dict | None = ADMIN_H) -> httpx.Response:
    return httpx.put(f"{base}/v1/vectors/{name}", content=data, headers=headers, timeout=60)


def test_upload_then_steer_without_restart(vec_server, tmp_path):
    base, vdir = vec_server
    v = random_vector(41)
    data = _file(tmp_path, {1: v}, "safetensors")
    assert _put(base, "fresh", data, headers=None).status_code == 401  # the admin's
    r = _put(base, "fresh", data)
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [1] and r.json()["usable"] and r.json()["replaced"] is False
    assert np.array_equal(load_vector(vdir / "fresh.safetensors").directions[1], v)  # on disk
    c = client(base)
    named, tokens, logprobs = complete(c, {"vectors": [{"name": "fresh"}]})
    inline, tokens2, logprobs2 = complete(c, {"vectors": [{"data": {"1": v.tolist()}}]})
    assert tokens == tokens2 and logprobs == logprobs2
    assert (
        named.model_extra["steering"]["fingerprint"]
        == inline.model_extra["steering"]["fingerprint"]
    )
    assert complete(c)[1] != tokens  # it steers
    listed = httpx.get(f"{base}/v1/vectors", timeout=30).json()["data"]
    assert "fresh" in [v["id"] for v in listed]


def test_replace_with_gguf_and_download_both_formats(vec_server, tmp_path):
    base, vdir = vec_server
    w = {1: random_vector(42), 2: random_vector(43)}
    _put(base, "swap", _file(tmp_path, {1: random_vector(44)}, "safetensors"))
    r = _put(base, "swap", _file(tmp_path, w, "gguf"))
    assert r.status_code == 200 and r.json()["replaced"] is True, r.text
    assert (vdir / "swap.gguf").exists() and not (vdir / "swap.safetensors").exists()
    got = httpx.get(f"{base}/v1/vectors/swap", timeout=30).json()
    assert got["layers"] == [1, 2] and got["id"] == "swap"
    for fmt, read in (("gguf", import_gguf), ("safetensors", load_vector)):
        r = httpx.get(f"{base}/v1/vectors/swap", params={"format": fmt}, timeout=30)
        assert r.status_code == 200
        path = tmp_path / f"down.{fmt}"
        path.write_bytes(r.content)
        back = read(path)
        assert all(np.array_equal(back.directions[k], w[k]) for k in w)


@pytest.mark.parametrize(
    "name, make, status, param, words",
    [
        (
            "narrow",
            lambda t: _file(t, {1: random_vector(1)[:64]}, "safetensors", 64),
            400,
            None,
            "hidden",
        ),
        ("deep", lambda t: _file(t, {9: random_vector(1)}, "gguf"), 400, None, "layer"),
        ("junk", lambda t: b"not a vector file at all", 400, None, "junk.safetensors"),
        ("empty", lambda t: b"", 400, None, "body"),
        ("bad name!", lambda t: _file(t, {1: random_vector(1)}, "gguf"), 400, "name", "name"),
    ],
)
def test_bad_uploads_are_refused_and_nothing_is_written(
    vec_server, tmp_path, name, make, status, param, words
):
    base, vdir = vec_server
    before = sorted(p.name for p in vdir.iterdir())
    r = _put(base, name, make(tmp_path))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert sorted(p.name for p in vdir.iterdir()) == before
    assert httpx.get(f"{base}/v1/vectors/{name}", timeout=30).status_code == 404


def test_delete_while_a_request_uses_it(vec_server, tmp_path):
    base, vdir = vec_server
    admin = {"Authorization": f"Bearer {ADMIN}"}
    _put(base, "gone", _file(tmp_path, {1: random_vector(45)}, "safetensors"))
    experiment = {
        "name": "uses-gone",
        "arms": [{"name": "x", "steering": {"vectors": [{"name": "gone"}]}}],
    }
    r = httpx.post(f"{base}/v1/admin/experiments", json=experiment, headers=admin, timeout=30)
    assert r.status_code == 201
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 600,
        "ignore_eos": True,
        "temperature": 0,
        "steering": {"vectors": [{"name": "gone"}]},
    }
    whole = httpx.post(f"{base}/v1/completions", json=body, timeout=120).json()
    text = ""
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}) as s,
    ):
        lines = s.iter_lines()
        first = next(line for line in lines if line)
        text += json.loads(first[6:])["choices"][0]["text"]
        r = http.delete(f"{base}/v1/vectors/gone", headers=admin)
        assert r.status_code == 200 and r.json()["deleted"] is True
        for line in lines:
            if line.startswith("data: {"):
                text += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
    assert text == whole["choices"][0]["text"]  # the running request kept its vector
    assert not (vdir / "gone.safetensors").exists()
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and "unknown vector 'gone'" in r.json()["error"]["message"]
    r = httpx.post(
        f"{base}/v1/completions",
        timeout=60,
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "experiment": "uses-gone"},
    )
    assert r.status_code == 503 and "unknown vector 'gone'" in r.json()["error"]["message"]
    assert httpx.delete(f"{base}/v1/vectors/gone", headers=admin, timeout=30).status_code == 404
