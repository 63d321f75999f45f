"""What `make serve` runs: `steerserve serve` with no model serves the trained demo model and
its shipped vectors, and steering visibly works on it through the openai client."""

from __future__ import annotations

import httpx
import openai
import pytest
from live_server import live_server

from demo.corpus import grammatical_fraction, sentiment_of, topic_of
from server.demo import DEMO_MODEL

SAMPLES = 64


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with live_server(["--enforce-eager", "--dtype", "float32"], log) as (base, _):
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)


def _answers(client, question: str, steering: dict | None, n: int = SAMPLES) -> list[str]:
    r = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": question}],
        n=n,
        seed=11,
        temperature=1.0,
        max_tokens=64,
        extra_body={"steering": steering} if steering else None,
    )
    return [c.message.content for c in r.choices]


def test_demo_model_answers_in_its_grammar(client):
    assert [m.id for m in client.models.list().data] == [DEMO_MODEL]
    r = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=[{"role": "user", "content": "tell me about the cat."}],
        max_tokens=64,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert grammatical_fraction(text) == 1.0 and topic_of(text) == "animals", text
    assert r.choices[0].finish_reason == "stop"  # it ends its answer itself
    vectors = {v["id"]: v for v in client.get("/vectors", cast_to=object)["data"]}
    shipped = {"positive", "negative", "animals", "food", "weather", "sports"}
    assert vectors.keys() >= shipped and all(vectors[n]["usable"] for n in shipped)


def test_positive_vector_shifts_the_sentiment_of_answers(client):
    """The README's claim, on a fixed seed: scale 1 of `positive` turns about half positive
    answers into nearly all positive ones, and they stay in the grammar.

    Bound: the benchmark (240 samples per cell) measures the unsteered positive rate near
    0.5 and the steered one above 0.9. With 64 samples the standard deviation of the
    difference of two rates is at most sqrt(0.25/64 + 0.25/64) = 0.088, so a true shift of
    0.4 or more stays above 0.2 with ~99% probability; the fixed seed makes the run
    repeatable, the margin makes it robust to a new vLLM's different sampling numerics."""
    question = "how was your day?"  # names no topic and no sentiment
    plain = _answers(client, question, None)
    steered = _answers(client, question, {"vectors": [{"name": "positive", "scale": 1.0}]})
    assert len(set(plain)) > SAMPLES // 2  # n samples are distinct draws, not one repeated
    rate = {
        k: sum(sentiment_of(t) == "positive" for t in v) / SAMPLES
        for k, v in (("plain", plain), ("steered", steered))
    }
    assert rate["steered"] - rate["plain"] >= 0.2, rate
    assert rate["steered"] >= 0.8, rate
    fluent = sum(map(grammatical_fraction, steered)) / SAMPLES
    assert fluent >= 0.75, (fluent, steered[:4])


ADMIN_ROUTES = [
    ("GET", "/v1/admin/experiments"),
    ("POST", "/v1/admin/reload"),
    ("POST", "/v1/admin/experiments/x/pause"),
    ("PUT", "/v1/vectors/x"),
    ("DELETE", "/v1/vectors/positive"),
    ("PUT", "/v1/saes/x"),
    ("DELETE", "/v1/saes/demo"),
]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_admin_routes_are_off_without_an_admin_key(client, method, path):
    """The demo server has no --admin-key: its admin routes answer 403 saying how to turn
    them on, whatever key is sent, and change nothing."""
    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    for headers in ({}, {"Authorization": "Bearer anything"}):
        r = httpx.request(method, f"{base}{path}", headers=headers, timeout=30)
        err = r.json()["error"]
        assert r.status_code == 403 and err["type"] == "PermissionDeniedError", r.text
        assert "--admin-key" in err["message"]
    assert client.get("/vectors/positive", cast_to=object)["usable"]
