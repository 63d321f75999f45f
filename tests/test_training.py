"""`steerserve vectors train` / `eval`: the methods, the pairs file, and the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ENGINE_KW, HIDDEN, NUM_LAYERS
from pairs import make_pairs, write_pairs

from steering.training import (
    Pair,
    PairsError,
    capture_pairs,
    directions,
    load_pairs,
    render,
    separation,
)
from steering.vectors import import_gguf, load_vector

RNG = np.random.default_rng(7)


def _synthetic(n: int = 40, layers: int = 2, hidden: int = 16):
    """Pairs whose difference is a fixed direction plus noise, on top of shared content."""
    true = RNG.standard_normal((layers, hidden))
    base = RNG.standard_normal((n, layers, hidden)) * 3
    scale = RNG.uniform(0.5, 2.0, (n, 1, 1))
    pos = base + scale * true / 2 + 0.1 * RNG.standard_normal((n, layers, hidden))
    neg = base - scale * true / 2 + 0.1 * RNG.standard_normal((n, layers, hidden))
    return pos.astype(np.float32), neg.astype(np.float32), true


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_mean_diff_is_the_mean_difference():
    pos, neg, _ = _synthetic()
    for k, v in enumerate(directions(pos, neg, "mean_diff")):
        np.testing.assert_allclose(v, (pos[:, k] - neg[:, k]).mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_methods_are_the_top_eigenvector_oriented_to_the_positive_side(method):
    pos, neg, true = _synthetic()
    for k, v in enumerate(directions(pos, neg, method)):
        p, n = pos[:, k].astype(np.float64), neg[:, k].astype(np.float64)
        if method == "pca_diff":
            data = p - n
        else:
            c = (p + n) / 2
            data = np.concatenate([p - c, n - c])
        # An independent computation: the covariance's top eigenvector (what PCA finds).
        _, vecs = np.linalg.eigh(np.cov(data.T))
        assert abs(_cos(v, vecs[:, -1])) > 0.9999
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        # Oriented: positives project higher (and the planted direction is found).
        assert np.mean(p @ v > n @ v) > 0.9
        assert _cos(v, true[k]) > 0.99


def test_orientation_follows_the_pairs_not_the_svd_sign():
    pos, neg, _ = _synthetic()
    flipped = directions(neg, pos, "pca_diff")
    for a, b in zip(directions(pos, neg, "pca_diff"), flipped, strict=True):
        np.testing.assert_allclose(a, -b, atol=1e-5)


def test_separation_statistics():
    pos, neg, true = _synthetic()
    s = separation(3, true[0], pos[:, 0], neg[:, 0])
    u = true[0] / np.linalg.norm(true[0])
    a, b = pos[:, 0] @ u, neg[:, 0] @ u
    assert s.layer == 3 and s.accuracy == pytest.approx(np.mean(a > b))
    assert s.gap == pytest.approx(np.mean(a - b), rel=1e-5)
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    assert s.effect_size == pytest.approx((a - b).mean() / pooled, rel=1e-5)


def test_pairs_file_errors_name_the_line(tmp_path):
    good = json.dumps({"positive": "a", "negative": "b"})
    cases = {
        "not JSON": f"{good}\n{{oops\n",
        "'negative' must be": f'{good}\n{{"positive": "x"}}\n',
        "'positive' must be": f'{good}\n{{"positive": [{{"role": "user"}}], "negative": "b"}}\n',
        "at least 2": f"{good}\n",
    }
    for why, text in cases.items():
        path = tmp_path / "p.jsonl"
        path.write_text(text)
        with pytest.raises(PairsError, match=why) as e:
            load_pairs(path)
        if why != "at least 2":
            assert f"{path}:2" in str(e.value)
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hello"}]
    path.write_text(f"{good}\n{json.dumps({'positive': messages, 'negative': 'b'})}\n\n")
    assert load_pairs(path)[1] == Pair(messages, "b")


def test_chat_template_and_raw_rendering(capturer):
    tok = capturer.tokenizer
    text = render("the cat", tok, "chat")
    want = tok.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, tokenize=False
    )
    assert text == want and text != "the cat"
    assert render("the cat", tok, "raw") == "the cat"
    with pytest.raises(PairsError, match="--template chat"):
        render([{"role": "user", "content": "x"}], tok, "raw")


def test_capture_pairs_orders_positive_and_negative(capturer):
    pairs = [Pair(**p) for p in make_pairs(3)]
    pos, neg = capture_pairs(capturer, pairs, [1, 2])
    assert pos.shape == neg.shape == (3, 2, HIDDEN)
    alone = capturer.capture([pairs[1].negative], [1, 2])[0]
    np.testing.assert_allclose(neg[1], alone, rtol=1e-5, atol=1e-5)


FLAGS = [
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "256",
    "--kv-cache-memory-bytes",
    str(ENGINE_KW["kv_cache_memory_bytes"]),
    "--quiet",
]


def _vectors(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "vectors", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_train_and_eval_commands(model_dirs, capturer, tmp_path):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "mood.safetensors"
    r = _vectors(
        "train",
        "--model",
        str(model_dirs["llama"]),
        "--pairs",
        str(pairs),
        "-o",
        str(out),
        "--method",
        "mean_diff",
        "--layers",
        "0,2-3",
        "--export",
        "gguf",
        "--description",
        "test mood",
        *FLAGS,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 0 left out of the GGUF" in r.stdout and "tokens/s" in r.stdout
    vector = load_vector(out)
    assert vector.layers == [0, 2, 3] and vector.method == "mean_diff"
    assert vector.num_layers == NUM_LAYERS and vector.architecture == "LlamaForCausalLM"
    assert vector.extra["samples"] == "24" and vector.extra["positions"] == "last"
    assert vector.description == "test mood" and vector.extra["created"].startswith("20")
    # The command's vectors are the in-process computation's (same engine kernels).
    pos, neg = capture_pairs(capturer, [Pair(**p) for p in make_pairs()], [0, 2, 3])
    for k, v in enumerate(directions(pos, neg, "mean_diff")):
        np.testing.assert_allclose(vector.directions[[0, 2, 3][k]], v, rtol=1e-4, atol=1e-5)
    gguf = import_gguf(out.with_suffix(".gguf"))
    assert gguf.layers == [2, 3]
    np.testing.assert_array_equal(gguf.directions[3], vector.directions[3])

    plot = tmp_path / "eval.png"
    r = _vectors(
        "eval",
        str(out),
        "--model",
        str(model_dirs["llama"]),
        "--pairs",
        str(pairs),
        "--plot",
        str(plot),
        "--json",
        *FLAGS,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()  # vLLM logs to stdout too: the JSON is the "[" ... "]" block
    start = lines.index("[")
    rows = json.loads("\n".join(lines[start : lines.index("]", start) + 1]))
    assert [row["layer"] for row in rows] == [0, 2, 3]
    for row, k in zip(rows, range(3), strict=True):
        want = separation(row["layer"], vector.directions[row["layer"]], pos[:, k], neg[:, k])
        assert row["accuracy"] == pytest.approx(want.accuracy)
        assert row["effect_size"] == pytest.approx(want.effect_size, rel=1e-3)
    assert plot.stat().st_size > 10_000


def test_train_refuses_bad_input_before_starting_an_engine(model_dirs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a"}\n')
    r = _vectors(
        "train",
        "--model",
        str(model_dirs["llama"]),
        "--pairs",
        str(bad),
        "-o",
        str(tmp_path / "x.safetensors"),
        *FLAGS,
    )
    assert r.returncode != 0 and f"{bad}:1" in r.stderr and "'negative'" in r.stderr
    r = _vectors(
        "train",
        "--model",
        str(model_dirs["llama"]),
        "--pairs",
        str(bad),
        "-o",
        str(tmp_path / "x.gguf"),
        *FLAGS,
    )
    assert r.returncode != 0 and "write a .safetensors file" in r.stderr


def test_a_tied_vote_keeps_sklearns_sign():
    # Two pairs, one voting each way: the sign is sklearn's (largest entry positive), as
    # repeng's is, whatever sign the SVD happened to return.
    pos = np.array([[[0.0, 3.0, 1.0]], [[0.0, -3.0, 0.0]]], dtype=np.float32)
    neg = np.zeros_like(pos)
    for data in (pos, -pos):
        (v,) = directions(data, neg, "pca_diff")
        assert v[np.argmax(np.abs(v))] > 0
