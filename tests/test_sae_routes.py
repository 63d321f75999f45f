"""The SAE routes of a live server: list, describe, one feature, download, upload (our
format, Gemma Scope, a zipped SAELens directory), replace, delete, the admin key, and the
refusals with the reason and field they name."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import HIDDEN, NUM_LAYERS
from live_server import live_server
from safetensors.numpy import save_file
from test_sae_topk import _assert_same_top
from test_server import MESSAGES, MODEL, PROMPT, _joined, client, complete, server_args

from steering.sae import SaeRegistry, SparseAutoencoder, load_sae, save_sae
from steering.spec import ModelShape

ADMIN = "k-saes"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
WIDTH = 96


def _weights(seed: int, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "W_enc": rng.standard_normal((hidden, WIDTH)),
        "b_enc": rng.standard_normal(WIDTH),
        "W_dec": rng.standard_normal((WIDTH, hidden)),
        "b_dec": rng.standard_normal(hidden),
        "threshold": rng.uniform(0.1, 1.0, WIDTH),
    }
    return {k: v.astype(np.float32) for k, v in w.items()}


def _ours(seed: int, layer: int = 1, hidden: int = HIDDEN, **kw) -> SparseAutoencoder:
    w = _weights(seed, hidden)
    return SparseAutoencoder(
        w["W_enc"],
        w["b_enc"],
        w["W_dec"],
        w["b_dec"],
        layer=layer,
        activation="jumprelu",
        threshold=w["threshold"],
        **kw,
    )


def _ours_bytes(tmp_path: Path, seed: int, **kw) -> bytes:
    return save_sae(_ours(seed, **kw), tmp_path / f"sae{seed}.safetensors").read_bytes()


def _npz_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **_weights(seed))
    return buf.getvalue()


def _saelens_zip(tmp_path: Path, hook: str, k: int = 4) -> bytes:
    """An SAELens v6 TopK SAE directory (cfg.json + sae_weights.safetensors), zipped."""
    d = tmp_path / "lens"
    d.mkdir(exist_ok=True)
    w = {k_: v for k_, v in _weights(11).items() if k_ != "threshold"}
    save_file(w, str(d / "sae_weights.safetensors"))
    cfg = {
        "architecture": "topk",
        "d_in": HIDDEN,
        "d_sae": WIDTH,
        "k": k,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"model_name": "tiny-llama", "hook_name": hook},
    }
    (d / "cfg.json").write_text(json.dumps(cfg))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in ("cfg.json", "sae_weights.safetensors"):
            z.write(d / f, f"lens/{f}")
    return buf.getvalue()


@pytest.fixture(scope="module")
def sae_server(model_dirs, vectors_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_routes")
    saes = d / "saes"  # this server's own: it writes into it
    saes.mkdir()
    save_sae(_ours(1, labels={3: "rivers", 7: "cats"}), saes / "preloaded.safetensors")
    (saes / "broken.safetensors").write_bytes(b"not an SAE")
    args = [
        *server_args(model_dirs["llama"], vectors_dir),
        "--admin-key",
        ADMIN,
        "--saes-dir",
        str(saes),
        # Top-k readout without --enable-steering-readout: it needs no projection tables.
        "--steering-topk-sae",
        "preloaded",
        # Conditions (tests at the end of this module).
        "--max-steering-dynamic",
        "2",
        "--max-steering-conditions",
        "2",
    ]
    with live_server(args, d / "serve.log") as (base, _):
        yield base, saes


def _put(base: str, name: str, data: bytes, headers: dict | None = ADMIN_H, **params):
    return httpx.put(
        f"{base}/v1/saes/{name}", content=data, headers=headers, params=params, timeout=60
    )


def _get(base: str, path: str, **params) -> httpx.Response:
    return httpx.get(f"{base}{path}", params=params, timeout=30)


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_list_describes_preloaded_and_reports_skipped_files(sae_server):
    base, _ = sae_server
    listed = _get(base, "/v1/saes").json()
    assert listed["object"] == "list"
    assert "broken.safetensors" in listed["skipped_files"]
    assert "not a readable safetensors file" in listed["skipped_files"]["broken.safetensors"]
    (pre,) = [s for s in listed["data"] if s["id"] == "preloaded"]
    assert pre == _get(base, "/v1/saes/preloaded").json()
    sae = _ours(1)
    assert pre["object"] == "steering.sae"
    assert (pre["layer"], pre["hidden_size"], pre["width"]) == (1, HIDDEN, WIDTH)
    assert (pre["activation"], pre["k"], pre["source_format"]) == ("jumprelu", None, "steerserve")
    assert pre["labels"] == {"3": "rivers", "7": "cats"}
    assert pre["usable"] is True and pre["problem"] is None
    assert pre["threshold"]["max"] == pytest.approx(float(sae.threshold.max()))
    err = _error(_get(base, "/v1/saes/broken"), 404)
    assert err["param"] == "name" and "failed to load (broken.safetensors: " in err["message"]
    err = _error(_get(base, "/v1/saes/nope"), 404)
    assert err["param"] == "name" and "unknown SAE 'nope'" in err["message"]


def test_feature_route_matches_the_sae(sae_server):
    base, _ = sae_server
    sae = _ours(1)
    r = _get(base, "/v1/saes/preloaded/features/3")
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["id"], got["object"], got["feature"]) == (
        "preloaded",
        "steering.sae.feature",
        3,
    )
    assert got["label"] == "rivers" and got["typical"] is None
    assert got["encoder_offset"] == pytest.approx(sae.encoder_offset(3), rel=1e-6)
    assert got["threshold"] == pytest.approx(sae.feature_threshold(3))
    assert got["decoder_norm"] == pytest.approx(float(np.linalg.norm(sae.w_dec[3])), rel=1e-6)
    # Neighbours: the 10 other features with the most similar decoder directions.
    dec = sae.w_dec.astype(np.float64)
    cos = dec @ dec[3] / (np.linalg.norm(dec, axis=1) * np.linalg.norm(dec[3]))
    cos[3] = -np.inf
    want = np.argsort(-cos)[:10]
    assert [n["feature"] for n in got["neighbours"]] == want.tolist()
    assert [n["cosine"] for n in got["neighbours"]] == pytest.approx(cos[want].tolist())
    labelled = [n for n in got["neighbours"] if n["feature"] == 7]
    assert all(n["label"] == "cats" for n in labelled)
    for feature in (WIDTH, -1):
        err = _error(_get(base, f"/v1/saes/preloaded/features/{feature}"), 404)
        assert err["param"] == "feature" and "out of range" in err["message"]
    err = _error(_get(base, "/v1/saes/preloaded/features/abc"), 400)
    assert "feature" in err["param"]
    assert _error(_get(base, "/v1/saes/nope/features/1"), 404)["param"] == "name"


def test_put_ours_replace_and_download(sae_server, tmp_path):
    base, saes = sae_server
    data = _ours_bytes(tmp_path, 21, labels={5: "five"}, description="first")
    r = _put(base, "mine", data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["replaced"] is False and body["usable"] and body["description"] == "first"
    assert body["labels"] == {"5": "five"}
    assert (saes / "mine.safetensors").exists()
    r = _put(base, "mine", _ours_bytes(tmp_path, 22, layer=2, description="second"))
    assert r.status_code == 200 and r.json()["replaced"] is True, r.text
    assert r.json()["layer"] == 2 and r.json()["description"] == "second"
    r = _get(base, "/v1/saes/mine", format="safetensors")
    assert r.status_code == 200
    assert r.headers["content-disposition"] == 'attachment; filename="mine.safetensors"'
    down = tmp_path / "down.safetensors"
    down.write_bytes(r.content)
    back, sent = load_sae(down), _ours(22, layer=2)
    for key in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"):
        np.testing.assert_array_equal(getattr(back, key), getattr(sent, key), err_msg=key)
    assert (back.layer, back.description) == (2, "second")
    assert _error(_get(base, "/v1/saes/mine", format="gguf"), 400)


def test_put_gemma_scope_npz_needs_a_layer(sae_server):
    base, saes = sae_server
    data = _npz_bytes(31)
    err = _error(_put(base, "gemma", data), 400)
    assert "do not record their layer" in err["message"] and "/tmp" not in err["message"]
    err = _error(_put(base, "gemma", data, layer=NUM_LAYERS), 400)
    assert err["param"] == "layer" and f"the model has {NUM_LAYERS} layers" in err["message"]
    err = _error(_put(base, "gemma", data, layer=-1), 400)
    assert "layer" in err["param"]
    assert not any(p.name.startswith("gemma") for p in saes.iterdir())
    r = _put(base, "gemma", data, layer=2)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["layer"], body["activation"], body["source_format"]) == (
        2,
        "jumprelu",
        "gemma-scope",
    )
    assert body["subtract_b_dec"] is False
    w = _weights(31)
    assert body["threshold"]["min"] == pytest.approx(float(w["threshold"].min()))
    stored = load_sae(saes / "gemma.safetensors")
    np.testing.assert_array_equal(stored.w_enc, w["W_enc"])
    assert stored.layer == 2 and stored.source_format == "gemma-scope"


def test_put_zipped_saelens_directory(sae_server, tmp_path):
    base, saes = sae_server
    r = _put(base, "lens", _saelens_zip(tmp_path, "blocks.3.hook_resid_pre", k=4))
    assert r.status_code == 201, r.text
    body = r.json()
    # resid_pre of block 3 is the stream after decoder layer 2.
    assert (body["layer"], body["activation"], body["k"]) == (2, "topk", 4)
    assert (body["source_format"], body["architecture"]) == ("saelens", "tiny-llama")
    assert body["threshold"] is None
    assert load_sae(saes / "lens.safetensors").k == 4


def test_bad_uploads_are_refused_and_nothing_is_written(sae_server, tmp_path):
    base, saes = sae_server
    before = sorted(p.name for p in saes.iterdir())
    err = _error(_put(base, "narrow", _ours_bytes(tmp_path, 41, hidden=64)), 400)
    assert f"reads hidden size 64, the model has {HIDDEN}" in err["message"]
    err = _error(_put(base, "deep", _ours_bytes(tmp_path, 42, layer=NUM_LAYERS)), 400)
    assert f"reads layer {NUM_LAYERS}, the model has {NUM_LAYERS} layers" in err["message"]
    err = _error(_put(base, "deep", _saelens_zip(tmp_path, "blocks.9.hook_resid_post")), 400)
    assert "reads layer 9" in err["message"]
    err = _error(_put(base, "attn", _saelens_zip(tmp_path, "blocks.1.attn.hook_z")), 400)
    assert "not a residual-stream hook" in err["message"]
    err = _error(_put(base, "junk", b"not an SAE file at all"), 400)
    assert "not a readable safetensors file" in err["message"]
    assert "body" in _error(_put(base, "empty", b""), 400)["message"]
    assert _error(_put(base, "bad name!", _npz_bytes(1), layer=1), 400)["param"] == "name"
    assert sorted(p.name for p in saes.iterdir()) == before
    for name in ("narrow", "deep", "attn", "junk", "empty"):
        assert _get(base, f"/v1/saes/{name}").status_code == 404


def test_writes_take_the_admin_key(sae_server, tmp_path):
    base, saes = sae_server
    data = _ours_bytes(tmp_path, 51)
    wrong = {"Authorization": "Bearer not-the-key"}
    for headers in (None, wrong):
        assert _put(base, "guarded", data, headers=headers).status_code == 401
    assert not (saes / "guarded.safetensors").exists()
    assert _put(base, "guarded", data).status_code == 201
    for headers in (None, wrong):
        r = httpx.delete(f"{base}/v1/saes/guarded", headers=headers, timeout=30)
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
    assert (saes / "guarded.safetensors").exists()
    # Reads take no admin key.
    assert _get(base, "/v1/saes/guarded").status_code == 200


def test_delete(sae_server, tmp_path):
    base, saes = sae_server
    assert _put(base, "doomed", _ours_bytes(tmp_path, 61)).status_code == 201
    r = httpx.delete(f"{base}/v1/saes/doomed", headers=ADMIN_H, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "doomed", "object": "steering.sae", "deleted": True}
    assert not (saes / "doomed.safetensors").exists()
    assert _get(base, "/v1/saes/doomed").status_code == 404
    assert "doomed" not in [s["id"] for s in _get(base, "/v1/saes").json()["data"]]
    err = _error(httpx.delete(f"{base}/v1/saes/doomed", headers=ADMIN_H, timeout=30), 404)
    assert err["param"] == "name" and "unknown SAE 'doomed'" in err["message"]
    # "." and ".." name the directory and its parent, never an SAE.
    # (httpx sends %2E as is; the server decodes it, so the route sees "." and "..".)
    for name, decoded in (("%2E", "."), ("%2E%2E", "..")):
        r = httpx.delete(f"{base}/v1/saes/{name}", headers=ADMIN_H, timeout=30)
        assert f"unknown SAE '{decoded}'" in _error(r, 404)["message"]
    assert saes.is_dir() and (saes / "preloaded.safetensors").exists()


def test_stored_saes_survive_a_reload(sae_server, tmp_path):
    base, saes = sae_server
    sent = _ours(71, labels={0: "zero"})
    data = save_sae(sent, tmp_path / "kept.safetensors").read_bytes()
    assert _put(base, "kept", data).status_code == 201
    # What the server wrote is what a registry reading that directory serves.
    fresh = SaeRegistry(saes)
    kept = fresh.lookup("kept", ModelShape("LlamaForCausalLM", NUM_LAYERS, HIDDEN, 4, 2, 64))
    np.testing.assert_array_equal(kept.w_dec, sent.w_dec)
    assert kept.labels == {0: "zero"} and kept.layer == 1
    assert "broken.safetensors" in fresh.errors
    # A file dropped into the directory is served after the reload, and the reload
    # reports what it skipped.
    save_sae(_ours(72), saes / "dropped.safetensors")
    assert _get(base, "/v1/saes/dropped").status_code == 404
    r = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN_H, timeout=30)
    assert r.status_code == 200, r.text
    assert {"kept", "dropped"} <= set(r.json()["saes"])
    assert "broken.safetensors" in r.json()["skipped_sae_files"]
    assert _get(base, "/v1/saes/kept").json()["labels"] == {"0": "zero"}
    assert _get(base, "/v1/saes/dropped").status_code == 200


def test_sae_writes_are_admin_routes_in_the_middleware():
    """Without --admin-key, SAE writes are off (403) and reads pass (no live server)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from server.middleware import Authenticate

    async def ok(_request):
        return PlainTextResponse("ok")

    routes = [Route("/v1/saes/{name}", ok, methods=["GET", "PUT", "DELETE"])]
    app = Authenticate(Starlette(routes=routes), api_keys=[], admin_key=None)
    client = TestClient(app)
    assert client.put("/v1/saes/x", content=b"x").status_code == 403
    assert client.delete("/v1/saes/x").status_code == 403
    assert "--admin-key" in client.delete("/v1/saes/x").json()["error"]["message"]
    assert client.get("/v1/saes/x").status_code == 200


