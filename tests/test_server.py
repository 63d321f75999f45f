"""The OpenAI-compatible server, live on loopback, through the official `openai` client.

One server for the module, on the same tiny model and engine settings as the offline
engines of conftest, so that its answers can be compared with them token for token.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from conftest import BLOCK_SIZE, ENGINE_KW, MAX_BATCHED_TOKENS, generate_one, random_vector
from conftest import sampling as offline_sampling
from live_server import live_server, metric_value

from steering.engine.hooks import runtime_of

MODEL = "tiny"
ENGINE_FLAGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--seed",
    "0",
    "--max-model-len",
    str(ENGINE_KW["max_model_len"]),
    "--max-num-seqs",
    str(ENGINE_KW["max_num_seqs"]),
    "--max-num-batched-tokens",
    str(MAX_BATCHED_TOKENS),
    "--block-size",
    str(BLOCK_SIZE),
    "--enable-prefix-caching",
    "--kv-cache-memory-bytes",
    str(ENGINE_KW["kv_cache_memory_bytes"]),
    "--served-model-name",
    MODEL,
    "--enable-steering-decoding",
    "--enable-steering-readout",
]
PROMPT = [5, 17, 250, 33, 91, 12, 400, 8]
MESSAGES = [{"role": "user", "content": "the cat sees the dog near the river"}]


def server_args(model_dir, vectors_dir) -> list[str]:
    return ["--model", str(model_dir), "--vectors-dir", str(vectors_dir), *ENGINE_FLAGS]


@pytest.fixture(scope="module")
def server(model_dirs, vectors_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with live_server(server_args(model_dirs["llama"], vectors_dir), log) as (base, _):
        yield base


def client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
    )


def complete(c: openai.OpenAI, steering=None, prompt=PROMPT, max_tokens=8, **kw):
    """Greedy completion of token ids; returns (response, token ids, logprobs)."""
    extra = {"ignore_eos": True, "return_tokens_as_token_ids": True, **kw.pop("extra", {})}
    if steering is not None:
        extra["steering"] = steering
    r = c.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        extra_body=extra,
        **kw,
    )
    lp = r.choices[0].logprobs
    return r, [int(t.split(":")[1]) for t in lp.tokens], lp.token_logprobs


def offline(engines, spec, prompt=PROMPT, max_tokens=8):
    return generate_one(engines.get("llama"), prompt, offline_sampling(spec, max_tokens))


def _inline(seed: int, layer: int = 1, norm: float = 8.0) -> dict:
    return {"data": {str(layer): random_vector(seed, norm).tolist()}}


# --- plain OpenAI behaviour ----------------------------------------------------------------


def test_chat_stream_concatenates_to_non_streamed_and_usage_counts(server, model_dirs):
    from transformers import AutoTokenizer

    c = client(server)
    kw = dict(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = c.chat.completions.create(**kw)
    chunks = list(
        c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    tok = AutoTokenizer.from_pretrained(model_dirs["llama"])
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(rendered, add_special_tokens=False)["input_ids"])
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (n_prompt, 12)
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    # Unsteered: the echo says so, the header too.
    assert full.model_extra["steering"]["fingerprint"] is None
    assert chunks[0].model_extra["steering"]["kind"] == "none"


def test_completion_stream_and_sampling_fields(server):
    c = client(server)
    kw = dict(
        model=MODEL,
        prompt="the cat sees",
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True, "steering": {"vectors": [_inline(3)]}},
    )
    full = c.completions.create(**kw)
    text = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))
    assert text == full.choices[0].text and full.usage.completion_tokens == 10
    # The fields users rely on are accepted (n, seed, penalties, top_p, stop, user, logprobs).
    r = c.completions.create(
        model=MODEL,
        prompt="the cat",
        max_tokens=6,
        n=2,
        seed=7,
        temperature=0.9,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        stop=["zzz"],
        user="u1",
        logprobs=2,
        extra_body={"steering": {"vectors": [_inline(4)]}},
    )
    assert len(r.choices) == 2 and all(len(ch.logprobs.top_logprobs[0]) >= 2 for ch in r.choices)
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL]


# --- steering --------------------------------------------------------------------------------


SPECS = {
    "named": {"vectors": [{"name": "happy", "scale": 1.5}]},
    "inline+gguf": {"vectors": [_inline(11, layer=2), {"name": "happy_gguf", "scale": -1}]},
    "ablate": {"vectors": [{"name": "happy", "op": "ablate", "layers": [1]}]},
    "heads": {"heads": [{"layer": 1, "heads": [0, 2]}, {"layer": 2, "heads": [1], "scale": 3}]},
    "generated-only": {"vectors": [{**_inline(12, layer=0), "positions": "generated"}]},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_steered_request_equals_offline_engine(server, engines, name):
    spec = SPECS[name]
    r, tokens, logprobs = complete(client(server), spec)
    want = offline(engines, spec)
    assert tokens == want.tokens
    np.testing.assert_allclose(logprobs, want.logprobs, atol=1e-4)
    assert tokens != offline(engines, None).tokens  # the spec does something
    echo = r.model_extra["steering"]
    assert echo["fingerprint"] and echo["kind"] in ("vectors", "heads")


def test_fingerprint_header_and_body_agree(server):
    spec = SPECS["named"]
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "steering": spec}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-steering-fingerprint"] == r.json()["steering"]["fingerprint"]
    del body["steering"]
    assert (
        httpx.post(f"{server}/v1/completions", json=body, timeout=60).headers[
            "x-steering-fingerprint"
        ]
        == "none"
    )


def _offline_reports(llm) -> dict:
    def read(worker):
        return dict(runtime_of(worker.model_runner).finished_reports)

    return llm.collective_rpc(read)[0]


def test_decoding_report_in_response(server, engines):
    spec = {"decoding": {"mode": "contrast", "layers": [0, 1]}}
    llm = engines.get("llama")
    before = _offline_reports(llm)
    want = offline(engines, spec, max_tokens=6)
    offline(engines, None, max_tokens=1)  # finished requests reach the worker a step later
    (report,) = [v for k, v in _offline_reports(llm).items() if k not in before]

    r, tokens, _ = complete(client(server), spec, max_tokens=6)
    assert tokens == want.tokens
    (choice,) = r.model_extra["steering"]["decoding"]["choices"]
    assert choice == {"index": 0, **report} and len(choice["layers"]) == 6

    chunks = list(
        client(server).completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=6,
            temperature=0.8,
            seed=3,
            n=2,
            stream=True,
            extra_body={"ignore_eos": True, "steering": spec},
        )
    )
    tail = chunks[-1].model_extra["steering"]["decoding"]["choices"]
    assert [c["index"] for c in tail] == [0, 1]
    assert all(c["mode"] == "contrast" and len(c["layers"]) == 6 for c in tail)


# --- readout -----------------------------------------------------------------------------------

READOUT = {
    "vectors": [{"name": "happy", "layers": [1], "scale": 4.0}],
    "readout": [
        {"name": "happy", "layer": 1, "prompt": True},
        {"data": random_vector(11).tolist(), "layer": 2},
    ],
}


def _offline_readout(engines, spec, prompt, max_tokens):
    from steering.engine.worker import readouts

    llm = engines.get("llama", "readout")
    (out,) = llm.generate(
        [{"prompt_token_ids": prompt}], offline_sampling(spec, max_tokens), use_tqdm=False
    )
    got = readouts(llm, out.request_id)[0]
    return list(out.outputs[0].token_ids), np.array(got["generated"]), np.array(got["prompt"])


def _joined(chunks, index: int = 0) -> list[dict]:
    """A choice's streamed readout values, joined by `start` (checking none is missing)."""
    joined: list[dict] = []
    for ch in chunks:
        for choice in ch.choices:
            part = (choice.model_extra or {}).get("readout")
            if choice.index != index or part is None:
                continue
            if not joined:
                joined = [{**e, "values": []} for e in part]
            for whole, e in zip(joined, part, strict=True):
                assert e["start"] == len(whole["values"])  # in order, none lost
                whole["values"] += e["values"]
                if "prompt_values" in e:
                    whole["prompt_values"] = e["prompt_values"]
    for e in joined:
        del e["start"]
    return joined


