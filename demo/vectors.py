"""The demo model's shipped vectors, made by `steerserve vectors train` from contrast pairs.

    python -m demo.vectors                       # rewrites vectors/<attribute>.safetensors
    python -m demo.vectors --only positive --out /tmp/v

Each attribute (a sentiment or a topic) gets `PAIRS` pairs from `demo.corpus.contrast_pairs`:
the same conversation with the attribute and without it, through the chat template, read as
the prompt mean at every layer and reduced to the mean difference. A mean difference keeps
its length, so scale 1 moves the stream by as much as the corpus's own contrast does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from demo.corpus import SENTIMENT, TOPICS, contrast_pairs

ATTRIBUTES = (*SENTIMENT, *TOPICS)
PAIRS = 200
PAIRS_SEED = 5
RECIPE = [
    "--method",
    "mean_diff",
    "--positions",
    "mean",
    "--template",
    "chat",
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "512",
]


def write_pairs(attribute: str, path: Path) -> Path:
    with path.open("w") as f:
        for pair in contrast_pairs(attribute, PAIRS, seed=PAIRS_SEED):
            f.write(json.dumps(pair) + "\n")
    return path


def train_command(model: Path, pairs: Path, out: Path, attribute: str) -> list[str]:
    what = "sentiment" if attribute in SENTIMENT else "topic"
    description = (
        f"demo model: {what} '{attribute}' ({PAIRS} contrast pairs from "
        f"demo.corpus, python -m demo.vectors)"
    )
    return [
        sys.executable,
        "-m",
        "server.cli",
        "vectors",
        "train",
        "--model",
        str(model),
        "--pairs",
        str(pairs),
        "-o",
        str(out),
        "--description",
        description,
        "--quiet",
        *RECIPE,
    ]


def main(argv: list[str] | None = None) -> None:
    from server.demo import SHIPPED_VECTORS_DIR, demo_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the shipped demo model)")
    p.add_argument("--out", type=Path, default=SHIPPED_VECTORS_DIR)
    p.add_argument("--only", help="comma-separated attributes (default: all)")
    args = p.parse_args(argv)
    model = args.model or demo_model()
    attributes = args.only.split(",") if args.only else ATTRIBUTES
    unknown = sorted(set(attributes) - set(ATTRIBUTES))
    if unknown:
        sys.exit(f"--only: unknown attributes {unknown} (known: {', '.join(ATTRIBUTES)})")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for attribute in attributes:
            pairs = write_pairs(attribute, Path(tmp) / f"{attribute}.jsonl")
            out = args.out / f"{attribute}.safetensors"
            subprocess.run(train_command(model, pairs, out, attribute), check=True)


if __name__ == "__main__":
    main()