def test_openapi_describes_the_upload(sae_server):
    base, _ = sae_server
    schema = _get(base, "/openapi.json").json()
    put = schema["paths"]["/v1/saes/{name}"]["put"]
    body = put["requestBody"]["content"]["application/octet-stream"]["schema"]
    assert body == {"type": "string", "format": "binary"}
    assert "Gemma Scope" in put["requestBody"]["description"]
    assert "layer" in [p["name"] for p in put["parameters"] if p["in"] == "query"]
    feature = schema["paths"]["/v1/saes/{name}/features/{feature}"]["get"]
    (param,) = [p for p in feature["parameters"] if p["name"] == "feature"]
    assert param["schema"]["type"] == "integer"


# --- top-k readout (the server's top-k SAE is `preloaded`) -------------------------------

TOPK = {"readout": [{"sae": "preloaded", "top_k": 4, "prompt": True}]}


def test_topk_readout_over_http_equals_the_reference(sae_server, engines):
    base, saes = sae_server
    r, tokens, _ = complete(client(base), TOPK, max_tokens=6)
    (item,) = r.choices[0].model_extra["readout"]
    assert (item["sae"], item["top_k"], item["layer"]) == ("preloaded", 4, 1)
    assert len(item["values"]) == 6 and len(item["prompt_values"]) == len(PROMPT)
    ref = engines.reference("llama")
    spec = ref.spec(TOPK, saes=SaeRegistry(saes), topk_sae="preloaded", max_topk=64)
    want = ref.topk_readout(PROMPT + tokens[:-1], len(PROMPT), spec)
    for i, pairs in enumerate(item["prompt_values"] + item["values"][1:]):
        _assert_same_top([tuple(p) for p in pairs], want[i], f"row {i}")
    assert max(len(p) for p in item["values"]) == 4
    assert r.model_extra["steering"]["readout"] == [{"sae": "preloaded", "top_k": 4, "layer": 1}]


