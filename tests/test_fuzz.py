"""Property-based fuzzing of the server's own routes from its OpenAPI schema (Schemathesis).

Every steerserve route, and the two completion routes it fronts, gets a bounded number of
schema-valid and schema-violating requests (derandomized: the same cases every run) on a
live server with the admin key. Every answer must be below 500, every 4xx in OpenAI's error
shape with its status as `code`, and a 400 about a field steerserve validates (a spec,
variants, an experiment definition, feedback) must name it in `param`. vLLM's own routes
(tokenize, responses, ...) are vLLM's and are not fuzzed here.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from live_server import live_server
from test_server import server_args

ADMIN = "k-admin"
EXAMPLES = 12  # per operation and mode: about 500 requests in all
OURS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/vectors",
    "/v1/presets",
    "/v1/saes",
    "/v1/steering",
    "/v1/admin",
    "/v1/feedback",
    "/v1/experiments",
)
# A Python error's own text passed through as the message: an unhandled case, not a refusal.
LEAKED = (
    "not supported between instances",
    "object has no attribute",
    "NoneType",
    "unhashable type",
    "is not subscriptable",
    "object is not iterable",
    "Traceback",
)
# Whole-body refusals (not JSON, not an object, not a vector/SAE file): no field to name.
WHOLE_BODY = ("request body", "the body must be", "not a readable", "not a GGUF", "truncated")


@pytest.fixture(scope="module")
def base(model_dirs, vectors_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    args = [*server_args(model_dirs["llama"], vectors_dir), "--admin-key", ADMIN]
    with live_server(args, log) as (url, _):
        yield url


def _operations(base: str):
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.startswith(OURS) and not op.path.endswith("/batch"):
            yield op


def _problem(op, r: httpx.Response) -> str | None:
    if r.status_code >= 500:
        return f"{r.status_code}"
    if r.status_code < 400:
        return None
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} not in OpenAI's error shape"
    if not (isinstance(err.get("message"), str) and err["message"]):
        return "no message"
    if not isinstance(err.get("type"), str) or err.get("code") != r.status_code:
        return "type/code"
    # vLLM's own checks of the OpenAI fields answer in vLLM's words (some of which are a
    # Python error's text, e.g. "'Message' object is not subscriptable" for a message with
    # a list `content` of empty objects): those are vLLM's, not steerserve's; not asserted.
    ours = not op.path.endswith("completions") or any(
        w in err["message"] for w in ("steering", "variants", "experiment")
    )
    if ours and any(w in err["message"] for w in LEAKED):
        return "an internal error's text"
    ours = ours and not op.path.startswith(("/v1/vectors", "/v1/saes", "/v1/presets"))
    whole = any(w in err["message"] for w in WHOLE_BODY)
    if r.status_code == 400 and ours and not whole and not err.get("param"):
        return "400 without param"
    return None


def _fuzz(op, mode, base: str, headers: dict, failures: list[str], tried: list[int]) -> None:
    @given(case=op.as_strategy(mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
            case.body["max_tokens"] = min(case.body["max_tokens"], 4)  # bounded budget
        r = case.call(base_url=base, headers=headers, timeout=120)
        tried.append(r.status_code)
        problem = _problem(op, r)
        if problem:
            body = json.dumps(case.body, default=str)[:300] if case.body is not None else ""
            failures.append(f"{op.method.upper()} {op.path}: {problem}: {r.text[:300]} {body}")

    run()


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_fail_the_server(base, mode):
    headers = {"Authorization": f"Bearer {ADMIN}"}
    failures: list[str] = []
    tried: list[int] = []
    for op in _operations(base):
        try:
            _fuzz(op, mode, base, headers, failures, tried)
        except Unsatisfiable:  # nothing to violate (no parameters): the positive run has it
            assert mode == schemathesis.GenerationMode.NEGATIVE, op.path
    assert len(tried) > 100
    assert not failures, "\n".join(failures[:10])
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200


JSON_ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/admin/experiments"),
    ("PUT", "/v1/admin/experiments/x"),
    ("POST", "/v1/feedback"),
]


@pytest.mark.parametrize("method,path", JSON_ROUTES)
@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", '{"prompt": "caf\u00e9'.encode()])
def test_malformed_json_is_a_400_on_every_json_route(base, method, path, body):
    r = httpx.request(
        method,
        f"{base}{path}",
        content=body,
        headers={"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"},
        timeout=30,
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["type"] == "BadRequestError" and err["code"] == 400
    assert "JSON" in err["message"], err


ARM = {"name": "a", "steering": {"vectors": []}}


@pytest.mark.parametrize(
    "definition,param,words",
    [
        ({"name": "e1", "arms": [ARM], "control": "b"}, "control", "'b' is not an arm"),
        ({"name": "e2", "arms": [ARM, ARM]}, "arms", "must be unique"),
        ({"name": "e3", "arms": [ARM], "metrics": {"1x": "boolean"}}, "metrics", "must match"),
    ],
)
def test_experiment_definition_errors_name_the_field(base, definition, param, words):
    """Checks across fields (found by the fuzzer with `param` null) name the field."""
    r = httpx.post(
        f"{base}/v1/admin/experiments",
        json=definition,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err
    assert err["message"].startswith(f"{param}: ")
