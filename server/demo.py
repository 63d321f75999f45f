"""The built-in demo model and its shipped vectors.

The model is built locally on first run (tiny, random weights, reproducible bit for bit;
a later issue trains a real one). Its vectors in `vectors/` are made from its own weights
by `python -m server.demo`, and `tests/test_demo.py` checks that the shipped files still
match a fresh build: with random weights there is no behaviour to learn a direction from,
so each demo vector is the unembedding direction of one word, added after the last layer.
Steering with it makes the model say that word, which is the effect one can see.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

DEMO_MODEL = "demo-llama-tiny"
SHIPPED_VECTORS_DIR = Path(__file__).resolve().parent.parent / "vectors"
# name -> the word whose unembedding direction it is
DEMO_WORDS = {"happy": " happy", "calm": " calm"}


def cache_dir() -> Path:
    return Path(os.environ.get("STEERSERVE_CACHE", Path.home() / ".cache" / "steerserve"))


def demo_model() -> Path:
    from steering.tiny_models import TinySpec, build_tiny_model

    return build_tiny_model(cache_dir() / "models" / DEMO_MODEL, TinySpec(arch="llama"))


def demo_vectors(model_dir: Path) -> dict:
    """{name: SteeringVector}: unit unembedding direction of each demo word, last layer."""
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    from steering.spec import ModelShape, unit
    from steering.vectors import SteeringVector

    config = AutoConfig.from_pretrained(model_dir)
    shape = ModelShape.from_hf_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    last = shape.num_layers - 1
    out = {}
    for name, word in DEMO_WORDS.items():
        token = tokenizer.encode(word, add_special_tokens=False)[0]
        out[name] = SteeringVector(
            directions={last: unit(np.asarray(lm_head[token], dtype=np.float32))},
            hidden_size=shape.hidden_size,
            architecture=shape.architecture,
            num_layers=shape.num_layers,
            method="unembedding",
            description=f"demo: unembedding direction of {word.strip()!r} "
            f"(token {token}) after the last layer of {DEMO_MODEL}",
        )
    return out


def main() -> None:
    from steering.vectors import save_vector

    parser = argparse.ArgumentParser(description="Write the demo model's vectors.")
    parser.add_argument("--out", type=Path, default=SHIPPED_VECTORS_DIR)
    out = parser.parse_args().out
    for name, vector in demo_vectors(demo_model()).items():
        save_vector(vector, out / f"{name}.safetensors")
        print(f"wrote {out / f'{name}.safetensors'}")


if __name__ == "__main__":
    main()