def test_streamed_topk_readout_joins_to_the_non_streamed_one(sae_server):

    base = sae_server[0]
    c = client(base)
    extra = {"ignore_eos": True, "steering": TOPK}
    kw = dict(model=MODEL, max_tokens=8, temperature=0.9, seed=3, n=2, extra_body=extra)
    full = c.chat.completions.create(messages=MESSAGES, **kw)
    chunks = list(c.chat.completions.create(messages=MESSAGES, stream=True, **kw))
    for choice in full.choices:
        (want,) = choice.model_extra["readout"]
        (got,) = _joined(chunks, choice.index)
        assert len(want["values"]) == 8 and None not in want["values"]
        for g, w in zip(
            got["values"] + got["prompt_values"],
            want["values"] + want["prompt_values"],
            strict=True,
        ):
            _assert_same_top([tuple(p) for p in g], [tuple(p) for p in w], "streamed")
    caps = httpx.get(f"{base}/v1/steering/capabilities", timeout=30).json()
    assert caps["fields"]["readout"]["top_k"] == {
        "sae": "preloaded",
        "max_k": 64,
        "layer": 1,
        "width": WIDTH,
    }


def test_the_topk_sae_cannot_be_replaced_or_deleted(sae_server, tmp_path):
    base, saes = sae_server
    before = (saes / "preloaded.safetensors").read_bytes()
    err = _error(_put(base, "preloaded", _ours_bytes(tmp_path, 71)), 409)
    assert err["param"] == "name" and "--steering-topk-sae" in err["message"]
    err = _error(httpx.delete(f"{base}/v1/saes/preloaded", headers=ADMIN_H, timeout=30), 409)
    assert err["param"] == "name" and "restart the server" in err["message"]
    assert (saes / "preloaded.safetensors").read_bytes() == before


