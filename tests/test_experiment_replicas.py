"""Two server replicas sharing one PostgreSQL experiment store (`--database-url`): a unit
gets the same arm on both, admin changes made on one reach the other, feedback lands on
whichever replica the client reaches, and both report the same numbers."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from live_server import live_server
from postgres import postgres_url  # noqa: F401  (fixture)
from sqlalchemy import create_engine
from test_experiments_server import ADMIN, ADMIN_H, HAPPY, _complete, _expected_arm, _post
from test_server import MODEL, PROMPT, server_args

from server.experiments.registry import REFRESH_SECONDS
from server.experiments.store import metadata

SHARED = {
    "name": "shared",
    "salt": "r1",
    "arms": [{"name": "a"}, {"name": "b", "steering": HAPPY}],
    "metrics": {"liked": "boolean"},
}


@pytest.fixture(scope="module")
def replicas(model_dirs, vectors_dir, postgres_url, tmp_path_factory):  # noqa: F811
    engine = create_engine(postgres_url)
    metadata.drop_all(engine)  # a store of its own, whatever ran before on this server
    engine.dispose()
    d = tmp_path_factory.mktemp("replicas")
    (d / "experiments.json").write_text(json.dumps([SHARED]))
    common = [
        *server_args(model_dirs["llama"], vectors_dir),
        "--admin-key",
        ADMIN,
        "--database-url",
        postgres_url,
    ]
    with (
        live_server([*common, "--experiments", str(d / "experiments.json")], d / "a.log") as a,
        live_server(common, d / "b.log") as b,
    ):
        yield a[0], b[0]


def _eventually(check, timeout: float = 10 * REFRESH_SECONDS):
    deadline = time.time() + timeout
    while True:
        result = check()
        if result or time.time() > deadline:
            return result
        time.sleep(0.2)


def test_replicas_share_assignment_admin_feedback_and_reports(replicas):
    a, b = replicas
    # B has no experiments file: it serves what A stored, with the same arms per unit.
    for unit in ("u1", "u2", "u3", "u4"):
        arms = {
            _complete(base, {"experiment": "shared", "user": unit, "max_tokens": 2}).json()[
                "steering"
            ]["arm"]
            for base in (a, b)
        }
        assert arms == {_expected_arm(SHARED, unit)}
    # An experiment created on B is served by A after its next refresh.
    later = {"name": "later", "arms": [{"name": "x"}, {"name": "y", "steering": HAPPY}]}
    assert _post(b, "/v1/admin/experiments", later, ADMIN_H).status_code == 201
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, "experiment": "later"}
    assert _eventually(lambda: _post(a, "/v1/completions", body).status_code == 200)
    # Feedback on the other replica than the response came from; repeats are idempotent
    # across replicas too.
    ids = [
        _complete(a, {"experiment": "shared", "user": f"f{i}", "max_tokens": 1}).json()["id"]
        for i in range(10)
    ]
    for i, rid in enumerate(ids):
        r = _post(b, "/v1/feedback", {"id": rid, "metric": "liked", "value": i % 3 == 0})
        assert r.status_code == 200, r.text
    again = _post(a, "/v1/feedback", {"id": ids[0], "metric": "liked", "value": True})
    assert again.status_code == 200
    conflict = _post(a, "/v1/feedback", {"id": ids[0], "metric": "liked", "value": False})
    assert conflict.status_code == 409
    # Pausing on A pauses it on B.
    assert _post(a, "/v1/admin/experiments/shared/pause", {}, ADMIN_H).status_code == 200

    enrolled_meanwhile = []

    def paused_on_b() -> bool:
        echo = _complete(b, {"experiment": "shared", "user": "u1", "max_tokens": 1}).json()
        paused = echo["steering"].get("experiment_status") == "paused"
        if not paused:  # still running on B until its refresh: enrolled and recorded
            enrolled_meanwhile.append(echo["id"])
        return paused

    assert _eventually(paused_on_b)
    reports = [
        httpx.get(f"{base}/v1/experiments/shared/report", timeout=30).json() for base in (a, b)
    ]
    assert reports[0]["arms"] == reports[1]["arms"]
    arms = reports[0]["arms"]
    assert sum(x["metrics"]["liked"]["n"] for x in arms) == 10
    # 8 + 10 above, and the calls B enrolled before it saw the pause; paused ones are not.
    assert sum(x["requests"] for x in arms) == 8 + 10 + len(enrolled_meanwhile)
    assert reports[0]["status"] == "paused"