def test_readout_in_responses_equals_the_offline_engine(server, engines):
    tokens, generated, prompt_rows = _offline_readout(engines, READOUT, PROMPT, 8)
    r, got_tokens, _ = complete(client(server), READOUT)
    assert got_tokens == tokens
    first, second = r.choices[0].model_extra["readout"]
    assert (first["name"], first["layer"], second["name"], second["layer"]) == (
        "happy",
        1,
        "<inline>",
        2,
    )
    assert len(first["values"]) == len(second["values"]) == 8 and "prompt_values" not in second
    np.testing.assert_allclose(
        np.array([first["values"], second["values"]]).T, generated, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(first["prompt_values"], prompt_rows[:, 0], rtol=1e-4, atol=1e-4)
    echo = r.model_extra["steering"]
    assert echo["kind"] == "vectors+readout"
    assert echo["readout"] == [{"name": "happy", "layer": 1}, {"name": "<inline>", "layer": 2}]


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_streamed_readout_joins_to_the_non_streamed_one(server, chat):
    c = client(server)
    extra = {"ignore_eos": True, "steering": READOUT}
    kw = dict(model=MODEL, max_tokens=12, temperature=0.9, seed=5, n=2, extra_body=extra)
    if chat:
        full = c.chat.completions.create(messages=MESSAGES, **kw)
        chunks = list(c.chat.completions.create(messages=MESSAGES, stream=True, **kw))
    else:
        full = c.completions.create(prompt="the cat sees", **kw)
        chunks = list(c.completions.create(prompt="the cat sees", stream=True, **kw))
    for choice in full.choices:
        want = choice.model_extra["readout"]
        assert len(want[0]["values"]) == 12 and None not in want[0]["values"]
        got = _joined(chunks, choice.index)
        assert [e["name"] for e in got] == [e["name"] for e in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g["values"], w["values"], rtol=1e-5, atol=1e-5)
            assert ("prompt_values" in g) == ("prompt_values" in w)
            if "prompt_values" in w:
                np.testing.assert_allclose(g["prompt_values"], w["prompt_values"], atol=1e-5)
    # Values come as their tokens do, not all at the end.
    carrying = [ch for ch in chunks if any("readout" in (x.model_extra or {}) for x in ch.choices)]
    assert len(carrying) >= 6


def test_readout_beside_other_requests_and_in_variants(server):
    c = client(server, timeout=300)
    specs = [
        {
            "readout": [{"name": "happy", "layer": 1 + i % 2}],
            "vectors": [_inline(200 + i, layer=i % 4)],
        }
        for i in range(8)
    ]
    prompts = [[(11 * i + j) % 480 + 10 for j in range(4 + i)] for i in range(8)]

    def run(i: int, stream: bool):
        body = dict(
            model=MODEL,
            prompt=prompts[i],
            max_tokens=10,
            temperature=0,
            extra_body={"ignore_eos": True, "steering": specs[i]},
        )
        if stream:
            return _joined(list(c.completions.create(stream=True, **body)))[0]["values"]
        return c.completions.create(**body).choices[0].model_extra["readout"][0]["values"]

    solo = [run(i, False) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: run(i, True), range(8)))
    for a, b in zip(solo, together, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Variants: each choice carries its own variant's values (or none).
    variants = [specs[0], None, {"readout": [{"name": "happy", "layer": 2}]}]
    body = dict(
        model=MODEL,
        prompt=prompts[0],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True, "variants": variants},
    )
    r = c.completions.create(**body)
    assert r.choices[0].model_extra["readout"][0]["values"] == pytest.approx(solo[0], abs=1e-5)
    assert "readout" not in r.choices[1].model_extra
    assert len(r.choices[2].model_extra["readout"][0]["values"]) == 10
    chunks = list(c.completions.create(stream=True, **body))
    assert _joined(chunks, 0)[0]["values"] == pytest.approx(solo[0], abs=1e-5)
    assert _joined(chunks, 1) == [] and len(_joined(chunks, 2)[0]["values"]) == 10