def test_reload_keeps_the_topk_sae_the_engine_holds(sae_server, tmp_path):
    """A changed file under the top-k SAE's name is reported by a reload, not served: the
    workers keep the SAE they loaded at start, and so does validation."""
    base, saes = sae_server
    path = saes / "preloaded.safetensors"
    original = path.read_bytes()
    before = _get(base, "/v1/saes/preloaded").json()
    try:
        save_sae(_ours(81, layer=2), path)
        r = httpx.post(f"{base}/v1/admin/reload", headers=ADMIN_H, timeout=30)
        assert r.status_code == 200, r.text
        skipped = r.json()["skipped_sae_files"]
        assert "loaded at start" in skipped["preloaded (top-k SAE)"]
        assert _get(base, "/v1/saes/preloaded").json() == before  # still layer 1
        r, _, _ = complete(client(base), TOPK, max_tokens=3)
        assert r.choices[0].model_extra["readout"][0]["layer"] == 1
    finally:
        path.write_bytes(original)
        httpx.post(f"{base}/v1/admin/reload", headers=ADMIN_H, timeout=30)
    skipped = _get(base, "/v1/saes").json()["skipped_files"]
    assert "preloaded (top-k SAE)" not in skipped


def test_condition_reports_over_http(sae_server, engines):
    """A conditional request's echo carries each choice's condition value and whether it
    fired (the reference's value on the same prompt tokens); streams carry the same in
    their last event; a bad `when` is a 400 naming the field."""
    base = sae_server[0]
    c = client(base)
    ref = engines.reference("llama")
    prompt = [int(x) for x in np.random.default_rng(5).integers(10, 480, 30)]
    direction = np.random.default_rng(6).standard_normal(HIDDEN).tolist()
    behaviour = np.random.default_rng(7).standard_normal(HIDDEN) * 2
    steering = {
        "conditions": [
            {"name": "on", "data": direction, "layer": 1, "threshold": -1.0},
            {"name": "off", "data": direction, "layer": 2, "op": "<", "threshold": -1.0},
        ],
        "vectors": [
            {"data": {"1": behaviour.tolist()}, "positions": "generated", "when": "on and not off"}
        ],
    }
    want = ref.conditions(prompt, ref.spec(steering, max_dynamic=2, max_conditions=2))
    extra = {"ignore_eos": True, "steering": steering}
    kw = dict(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=1.0, seed=3, n=2, extra_body=extra
    )
    full = c.completions.create(**kw)
    echo = full.model_extra["steering"]["conditions"]
    assert echo["names"] == ["on", "off"]
    assert [ch["index"] for ch in echo["choices"]] == [0, 1]
    for ch in echo["choices"]:
        got = {r["name"]: r for r in ch["conditions"]}
        for name in ("on", "off"):
            assert got[name]["value"] == pytest.approx(want[name][0], abs=1e-4)
            assert got[name]["fired"] is want[name][1] is (name == "on")
            assert got[name]["decided"] is True
    last = [ch.model_extra.get("steering") for ch in c.completions.create(stream=True, **kw)]
    tail = [e for e in last if e and "choices" in e.get("conditions", {})]
    assert len(tail) == 1 and tail[0]["conditions"]["choices"] == echo["choices"]
    bad = {
        "conditions": steering["conditions"],
        "vectors": [{**steering["vectors"][0], "when": "on or nope"}],
    }
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "steering": bad},
        timeout=30,
    )
    err = _error(r, 400)
    assert "vectors[0].when" in err["message"] and "unknown condition 'nope'" in err["message"]
    caps = httpx.get(f"{base}/v1/steering/capabilities", timeout=30).json()
    assert caps["fields"]["conditions"]["max_entries"] == 2
    assert caps["fields"]["vectors"]["max_dynamic"] == 2


