"""A/B experiments through a live server: assignment, feedback, admin routes, versions,
reports, per-arm metrics, variants, and a kill -9 that loses nothing acknowledged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from live_server import live_server, metric_value
from scipy import stats
from test_server import MODEL, PROMPT, SPECS, client, complete, offline, server_args

from server.experiments.assignment import arm_index, enrolled

ADMIN = "k-admin"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
HAPPY = {"vectors": [{"name": "happy", "scale": 1.5}]}
TONE = {
    "name": "tone",
    "salt": "s1",
    "arms": [
        {"name": "plain"},
        {"name": "happy", "steering": HAPPY},
        {"name": "heads", "weight": 2, "steering": SPECS["heads"]},
    ],
    "metrics": {"thumbs": "boolean", "rating": "numeric"},
}
SHARE = {
    "name": "share",
    "arms": [{"name": "a"}, {"name": "b", "steering": HAPPY}],
    "traffic": {"share": 0.5, "model": MODEL},
}
ARM_SPECS = {a["name"]: a.get("steering") for a in TONE["arms"]}


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiments")
    (d / "experiments.yaml").write_text(json.dumps([TONE, SHARE]))  # JSON is YAML
    return d


def _args(model_dirs, vectors_dir, d) -> list[str]:
    return [
        *server_args(model_dirs["llama"], vectors_dir),
        "--admin-key",
        ADMIN,
        "--experiments",
        str(d / "experiments.yaml"),
        "--database-url",
        f"sqlite:///{d / 'ab.db'}",
    ]


@pytest.fixture(scope="module")
def exp_server(model_dirs, vectors_dir, exp_dir):
    with live_server(_args(model_dirs, vectors_dir, exp_dir), exp_dir / "serve.log") as running:
        yield running


def _post(base: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=60)


def _complete(base: str, body: dict | None = None, headers: dict | None = None) -> httpx.Response:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "return_tokens_as_token_ids": True,
        **(body or {}),
    }
    r = _post(base, "/v1/completions", body, headers)
    assert r.status_code == 200, r.text
    return r


def _tokens(r: httpx.Response) -> list[int]:
    return [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def _expected_arm(exp: dict, unit: str) -> str:
    salt = exp.get("salt") or exp["name"]
    weights = [a.get("weight", 1) for a in exp["arms"]]
    return exp["arms"][arm_index(exp["name"], salt, unit, weights)]["name"]


def test_units_get_their_hashed_arm_every_time_with_its_steering(exp_server, engines):
    base, _ = exp_server
    c = client(base)
    seen = set()
    for i in range(9):
        unit = f"user-{i}"
        want = _expected_arm(TONE, unit)
        seen.add(want)
        for _ in range(2):  # sticky
            r, tokens, logprobs = complete(c, user=unit, max_tokens=6, extra={"experiment": "tone"})
            echo = r.model_extra["steering"]
            assert (echo["experiment"], echo["arm"], echo["version"]) == ("tone", want, 1)
        ref = offline(engines, ARM_SPECS[want], max_tokens=6)
        assert tokens == ref.tokens
        np.testing.assert_allclose(logprobs, ref.logprobs, atol=1e-4)
    assert seen == {"plain", "happy", "heads"}
    # Headers: X-Experiment names it, X-Unit-Id beats `user`; the response says so too.
    r = _complete(base, {"user": "ignored"}, {"X-Experiment": "tone", "X-Unit-Id": "user-3"})
    assert r.headers["x-experiment"] == "tone" and r.headers["x-experiment-version"] == "1"
    assert r.headers["x-experiment-arm"] == _expected_arm(TONE, "user-3")
    assert r.json()["steering"]["arm"] == r.headers["x-experiment-arm"]
    # Without a unit: per request, hashed on the request id (the response id's tail).
    for _ in range(3):
        body = _complete(base, {"experiment": "tone"}).json()
        assert body["steering"]["arm"] == _expected_arm(TONE, f"request:{body['id'][5:]}")
    # Streams name the arm in their first chunk.
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 3,
            "stream": True,
            "experiment": "tone",
            "user": "user-1",
        },
    ) as s:
        lines = s.iter_lines()  # one iterator: a second iter_lines() finds it consumed
        first = json.loads(next(line for line in lines if line)[len("data: ") :])
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert first["steering"]["arm"] == _expected_arm(TONE, "user-1")


def test_traffic_share_enrols_unsteered_requests_only(exp_server):
    base, _ = exp_server
    for i in range(16):
        unit = f"visitor-{i}"
        echo = _complete(base, {"user": unit, "max_tokens": 1}).json()["steering"]
        if enrolled("share", "share", unit, 0.5):
            assert (echo["experiment"], echo["arm"]) == ("share", _expected_arm(SHARE, unit))
        else:
            assert "experiment" not in echo
        steered = _complete(base, {"user": unit, "max_tokens": 1, "steering": HAPPY}).json()
        assert "experiment" not in steered["steering"]


def test_feedback_is_idempotent_and_validated(exp_server):
    base, _ = exp_server
    rid = _complete(base, {"experiment": "tone", "user": "fb-1"}).json()["id"]
    ok = _post(base, "/v1/feedback", {"id": rid, "metric": "thumbs", "value": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["arm"] == _expected_arm(TONE, "fb-1") and ok.json()["value"] is True
    again = _post(base, "/v1/feedback", {"id": rid, "metric": "thumbs", "value": True})
    assert again.status_code == 200 and again.json() == ok.json()
    for body, status, param in [
        ({"id": rid, "metric": "thumbs", "value": False}, 409, "value"),
        ({"id": "cmpl-nope", "metric": "thumbs", "value": 1}, 404, "id"),
        ({"id": rid, "metric": "clicks", "value": 1}, 400, "metric"),  # not declared
        ({"id": rid, "metric": "rating", "value": True}, 400, "metric"),  # numeric metric
        ({"id": rid, "metric": "rating", "value": "4"}, 400, "value"),
        ({"id": rid, "metric": "rating"}, 400, "value"),
        ({"id": rid, "metric": "rating", "value": 4, "extra": 1}, 400, "extra"),
        ({"id": rid, "metric": "bad metric", "value": 4}, 400, "metric"),
    ]:
        r = _post(base, "/v1/feedback", body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(
        f"{base}/v1/feedback",
        timeout=30,
        headers={"content-type": "application/json"},
        content=f'{{"id": "{rid}", "metric": "rating", "value": NaN}}',
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "value"
    # Unsteered, non-experiment responses take no feedback.
    plain = _complete(base, {"steering": HAPPY}).json()["id"]
    assert _post(base, "/v1/feedback", {"id": plain, "metric": "x", "value": 1}).status_code == 404
    assert (
        _post(
            base, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "experiment": "nope"}
        ).status_code
        == 404
    )


RATED = {
    "name": "rated",
    "arms": [{"name": "control"}, {"name": "happy", "steering": HAPPY}],
    "metrics": {"good": "boolean", "score": "numeric"},
}


def test_fifty_concurrent_clients_and_report_equals_scipy(exp_server, tmp_path):
    base, _ = exp_server
    assert _post(base, "/v1/admin/experiments", RATED, ADMIN_H).status_code == 201
    responses = []
    for i in range(50):
        body = _complete(base, {"experiment": "rated", "user": f"r{i}", "max_tokens": 2}).json()
        responses.append((body["id"], body["steering"]["arm"]))
    rng = np.random.default_rng(5)
    sent = [(rid, arm, bool(rng.random() < 0.5), float(rng.normal(3, 1))) for rid, arm in responses]
    statuses: list[int] = [0] * 100
    start = threading.Barrier(50)

    def one_client(i: int) -> None:
        rid, _, good, score = sent[i]
        with httpx.Client(timeout=60) as h:
            start.wait()
            for k, (metric, value) in enumerate((("good", good), ("score", score))):
                r = h.post(
                    f"{base}/v1/feedback", json={"id": rid, "metric": metric, "value": value}
                )
                statuses[2 * i + k] = r.status_code

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 100

    rep = httpx.get(f"{base}/v1/experiments/rated/report", timeout=60).json()
    arms = {a["name"]: a for a in rep["arms"]}
    assert sum(a["requests"] for a in arms.values()) == 50
    assert sum(a["feedback"] for a in arms.values()) == 100
    score = {a: np.array([s[3] for s in sent if s[1] == a]) for a in arms}
    good = {a: np.array([s[2] for s in sent if s[1] == a]) for a in arms}
    m = arms["happy"]["metrics"]
    welch = stats.ttest_ind(score["happy"], score["control"], equal_var=False)
    assert m["score"]["p_value"] == pytest.approx(welch.pvalue, rel=1e-9)
    assert m["score"]["mean"] == pytest.approx(score["happy"].mean(), rel=1e-12)
    k1, n1, k0, n0 = (
        good["happy"].sum(),
        good["happy"].size,
        good["control"].sum(),
        good["control"].size,
    )
    p = (k1 + k0) / (n1 + n0)
    z = (k1 / n1 - k0 / n0) / np.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    assert m["good"]["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)
    for a in arms.values():
        assert a["completion_tokens"]["p50"] == 2 and a["latency_seconds"]["p95"] > 0

    # The CLI reads the same store: same numbers, and a plot.
    db = next(arg for arg in exp_server[1].args if str(arg).startswith("sqlite:///"))
    png = tmp_path / "rated.png"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "experiments",
            "report",
            "rated",
            "--database-url",
            db,
            "--json",
            "--plot",
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert cli["arms"] == rep["arms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "experiments",
            "report",
            "rated",
            "--database-url",
            db,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert text.returncode == 0 and "happy" in text.stdout and "score" in text.stdout


def test_admin_routes_versions_and_status(exp_server):
    base, _ = exp_server
    url = f"{base}/v1/admin/experiments"
    exp = {"name": "ver", "arms": [{"name": "a"}, {"name": "b", "steering": HAPPY}]}
    assert _post(base, "/v1/admin/experiments", exp).status_code == 401  # admin key needed
    assert _post(base, "/v1/admin/experiments", exp, ADMIN_H).status_code == 201
    assert _post(base, "/v1/admin/experiments", exp, ADMIN_H).status_code == 409
    bad = {"name": "bad", "arms": [{"name": "a", "steering": {"vectors": [{"name": "nope"}]}}]}
    r = _post(base, "/v1/admin/experiments", bad, ADMIN_H)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("arms[0].steering")
    r = _post(base, "/v1/admin/experiments", {"name": "x", "arms": []}, ADMIN_H)
    assert r.status_code == 400 and r.json()["error"]["param"] == "arms"
    reads = {
        "name": "reads",
        "arms": [{"name": "a", "steering": {"readout": [{"name": "happy", "layer": 1}]}}],
    }
    r = _post(base, "/v1/admin/experiments", reads, ADMIN_H)
    assert r.status_code == 400 and r.json()["error"]["param"] == "arms[0].steering.readout"
    names = [e["name"] for e in httpx.get(url, headers=ADMIN_H, timeout=30).json()["data"]]
    assert {"tone", "share", "ver"} <= set(names)
    v1 = _complete(base, {"experiment": "ver", "user": "z"}).json()["steering"]
    assert v1["version"] == 1
    # Same definition: nothing changes. Changed arms: version 2, results kept apart.
    same = httpx.put(f"{url}/ver", json=exp, headers=ADMIN_H, timeout=30).json()
    assert same["changed"] is False and same["version"] == 1
    changed = {**exp, "arms": [{"name": "a"}, {"name": "c", "weight": 3, "steering": HAPPY}]}
    r = httpx.put(f"{url}/ver", json=changed, headers=ADMIN_H, timeout=30).json()
    assert r["changed"] is True and r["version"] == 2 and r["serving"] is True
    assert _complete(base, {"experiment": "ver", "user": "z"}).json()["steering"]["version"] == 2
    rep1 = httpx.get(f"{base}/v1/experiments/ver/report?version=1", timeout=30).json()
    rep2 = httpx.get(f"{base}/v1/experiments/ver/report", timeout=30).json()
    assert sum(a["requests"] for a in rep1["arms"]) == 1 and rep1["status"] == "superseded"
    assert sum(a["requests"] for a in rep2["arms"]) == 1 and [a["name"] for a in rep2["arms"]] == [
        "a",
        "c",
    ]
    got = httpx.get(f"{url}/ver", headers=ADMIN_H, timeout=30).json()
    assert [v["version"] for v in got["versions"]] == [1, 2]
    # Pause: requests naming it are served unsteered by it, and told so.
    assert _post(base, "/v1/admin/experiments/ver/pause", {}, ADMIN_H).json()["status"] == "paused"
    r = _complete(base, {"experiment": "ver", "user": "z"})
    assert r.json()["steering"]["arm"] is None and r.headers["x-experiment-status"] == "paused"
    assert r.json()["steering"]["kind"] == "none"
    assert (
        _post(base, "/v1/admin/experiments/ver/resume", {}, ADMIN_H).json()["status"] == "running"
    )
    assert _post(base, "/v1/admin/experiments/ver/stop", {}, ADMIN_H).json()["status"] == "stopped"
    assert _post(base, "/v1/admin/experiments/ver/resume", {}, ADMIN_H).status_code == 409
    assert _post(base, "/v1/admin/experiments/ver/explode", {}, ADMIN_H).status_code == 404
    assert httpx.get(f"{base}/v1/experiments/nope/report", timeout=30).status_code == 404


def test_per_arm_metrics(exp_server):
    base, _ = exp_server
    _complete(base, {"experiment": "tone", "user": "metrics-1"})
    arm = _expected_arm(TONE, "metrics-1")
    text = httpx.get(f"{base}/metrics", timeout=30).text
    labels = {"experiment": "tone", "version": "1", "arm": arm}
    assert metric_value(text, "steerserve:experiment_requests_total", **labels, status="200") >= 1
    assert metric_value(text, "steerserve:experiment_generation_tokens_total", **labels) >= 4
    assert (
        metric_value(text, "steerserve:experiment_e2e_request_latency_seconds_count", **labels) >= 1
    )
    assert (
        metric_value(text, "steerserve:experiment_time_to_first_token_seconds_count", **labels) >= 1
    )

    # A client that leaves mid-stream is an error of its arm (499). On a loaded machine the
    # tiny model can finish all 1000 tokens before the client gets to close (then it is a
    # 200, rightly): so try up to three times, and require the accounting to match.
    def finished(status: str) -> float:
        text = httpx.get(f"{base}/metrics", timeout=30).text
        return (
            metric_value(text, "steerserve:experiment_requests_total", **labels, status=status)
            or 0.0
        )

    left = 0
    for _ in range(3):
        before = (finished("200"), finished("499"))
        with httpx.stream(
            "POST",
            f"{base}/v1/completions",
            timeout=60,
            json={
                "model": MODEL,
                "prompt": PROMPT,
                "max_tokens": 1000,
                "ignore_eos": True,
                "stream": True,
                "experiment": "tone",
                "user": "metrics-1",
            },
        ) as s:
            next(line for line in s.iter_lines() if line)
        deadline = time.time() + 60
        while sum((finished("200"), finished("499"))) == sum(before):
            assert time.time() < deadline, "the stream was never recorded as finished"
            time.sleep(0.3)
        if finished("499") == before[1] + 1:
            left = 1
            break
    assert left == 1, "a client that left mid-stream was never recorded as 499"
    text = httpx.get(f"{base}/metrics", timeout=30).text
    assert metric_value(text, "steerserve:experiment_request_errors_total", **labels) == 1
    # ... and so in the stored outcome the report counts (written in the next batch).
    deadline = time.time() + 30
    while time.time() < deadline:
        rep = httpx.get(f"{base}/v1/experiments/tone/report", timeout=30).json()
        if next(a for a in rep["arms"] if a["name"] == arm)["errors"]:
            break
        time.sleep(0.5)
    assert next(a for a in rep["arms"] if a["name"] == arm)["errors"] == 1


def test_ttft_of_non_streamed_requests_is_the_first_token_not_the_last(exp_server):
    """A non-streamed request's output stream shows only its final output; TTFT must still
    be its first token's time (vLLM's per-request stats), far below the whole latency."""
    base, _ = exp_server
    one_arm = {"name": "ttft", "arms": [{"name": "only", "steering": HAPPY}]}
    assert _post(base, "/v1/admin/experiments", one_arm, ADMIN_H).status_code == 201
    _complete(base, {"experiment": "ttft", "max_tokens": 400})
    # The outcome is stored in the store's next batch: wait for it to be reported.
    deadline = time.time() + 30
    while True:
        arm = httpx.get(f"{base}/v1/experiments/ttft/report", timeout=30).json()["arms"][0]
        if arm["ttft_seconds"]["p50"] is not None or time.time() > deadline:
            break
        time.sleep(0.3)
    assert 0 < arm["ttft_seconds"]["p50"] < 0.25 * arm["latency_seconds"]["p50"], arm


VARIANTS = [None, HAPPY, SPECS["heads"]]


def test_variants_side_by_side_equal_solo_runs(exp_server):
    base, _ = exp_server
    sampling = {"temperature": 0.9, "seed": 11, "max_tokens": 6}
    body = _complete(base, {**sampling, "variants": VARIANTS}).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert body["steering"]["seed"] == 11
    assert [v["kind"] for v in body["steering"]["variants"]] == ["none", "vectors", "heads"]
    assert body["usage"]["completion_tokens"] == 18
    for i, spec in enumerate(VARIANTS):
        solo = _complete(base, {**sampling, **({"steering": spec} if spec else {})}).json()
        assert body["choices"][i]["text"] == solo["choices"][0]["text"]
    assert len({ch["text"] for ch in body["choices"]}) > 1
    # Streamed: the same text per index; one [DONE].
    text = ["", "", ""]
    lines = []
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        timeout=60,
        json={
            "model": MODEL,
            "prompt": PROMPT,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
            "variants": VARIANTS,
            **sampling,
        },
    ) as s:
        for line in s.iter_lines():
            if line:
                lines.append(line)
    assert lines.count("data: [DONE]") == 1 and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    for ch in chunks:
        for choice in ch["choices"]:
            text[choice["index"]] += choice["text"]
    assert text == [ch["text"] for ch in body["choices"]]
    assert chunks[0]["steering"]["seed"] == 11 and chunks[-1]["usage"]["completion_tokens"] == 18
    # Chat works the same way; errors name the variant.
    messages = [{"role": "user", "content": "hi"}]
    chat = _post(
        base,
        "/v1/chat/completions",
        {"model": MODEL, "max_tokens": 3, "variants": VARIANTS, "messages": messages},
    )
    chat = chat.json()
    assert len(chat["choices"]) == 3
    r = _post(
        base,
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "variants": [None, {"vectors": [{"name": "nope"}]}]},
    )
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("variants[1]")
    for extra, param in [
        ({"n": 2}, "n"),
        ({"steering": HAPPY}, "steering"),
        ({"experiment": "tone"}, "experiment"),
    ]:
        r = _post(
            base,
            "/v1/completions",
            {"model": MODEL, "prompt": PROMPT, "variants": VARIANTS, **extra},
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = _post(base, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "variants": {}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "variants"


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ab"


def test_readme_example_runs(exp_server, tmp_path):
    """docs/ab-testing.md's worked example: its experiment file, traffic script and report."""
    base, _ = exp_server
    # The test server runs a tiny random model: its registry's "happy" stands in for the
    # demo model's "positive" (the file is otherwise used as written).
    text = (EXAMPLE / "tone.yaml").read_text().replace("name: positive,", "name: happy,")
    (tone,) = yaml.safe_load(text)
    assert "happy" in json.dumps(tone["arms"])
    example = {**tone, "name": "example-tone"}
    assert _post(base, "/v1/admin/experiments", example, ADMIN_H).status_code == 201
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "traffic.py"),
            "--base-url",
            base,
            "--experiment",
            "example-tone",
            "--users",
            "6",
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rep = httpx.get(f"{base}/v1/experiments/example-tone/report", timeout=60).json()
    assert [a["name"] for a in rep["arms"]] == ["plain", "positive-0.25", "positive-1"]
    assert sum(a["requests"] for a in rep["arms"]) == 6
    assert sum(a["feedback"] for a in rep["arms"]) == 12
    assert rep["metrics"] == {"thumbs": "boolean", "rating": "numeric"}