# --- errors ------------------------------------------------------------------------------------


def api_error(fn) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as info:
        fn()
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return info.value.status_code, body["error"]


@pytest.mark.parametrize(
    "steering, param, words",
    [
        (
            {"vectors": [{"data": {"1": [float("nan")] * 128}}]},
            "steering.vectors[0].data[1]",
            "finite",
        ),
        ({"vectors": [{"name": "nope"}]}, "steering.vectors[0].name", "unknown vector"),
        ({"vectors": [{"name": "happy", "layers": [9]}]}, "steering.vectors[0].layers", "layer"),
        ({"vectors": [{"data": {"1": [0.5] * 100}}]}, "steering.vectors[0].data", "hidden size"),
        ({"vectors": [{"data": {"1": [1e39] * 128}}]}, "steering.vectors[0]", "nan or inf"),
        ({"heads": [{"layer": 0, "heads": [7]}]}, "steering.heads[0].heads", "out of range"),
        ({"vectors": [], "bogus": 1}, "steering.bogus", "extra"),
        ({"readout": [{"name": "nope", "layer": 1}]}, "steering.readout[0]", "unknown vector"),
        (
            {"readout": [{"name": "happy", "layer": 0}]},
            "steering.readout[0]",
            "'happy' has no data for layer 0",
        ),
        ({"readout": [{"name": "happy", "layer": 1}] * 5}, "steering.readout", "at most 4"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_spec_is_400_naming_the_field(server, steering, param, words, stream):
    # Raw JSON: the openai client refuses to send NaN (JSON has no NaN; Python's json does).
    body = {
        "model": MODEL,
        "prompt": "the cat",
        "max_tokens": 4,
        "stream": stream,
        "steering": steering,
    }
    r = httpx.post(
        f"{server}/v1/completions",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == 400, r.text
    assert err["param"].startswith(param) and words in err["message"].lower(), err


def test_other_request_errors(server):
    c = client(server)
    status, err = api_error(lambda: c.completions.create(model="nope", prompt="x", max_tokens=2))
    assert status == 404 and "nope" in err["message"]
    status, err = api_error(
        lambda: c.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"steering": {"preset": "calm"}}
        )
    )
    assert status == 404 and err["param"] == "steering.preset"
    status, err = api_error(
        lambda: c.completions.create(
            model=MODEL, prompt="x", max_tokens=2, extra_body={"vllm_xargs": {"steering": "{}"}}
        )
    )
    assert status == 400 and err["param"] == "vllm_xargs.steering"
    status, err = api_error(lambda: c.completions.create(model=MODEL, prompt="x", max_tokens=-3))
    assert status == 400
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    # Steering a decoding spec with prompt log-probs is refused up front.
    status, err = api_error(
        lambda: c.completions.create(
            model=MODEL,
            prompt="x",
            max_tokens=2,
            echo=True,
            logprobs=1,
            extra_body={"steering": {"decoding": {"mode": "fuse", "layer": 1}}},
        )
    )
    assert status == 400 and err["param"] == "steering.decoding"
    # None of that hurt the server.
    assert complete(c)[1]


# --- disconnect, concurrency, metrics -------------------------------------------------------


def _metrics(base: str) -> str:
    return httpx.get(f"{base}/metrics", timeout=30).text


def _wait_idle(base: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while True:
        text = _metrics(base)
        running = metric_value(text, "vllm:num_requests_running")
        slots = metric_value(text, "steerserve:intervention_slots_active")
        if running == 0 and slots == 0:
            return text
        if time.time() > deadline:
            pytest.fail(f"engine not idle: running={running} slots={slots}")
        time.sleep(0.5)


def test_disconnect_mid_stream_aborts_and_frees_the_slot(server):
    before = (
        metric_value(_wait_idle(server), "steerserve:generation_tokens_total", kind="vectors") or 0
    )
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
        "steering": {"vectors": [_inline(21)]},
    }
    with httpx.Client(timeout=60) as probe, httpx.Client(timeout=60) as http:
        probe.get(f"{server}/health")  # connected before the stream starts
        with http.stream("POST", f"{server}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            # While it streams, its spec holds a slot (so the check below is not vacuous).
            during = probe.get(f"{server}/metrics").text
            assert metric_value(during, "steerserve:intervention_slots_active") == 1
            assert metric_value(during, "vllm:num_requests_running") == 1
    # The connection is closed: the engine request is aborted and its slot freed.
    text = _wait_idle(server, timeout=30)
    generated = metric_value(text, "steerserve:generation_tokens_total", kind="vectors")
    assert 0 < generated - before < 1000
    assert metric_value(text, "steerserve:requests_total", kind="vectors", status="499") == 1


def test_32_concurrent_distinct_specs_equal_solo(server):
    specs: list[dict | None] = []
    for i in range(32):
        kind = i % 4
        if kind == 0:
            specs.append(None)
        elif kind == 1:
            specs.append({"vectors": [_inline(100 + i, layer=i % 4, norm=6 + i % 3)]})
        elif kind == 2:
            specs.append(
                {
                    "heads": [{"layer": i % 4, "heads": [i % 4], "scale": (i % 3) * 0.5}],
                    "vectors": [{"name": "happy", "scale": 0.1 * i}],
                }
            )
        else:
            specs.append({"decoding": {"mode": "fuse", "layer": i % 3, "weight": 0.5}})
    prompts = [[(7 * i + j) % 480 + 10 for j in range(5 + i % 7)] for i in range(32)]
    c = client(server, timeout=300)

    def run(i: int):
        _, tokens, logprobs = complete(c, specs[i], prompt=prompts[i], max_tokens=6)
        return tokens, logprobs

    solo = [run(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, range(32)))
    for i, (a, b) in enumerate(zip(solo, together, strict=True)):
        assert a[0] == b[0], f"request {i} ({specs[i]}) differs beside the others"
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)
    assert len({tuple(t) for t, _ in solo}) > 16  # the specs really differ


def test_metrics_expose_vllm_and_steerserve_series(server):
    c = client(server)
    complete(c, {"vectors": [{"name": "happy"}], "heads": [{"layer": 0, "heads": [1]}]})
    with pytest.raises(openai.BadRequestError):
        complete(c, {"vectors": [{"name": "nope"}]})
    text = _wait_idle(server)
    assert "vllm:num_requests_running" in text and "vllm:prompt_tokens_total" in text
    base = {"model_name": MODEL, "preset": "none"}
    assert (
        metric_value(text, "steerserve:requests_total", **base, kind="vectors+heads", status="200")
        >= 1
    )
    assert metric_value(text, "steerserve:requests_total", status="400") >= 1
    assert metric_value(text, "steerserve:prompt_tokens_total", **base, kind="none") > 0
    assert (
        metric_value(text, "steerserve:generation_tokens_total", **base, kind="vectors+heads") >= 8
    )
    assert (
        metric_value(
            text, "steerserve:time_to_first_token_seconds_count", **base, kind="vectors+heads"
        )
        >= 1
    )
    assert (
        metric_value(text, "steerserve:e2e_request_latency_seconds_count", **base, kind="decoding")
        >= 1
    )
    assert metric_value(text, "steerserve:intervention_slots_total", model_name=MODEL) >= 1
    assert metric_value(text, "steerserve:requests_running", **base, kind="vectors") == 0


def test_vectors_and_presets_routes(server):
    r = httpx.get(f"{server}/v1/vectors", timeout=30).json()
    by_name = {v["id"]: v for v in r["data"]}
    assert by_name["happy"]["layers"] == [1, 2] and by_name["happy"]["usable"]
    assert by_name["iti_heads"]["site"] == "heads" and by_name["iti_heads"]["usable"]
    assert "broken.safetensors" in r["skipped_files"]
    p = httpx.get(f"{server}/v1/presets", timeout=30).json()
    assert p == {"object": "list", "data": [], "default": None}
    assert json.loads(httpx.get(f"{server}/health", timeout=30).text or "{}") == {}


def test_capabilities_describe_the_model_and_build_a_valid_spec(server):
    doc = httpx.get(f"{server}/v1/steering/capabilities").json()
    assert doc["architecture"] == "LlamaForCausalLM" and doc["verified_architecture"]
    assert (doc["num_layers"], doc["hidden_size"], doc["num_heads"], doc["num_kv_heads"]) == (
        4,
        128,
        4,
        2,
    )
    assert [layer["attention_heads"] for layer in doc["layers"]] == [4, 4, 4, 4]
    assert all(layer["experts"] == 0 for layer in doc["layers"])
    fields = doc["fields"]
    assert fields["vectors"]["widths"] == {"residual": 128, "heads": 256}
    assert fields["decoding"]["modes"] == ["fuse", "contrast", "lfd"]
    assert fields["readout"]["max_entries"] >= 1
    # This server runs without feature tables: feature adds only, at any layer.
    assert fields["features"]["ops"] == ["add"] and fields["features"]["layers"] == [0, 1, 2, 3]
    # A spec built from the document alone is accepted, and steers.
    last = fields["heads"]["layers"][-1]
    spec = {
        "vectors": [{"data": {str(last): [0.5] * fields["vectors"]["widths"]["residual"]}}],
        "heads": [{"layer": last, "heads": [doc["num_heads"] - 1], "scale": 0.0}],
    }
    _, _, steered = complete(client(server), spec)
    _, _, plain = complete(client(server))
    assert steered != plain
    bad = {"heads": [{"layer": doc["num_layers"], "heads": [0]}]}
    with pytest.raises(openai.BadRequestError, match="out of range"):
        complete(client(server), bad)


# Every route steerserve adds, by method (the auth and fuzzing tests walk this schema).
STEERSERVE_ROUTES = {
    "/v1/chat/completions": {"post"},
    "/v1/completions": {"post"},
    "/v1/vectors": {"get"},
    "/v1/vectors/{name}": {"get", "put", "delete"},
    "/v1/saes": {"get"},
    "/v1/saes/{name}": {"get", "put", "delete"},
    "/v1/saes/{name}/features/{feature}": {"get"},
    "/v1/presets": {"get"},
    "/v1/admin/reload": {"post"},
    "/v1/steering/capabilities": {"get"},
    "/v1/admin/experiments": {"get", "post"},
    "/v1/admin/experiments/{name}": {"get", "put"},
    "/v1/admin/experiments/{name}/{action}": {"post"},
    "/v1/feedback": {"post"},
    "/v1/experiments/{name}/report": {"get"},
}


def test_openapi_describes_every_steerserve_route_and_body(server):
    schema = httpx.get(f"{server}/openapi.json", timeout=30).json()
    for path, methods in STEERSERVE_ROUTES.items():
        assert methods <= set(schema["paths"].get(path, {})), path
    components = schema["components"]["schemas"]

    def body_of(path: str, method: str) -> dict:
        content = schema["paths"][path][method]["requestBody"]["content"]
        ref = content["application/json"]["schema"]["$ref"]
        return components[ref.rsplit("/", 1)[-1]]

    chat = body_of("/v1/chat/completions", "post")
    assert {"messages", "steering", "experiment", "variants"} <= set(chat["properties"])
    completion = body_of("/v1/completions", "post")
    assert {"prompt", "steering", "experiment", "variants"} <= set(completion["properties"])
    steering = components["RequestSteering"]["properties"]
    assert {"vectors", "heads", "experts", "decoding", "readout", "preset", "default"} <= set(
        steering
    )
    assert "arms" in body_of("/v1/admin/experiments", "post")["properties"]
    assert "arms" in body_of("/v1/admin/experiments/{name}", "put")["properties"]
    assert {"id", "metric", "value"} <= set(body_of("/v1/feedback", "post")["properties"])
    upload = schema["paths"]["/v1/vectors/{name}"]["put"]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["format"] == "binary"
    # Every reference resolves: the schema is usable by generators and fuzzers as is.
    text = json.dumps(schema)
    for ref in set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text)):
        assert ref in components, ref


def test_non_ascii_text_and_over_length_prompts(server):
    """Steered chat in several scripts; a prompt longer than the model's context with a
    spec is refused (400) and the server goes on; a vector name outside ASCII is a 404
    naming it."""
    c = client(server)
    for text in ("café crème, s'il vous plaît", "東京の猫 🐈", "مرحبا", "\u0000\u200b\ufeff"):
        r = c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            max_tokens=4,
            user="Zoë",
            extra_body={"steering": {"vectors": [{"name": "happy"}]}},
        )
        assert r.choices[0].message.content is not None
    too_long = [7] * (ENGINE_KW["max_model_len"] + 5)
    for steering in (None, {"vectors": [{"name": "happy"}]}):
        status, err = api_error(
            lambda s=steering: c.completions.create(
                model=MODEL, prompt=too_long, max_tokens=2, extra_body={"steering": s}
            )
        )
        msg = err["message"].lower()
        assert status == 400 and ("context" in msg or "maximum" in msg), err
    r = httpx.get(f"{server}/v1/vectors/caf%C3%A9", timeout=30)
    assert r.status_code == 404 and "'café'" in r.json()["error"]["message"], r.text
    assert complete(c)[1]  # none of it hurt the server