def test_token_condition_reports_over_http(sae_server, engines):
    """A token-level condition's echo: its value and decision at each generated token's
    sampling row (the reference's, on the tokens the server chose), in the response and
    the stream's last event; a gate acting before its condition's layer is a 400."""
    base = sae_server[0]
    c = client(base)
    ref = engines.reference("llama")
    prompt = [int(x) for x in np.random.default_rng(8).integers(10, 480, 20)]
    direction = np.random.default_rng(9).standard_normal(HIDDEN).tolist()
    behaviour = (np.random.default_rng(10).standard_normal(HIDDEN) * 2).tolist()
    steering = {
        "conditions": [
            {"name": "tok", "data": direction, "layer": 1, "reduce": "token", "threshold": 0.0}
        ],
        "vectors": [{"data": {"2": behaviour, "3": behaviour}, "when": "tok"}],
    }
    kw = dict(
        model=MODEL,
        prompt=prompt,
        max_tokens=6,
        temperature=0.0,
        extra_body={"ignore_eos": True, "steering": steering},
    )
    full = c.completions.create(**kw)
    [choice] = full.model_extra["steering"]["conditions"]["choices"]
    [report] = choice["conditions"]
    tokens = ref.greedy(prompt, 6, ref.spec(steering, max_dynamic=2, max_conditions=2))[0]
    spec = ref.spec(steering, max_dynamic=2, max_conditions=2)
    values = ref.token_conditions(prompt + tokens, len(prompt), spec)["tok"][len(prompt) - 1 : -1]
    assert report["name"] == "tok" and report["reduce"] == "token"
    np.testing.assert_allclose(report["values"], values, atol=1e-4)
    assert report["fired"] == [bool(v > 0.0) for v in values]
    assert report["fired_rate"] == pytest.approx(np.mean(values > 0.0))
    last = [ch.model_extra.get("steering") for ch in c.completions.create(stream=True, **kw)]
    tail = [e for e in last if e and "choices" in e.get("conditions", {})]
    assert len(tail) == 1 and tail[0]["conditions"]["choices"][0]["conditions"] == [report]
    early = {**steering, "vectors": [{**steering["vectors"][0], "data": {"1": behaviour}}]}
    r = httpx.post(
        f"{base}/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "steering": early},
        timeout=30,
    )
    err = _error(r, 400)
    assert "token condition 'tok' reads layer 1" in err["message"], err
