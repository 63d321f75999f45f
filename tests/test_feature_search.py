"""`steerserve features search`: decoder cosines on a synthetic SAE (no engine), and the
activation difference end to end on the demo model with its shipped SAE."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from demo.corpus import TOPICS, conversation
from server.demo import DEMO_MODEL_DIR, DEMO_SAES_DIR, ROOT
from server.feature_commands import activation_difference, decoder_cosines, load_prompts, main
from steering.sae import SparseAutoencoder, save_sae
from steering.vectors import SteeringVector, save_vector

HIDDEN, WIDTH, LAYER = 32, 64, 1


def _sae() -> SparseAutoencoder:
    rng = np.random.default_rng(3)
    w_dec = rng.standard_normal((WIDTH, HIDDEN))
    # Rows of different lengths: the search must compare directions, not sizes.
    w_dec *= rng.uniform(0.2, 5.0, size=(WIDTH, 1))
    return SparseAutoencoder(
        w_enc=rng.standard_normal((HIDDEN, WIDTH)),
        b_enc=np.zeros(WIDTH),
        w_dec=w_dec,
        b_dec=np.zeros(HIDDEN),
        layer=LAYER,
        labels={7: "seven"},
    )


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    sae = _sae()
    paths = {"sae": save_sae(sae, tmp_path / "s.safetensors")}
    for name, direction in (("same", 3.0 * sae.w_dec[7]), ("negated", -0.5 * sae.w_dec[7])):
        paths[name] = save_vector(
            SteeringVector(directions={LAYER: direction, 0: np.ones(HIDDEN)}, hidden_size=HIDDEN),
            tmp_path / f"{name}.safetensors",
        )
    paths["elsewhere"] = save_vector(
        SteeringVector(directions={0: sae.w_dec[7]}, hidden_size=HIDDEN),
        tmp_path / "elsewhere.safetensors",
    )
    return paths


def test_decoder_cosines_rank_the_matching_row_first_and_its_negation_last():
    sae = _sae()
    cos = decoder_cosines(sae, 3.0 * sae.w_dec[7])
    assert int(np.argmax(cos)) == 7 and cos[7] == pytest.approx(1.0)
    assert np.all(np.abs(cos) <= 1 + 1e-9)
    flipped = decoder_cosines(sae, -sae.w_dec[7])
    assert int(np.argmin(flipped)) == 7 and flipped[7] == pytest.approx(-1.0)
    assert np.allclose(flipped, -cos)
    with pytest.raises(ValueError, match="zeros"):
        decoder_cosines(sae, np.zeros(HIDDEN))


def test_search_vector_reports_both_signs(files, capsys):
    code, out, _ = _run(
        capsys, "search", "--sae", str(files["sae"]), "--vector", str(files["same"]), "--json"
    )
    result = json.loads(out)
    assert code == 0 and result["mode"] == "vector" and result["layer"] == LAYER
    first = result["aligned"][0]
    assert first == {"feature": 7, "label": "seven", "score": pytest.approx(1.0)}
    assert all(r["score"] > 0 for r in result["aligned"]) and len(result["aligned"]) == 20
    assert 7 not in [r["feature"] for r in result["opposed"]]
    assert all(r["score"] < 0 for r in result["opposed"])

    # The negated vector, found by name in --vectors-dir: feature 7 is the most opposed.
    code, out, _ = _run(
        capsys,
        "search",
        "--sae",
        str(files["sae"]),
        "--vector",
        "negated",
        "--vectors-dir",
        str(files["negated"].parent),
        "--top",
        "5",
        "--json",
    )
    result = json.loads(out)
    assert result["opposed"][0]["feature"] == 7
    assert result["opposed"][0]["score"] == pytest.approx(-1.0)
    assert len(result["opposed"]) == 5 and 7 not in [r["feature"] for r in result["aligned"]]

    code, out, _ = _run(
        capsys, "search", "--sae", str(files["sae"]), "--vector", str(files["same"]), "--top", "3"
    )
    lines = out.splitlines()
    assert code == 0 and "aligned with the vector" in out and "opposed to the vector" in out
    first = lines[lines.index("aligned with the vector") + 2].split()
    assert first[:2] == ["7", "seven"] and float(first[2]) == pytest.approx(1.0)


def test_search_vector_errors(files, capsys):
    sae = str(files["sae"])
    code, _, err = _run(capsys, "search", "--sae", sae, "--vector", str(files["elsewhere"]))
    assert code and "no direction at the SAE's layer 1" in str(code) + err
    code, _, err = _run(
        capsys, "search", "--sae", sae, "--vector", "nonesuch", "--vectors-dir", "."
    )
    assert code and "nonesuch" in str(code)
    code, _, _ = _run(capsys, "search", "--sae", sae)
    assert "give --vector, or --positive and --negative" in str(code)
    code, _, _ = _run(capsys, "search", "--sae", sae, "--positive", "a.txt", "--negative", "b")
    assert "need --model" in str(code)


def test_activation_difference_and_effect():
    pos = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    neg = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])
    diff, mean_pos, mean_neg, effect = activation_difference(pos, neg)
    assert diff.tolist() == [2.0, -2.0, 0.0]
    assert mean_pos.tolist() == [2.0, 0.0, 2.0] and mean_neg.tolist() == [0.0, 2.0, 2.0]
    # pooled std: sqrt((2 + 0) / 2) = 1; a feature that never varies has effect 0.
    assert effect.tolist() == pytest.approx([2.0, -2.0, 0.0])


def test_load_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("the soup was lovely.\n\n  tell me about the cake.\n")
    assert load_prompts(text) == ["the soup was lovely.", "  tell me about the cake."]
    jsonl = tmp_path / "p.jsonl"
    messages = [{"role": "user", "content": "hi"}]
    jsonl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": messages}))
    assert load_prompts(jsonl) == ["a", messages]
    jsonl.write_text('{"text": "a"}\n')
    with pytest.raises(ValueError, match=":1: a JSON line needs"):
        load_prompts(jsonl)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")


# --- end to end on the demo model ---------------------------------------------------------


def _conversations(path: Path, topics: list[str], count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            c = conversation(rng, topics[i % len(topics)])
            messages = [
                {"role": "user", "content": c.user},
                {"role": "assistant", "content": c.assistant},
            ]
            f.write(json.dumps({"prompt": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def food_search(tmp_path_factory) -> tuple[dict, Path]:
    """One run of the CLI (its own engine: the session's engines serve the tiny test
    models, not the demo model): food conversations against the other topics', drawn with
    a seed that neither the SAE's training nor its labelling used."""
    d = tmp_path_factory.mktemp("search")
    pos = _conversations(d / "food.jsonl", ["food"], 24, seed=31)
    neg = _conversations(d / "other.jsonl", [t for t in sorted(TOPICS) if t != "food"], 24, 32)
    plot = d / "search.png"
    argv = [
        sys.executable,
        "-m",
        "server.cli",
        "features",
        "search",
        "--sae",
        str(DEMO_SAES_DIR / "demo.safetensors"),
        "--positive",
        str(pos),
        "--negative",
        str(neg),
        "--template",
        "chat",
        "--model",
        str(DEMO_MODEL_DIR),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--kv-cache-memory-bytes",
        str(32 << 20),
        "--top",
        "10",
        "--plot",
        str(plot),
        "--json",
        "--quiet",
    ]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # stdout is the JSON alone: the engine's logs go to stderr.
    return json.loads(done.stdout), plot


def test_search_finds_a_food_feature_for_food_prompts(food_search):
    result, plot = food_search
    assert result["mode"] == "activations" and result["prompts"] == [24, 24]
    assert result["layer"] == 2 and result["tokens"] > 24 * 2 * 20
    top5 = result["aligned"][:5]
    labels = [r["label"] for r in top5]
    assert any(label and label.split("#")[0] == "food" for label in labels), top5
    for r in result["aligned"]:
        assert r["score"] == pytest.approx(r["mean_pos"] - r["mean_neg"])
        assert r["score"] > 0 and r["effect"] > 0
    scores = [r["score"] for r in result["aligned"]]
    assert scores == sorted(scores, reverse=True)
    # No food feature is more active on the conversations about other topics.
    assert not any((r["label"] or "").startswith("food") for r in result["opposed"])
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"
