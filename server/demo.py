"""The built-in demo model: what `steerserve serve` (and `make serve`) serves without --model.

A small Llama trained on the synthetic corpus of `demo/corpus.py` (topics x sentiment
conversations and copy/recall lines) by `python -m demo.train`, committed under
`demo/model/`; its vectors in `vectors/` are made by `python -m demo.vectors` with
`steerserve vectors train`. Nothing is downloaded or built at start-up.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = "steerserve-demo"
DEMO_MODEL_DIR = ROOT / "demo" / "model"
SHIPPED_VECTORS_DIR = ROOT / "vectors"
DEMO_SAES_DIR = ROOT / "demo" / "saes"  # the demo model's SAE (python -m demo.sae)
DEMO_MAX_FEATURES = 8
DEMO_MAX_DYNAMIC = 2  # scheduled / RMS-relative / gated adds per request on the demo model
DEMO_MAX_CONDITIONS = 2
DEMO_TOPK_SAE = "demo"  # top-k readout on the demo SAE (demo/saes/demo.safetensors)


def demo_model() -> Path:
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise SystemExit(
            f"steerserve serve: the demo model is missing from {DEMO_MODEL_DIR} (it ships "
            "with the source tree); pass --model, or rebuild it with "
            f"`python -m demo.train --out {DEMO_MODEL_DIR}` (about 17 minutes on 2 cores)"
        )
    return DEMO_MODEL_DIR
