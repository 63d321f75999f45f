"""The browser playground (`/playground`) in a real browser against a live demo server.

Debian's Chromium, driven by Playwright (which cannot download a browser of its own here).
Each test clicks through one page and checks what the page shows against the API itself.
Screenshots go to $STEERSERVE_SCREENSHOTS when set (`make screenshots` writes README's).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
import safetensors.numpy
from conftest import write_llamacpp_gguf
from live_server import live_server

from server.demo import DEMO_MODEL, SHIPPED_VECTORS_DIR

ADMIN = "k-admin"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    # The shipped vectors, copied: uploads and deletes must not touch the work tree.
    vectors = shutil.copytree(SHIPPED_VECTORS_DIR, root / "vectors")
    log = root / "serve.log"
    args = ["--enforce-eager", "--dtype", "float32", "--admin-key", ADMIN]
    args += ["--vectors-dir", str(vectors)]
    with live_server(args, log) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        message = "Chromium is not installed (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, base):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda e: errors.append(str(e)))
    yield p
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _shot(page, name: str, tmp_path: Path) -> None:
    out = os.environ.get("STEERSERVE_SCREENSHOTS")
    path = Path(out) / f"{name}.png" if out else tmp_path / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def _open(page, base: str, name: str, admin: bool = False) -> None:
    page.goto(f"{base}/playground")
    if admin:
        page.fill("#admin-key", ADMIN)
        page.press("#admin-key", "Tab")  # `change`: stored for the page's calls
    page.goto(f"{base}/playground#{name}")
    page.wait_for_selector(f"#page-{name}[data-ready=true]")


def _chat(base: str, prompt: str, headers: dict | None = None, **body) -> httpx.Response:
    messages = [{"role": "user", "content": prompt}]
    return httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": DEMO_MODEL, "messages": messages, **body},
        headers=headers,
        timeout=120,
    )


def _error(page, name: str) -> str:
    box = page.locator(f"#page-{name} [data-testid=error]")
    box.wait_for(state="visible")
    return box.inner_text()


def test_page_is_served_without_network(base):
    r = httpx.get(f"{base}/playground", timeout=30)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    for asset in ("app.js", "api.js", "compare.js", "readout.js", "plots.js", "style.css"):
        got = httpx.get(f"{base}/playground/static/{asset}", timeout=30)
        assert got.status_code == 200, asset
        assert "https://" not in got.text, asset
    assert httpx.get(f"{base}/playground/static/../app.py", timeout=30).status_code == 404


def test_compare_streams_columns_that_differ_and_snippets_reproduce(page, base, tmp_path):
    _open(page, base, "compare")
    columns = page.locator("[data-testid=column]")
    assert columns.count() == 2
    page.fill("#compare-prompt", "how was your day?")
    second = columns.nth(1)
    assert second.locator("[data-testid=vector-name]").input_value() == "positive"
    second.locator("[data-testid=vector-scale]").fill("2")
    spec = json.loads(second.locator("[data-testid=spec]").input_value())
    assert spec == {"vectors": [{"name": "positive", "scale": 2}]}
    page.click("#compare-run")
    page.wait_for_selector("[data-testid=column] [data-testid=output][data-done=true]")
    first_text = columns.nth(0).locator("[data-testid=output]").inner_text()
    second_text = second.locator("[data-testid=output]").inner_text()
    assert first_text and second_text and first_text != second_text
    assert columns.nth(0).locator("[data-testid=echo]").inner_text() == "unsteered"
    assert "fingerprint" in second.locator("[data-testid=echo]").inner_text()
    # The curl snippet is the column's request: run it and get the column's text.
    second.locator("[data-testid=copy-curl]").click()
    curl = second.locator("[data-testid=snippet]").input_value()
    assert curl.startswith(f"curl {base}/v1/chat/completions")
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0])
    assert body["steering"] == spec and body["model"] == DEMO_MODEL
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.json()["choices"][0]["message"]["content"] == second_text
    second.locator("[data-testid=copy-python]").click()
    python = second.locator("[data-testid=snippet]").input_value()
    assert 'extra_body={"steering": {"vectors": [{"name": "positive", "scale": 2}]}}' in python
    compile(python, "snippet.py", "exec")  # valid Python
    _shot(page, "playground-compare", tmp_path)


def test_bad_specs_show_the_fields_error(page, base):
    _open(page, base, "compare")
    spec = page.locator("[data-testid=column]").nth(1).locator("[data-testid=spec]")
    spec.fill('{"vectors": [{"name": "nope"}]}')
    page.click("#compare-run")
    message = _error(page, "compare")
    assert message.startswith("400: ") and "variants[1]" in message and "'nope'" in message
    spec.fill('{"vectors": [{"name": "positive", "layers": [99]}]}')
    page.click("#compare-run")
    page.wait_for_function(
        "!document.querySelector('#page-compare [data-testid=error]').textContent.includes('nope')"
    )
    assert "layers" in _error(page, "compare")
    spec.fill("{not json")
    page.click("#compare-run")
    page.wait_for_function(
        "document.querySelector('#page-compare [data-testid=error]').textContent"
        ".includes('not valid JSON')"
    )
    assert "column 2" in _error(page, "compare")


def test_readout_colours_each_token_and_fills_the_heatmap(page, base, tmp_path):
    _open(page, base, "readout")
    page.select_option("#readout-probe", "positive")
    page.fill("#readout-prompt", "how was your day?")
    page.fill("#readout-max-tokens", "12")
    page.click("#readout-run")
    page.wait_for_selector("[data-testid=heatmap] table")
    vector = httpx.get(f"{base}/v1/vectors/positive", timeout=30).json()
    # The same request through the API: the page shows its tokens and values.
    readout = [{"name": "positive", "layer": layer} for layer in vector["layers"]]
    api = _chat(
        base,
        "how was your day?",
        max_tokens=12,
        temperature=0,
        logprobs=True,
        steering={"readout": readout},
    ).json()["choices"][0]
    tokens = [t["token"] for t in api["logprobs"]["content"]]
    spans = page.locator("[data-testid=readout-tokens] span.tok")
    assert spans.all_inner_texts() == tokens
    layer = int(page.locator("#readout-layer").input_value())
    want = next(e["values"] for e in api["readout"] if e["layer"] == layer)
    got = [float(v) for v in spans.evaluate_all("els => els.map(e => e.dataset.value)")]
    assert got == pytest.approx(want, abs=1e-5)
    rows = page.locator("[data-testid=heatmap] tr[data-layer]")
    assert rows.count() == len(vector["layers"])
    for i in range(rows.count()):
        assert rows.nth(i).locator("td.cell").count() == len(tokens)  # one cell per token
    assert page.locator("[data-testid=layer-plot] circle.point").count() == len(vector["layers"])
    _shot(page, "playground-readout", tmp_path)


EXPERIMENT = {
    "name": "tone-ui",
    "arms": [
        {"name": "control", "steering": {"vectors": []}},
        {"name": "positive", "steering": {"vectors": [{"name": "positive", "scale": 1.0}]}},
    ],
    "metrics": {"thumbs": "boolean"},
}


def test_experiments_list_counts_report_and_actions(page, base, tmp_path):
    r = httpx.put(
        f"{base}/v1/admin/experiments/{EXPERIMENT['name']}",
        json=EXPERIMENT,
        headers=ADMIN_H,
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    for i in range(12):
        out = _chat(
            base,
            "tell me about the food.",
            max_tokens=8,
            user=f"user-é-{i}",  # the unit
            headers={"X-Experiment": EXPERIMENT["name"]},
        )
        assert out.status_code == 200, out.text
        fb = {"id": out.json()["id"], "metric": "thumbs", "value": i % 3 != 0}
        assert httpx.post(f"{base}/v1/feedback", json=fb, timeout=30).status_code == 200
    # Without the admin key the page says why.
    _open(page, base, "experiments")
    assert "401" in _error(page, "experiments") and "admin key" in _error(page, "experiments")
    _open(page, base, "experiments", admin=True)
    row = page.locator(f"#experiments-table tr[data-name='{EXPERIMENT['name']}']")
    row.locator("button").click()
    page.wait_for_selector("[data-testid=report-table]")
    report = httpx.get(f"{base}/v1/experiments/{EXPERIMENT['name']}/report", timeout=30).json()
    for arm in report["arms"]:
        shown = page.locator(f"#experiment-arms tr[data-arm='{arm['name']}'] td.requests")
        assert int(shown.inner_text()) == arm["requests"]
    assert sum(a["requests"] for a in report["arms"]) == 12
    table = page.locator("[data-testid=report-table]")
    assert table.locator("tr[data-arm]").count() == 2
    assert page.locator("[data-testid=interval-plot] circle.point").count() == 2
    _shot(page, "playground-experiments", tmp_path)
    title = "document.querySelector('#experiment-title').textContent"
    page.click("#page-experiments [data-action=pause]")
    page.wait_for_function(f"{title}.includes('paused')")
    url = f"{base}/v1/admin/experiments/{EXPERIMENT['name']}"
    assert httpx.get(url, headers=ADMIN_H, timeout=30).json()["status"] == "paused"
    page.click("#page-experiments [data-action=resume]")
    page.wait_for_function(f"{title}.includes('running')")


def test_vectors_upload_download_delete(page, base, tmp_path):
    original = httpx.get(f"{base}/v1/vectors/positive?format=safetensors", timeout=30)
    assert original.status_code == 200
    path = tmp_path / "uploaded_pos.safetensors"
    path.write_bytes(original.content)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a vector file")
    _open(page, base, "vectors")
    assert page.locator("#vectors-table tr[data-name='positive']").count() == 1
    # No admin key: the upload's 401 is shown.
    page.set_input_files("#vector-file", str(path))
    page.click("#vector-upload button[type=submit]")
    assert "401" in _error(page, "vectors")
    _open(page, base, "vectors", admin=True)
    page.set_input_files("#vector-file", str(path))
    page.click("#vector-upload button[type=submit]")
    page.wait_for_selector("#vectors-table tr[data-name='uploaded_pos']")
    assert "stored vector uploaded_pos" in page.locator("[data-testid=notice]").inner_text()
    listed = httpx.get(f"{base}/v1/vectors/uploaded_pos", timeout=30).json()
    assert listed["usable"] and listed["layers"]
    row = page.locator("#vectors-table tr[data-name='uploaded_pos']")
    with page.expect_download() as download:
        row.locator("button", has_text="safetensors").click()
    # The same tensors as uploaded (safetensors writes its metadata in no fixed order).
    got = safetensors.numpy.load(Path(download.value.path()).read_bytes())
    want = safetensors.numpy.load(original.content)
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in want)
    _shot(page, "playground-vectors", tmp_path)
    # The demo vectors have layer 0, which llama.cpp's GGUF control vectors cannot hold.
    row.locator("button", has_text="gguf").click()
    assert "400" in _error(page, "vectors") and "layer 0" in _error(page, "vectors")
    page.set_input_files("#vector-file", str(broken))
    page.click("#vector-upload button[type=submit]")
    page.wait_for_function(
        "document.querySelector('#page-vectors [data-testid=error]').textContent"
        ".includes('safetensors')"
    )
    row.locator("[data-testid=delete]").click()
    page.wait_for_selector("#vectors-table tr[data-name='uploaded_pos']", state="detached")
    assert httpx.get(f"{base}/v1/vectors/uploaded_pos", timeout=30).status_code == 404
    # A llama.cpp control vector (layers 1-3 of `positive`), named in the form.
    directions = {int(k.split(".")[1]): v for k, v in want.items() if k != "layer.0"}
    gguf = tmp_path / "control.gguf"
    write_llamacpp_gguf(gguf, directions)
    page.fill("#vector-name", "from_llamacpp")
    page.set_input_files("#vector-file", str(gguf))
    page.click("#vector-upload button[type=submit]")
    page.wait_for_selector("#vectors-table tr[data-name='from_llamacpp']")
    listed = httpx.get(f"{base}/v1/vectors/from_llamacpp", timeout=30).json()
    assert listed["layers"] == sorted(directions) and listed["usable"]