DURABLE = {"name": "durable", "arms": [{"name": "a"}, {"name": "b", "steering": HAPPY}]}


def test_non_ascii_units_and_names(exp_server):
    """A unit id outside ASCII gets one arm whether it comes as `user` or as X-Unit-Id
    (UTF-8 bytes in the header), the hashed one; a non-ASCII experiment name is a 400
    naming the field; an unknown one in the header a 404 that quotes it as sent."""
    base, _ = exp_server
    for unit in ("Zoë", "東京-7", "user-\u00e9\u0301"):
        want = _expected_arm(TONE, unit)
        by_user = _complete(base, {"user": unit}, {"X-Experiment": "tone"})
        by_header = _complete(base, None, {"X-Experiment": "tone", "X-Unit-Id": unit.encode()})
        assert by_user.headers["x-experiment-arm"] == want, unit
        assert by_header.headers["x-experiment-arm"] == want, unit
    bad = {"name": "café", "arms": [{"name": "a"}]}
    r = httpx.put(f"{base}/v1/admin/experiments/caf%C3%A9", json=bad, headers=ADMIN_H, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    r = _post(
        base, "/v1/completions", {"model": MODEL, "prompt": "x"}, {"X-Experiment": "näme".encode()}
    )
    assert r.status_code == 404 and "'näme'" in r.json()["error"]["message"], r.text


def test_kill_9_after_acknowledged_feedback_loses_nothing(
    exp_server, model_dirs, vectors_dir, exp_dir
):
    """Last in the module: it kills the module's server."""
    base, proc = exp_server
    assert _post(base, "/v1/admin/experiments", DURABLE, ADMIN_H).status_code == 201
    ids = [
        _complete(base, {"experiment": "durable", "user": f"d{i}", "max_tokens": 1}).json()["id"]
        for i in range(20)
    ]
    with httpx.Client(timeout=30) as h:
        for i, rid in enumerate(ids):
            r = h.post(f"{base}/v1/feedback", json={"id": rid, "metric": "ok", "value": i % 2 == 0})
            assert r.status_code == 200
    os.killpg(proc.pid, signal.SIGKILL)  # no shutdown, no flush: only what was committed
    proc.wait(timeout=30)
    args = _args(model_dirs, vectors_dir, exp_dir)
    with live_server(args, exp_dir / "restart.log") as (base2, _):
        rep = httpx.get(f"{base2}/v1/experiments/durable/report", timeout=60).json()
        assert sum(a["requests"] for a in rep["arms"]) == 20
        assert sum(a["metrics"]["ok"]["n"] for a in rep["arms"]) == 20
        assert sum(a["feedback"] for a in rep["arms"]) == 20
        # The file's experiments are unchanged, so still version 1, and still sticky.
        echo = _complete(base2, {"experiment": "tone", "user": "user-0"}).json()["steering"]
        assert (echo["version"], echo["arm"]) == (1, _expected_arm(TONE, "user-0"))
