"""The committed demo model and its vectors are what the project's scripts make."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer

from demo import train
from demo import vectors as demo_vectors
from server.demo import DEMO_MODEL_DIR, SHIPPED_VECTORS_DIR
from steering.vectors import read_any


def test_checkpoint_is_a_small_llama_with_a_chat_template():
    config = AutoConfig.from_pretrained(DEMO_MODEL_DIR)
    assert config.model_type == "llama" and config.head_dim == 64
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 25 << 20, size
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>hi<|end|><|assistant|>"
    trained = json.loads((DEMO_MODEL_DIR / "training.json").read_text())
    assert trained["args"]["steps"] == 3000 and trained["final_loss"] < 1.5


def test_training_is_deterministic_by_seed(tmp_path):
    small = [
        "--conversations",
        "300",
        "--recall-lines",
        "100",
        "--vocab-size",
        "400",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--heads",
        "1",
        "--batch",
        "4",
        "--steps",
        "3",
    ]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        train.main(["--out", str(tmp_path / name), "--seed", seed, *small])
    a, b, c = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()


def test_shipped_vectors_are_what_demo_vectors_makes(tmp_path):
    """`python -m demo.vectors` (steerserve vectors train on contrast pairs) remakes them."""
    for name in demo_vectors.ATTRIBUTES:
        assert (SHIPPED_VECTORS_DIR / f"{name}.safetensors").is_file(), name
    demo_vectors.main(["--only", "positive", "--out", str(tmp_path)])
    for name in ("positive",):
        fresh = read_any(tmp_path / f"{name}.safetensors")
        shipped = read_any(SHIPPED_VECTORS_DIR / f"{name}.safetensors")
        assert shipped.layers == fresh.layers and shipped.method == "mean_diff"
        for layer in fresh.layers:
            # Same engine, model and prompts; summation order may differ across machines.
            np.testing.assert_allclose(
                shipped.directions[layer], fresh.directions[layer], rtol=1e-4, atol=1e-5
            )
