"""`steerserve vectors`: look at vector files and convert them, no server or engine needed.

    steerserve vectors info FILE [FILE ...] [--json]
    steerserve vectors convert IN OUT [--architecture A] [--num-layers N] [--description D]

Formats by extension: `.safetensors` (ours, with metadata) and `.gguf` (llama.cpp/repeng
control vectors). GGUF carries no layer count or method, so converting from it takes them
as flags; converting to it refuses what llama.cpp cannot load (layer 0, head-site vectors).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from steering.vectors import (
    SUFFIXES,
    SteeringVector,
    VectorFileError,
    export_gguf,
    read_any,
    save_vector,
)


def _ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out: list[str] = []
    start = prev = None
    for layer in [*layers, None]:
        if start is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = layer
    return ", ".join(out)


def describe(path: Path, vector: SteeringVector) -> dict[str, Any]:
    norms = {layer: float(np.linalg.norm(vector.directions[layer])) for layer in vector.layers}
    return {
        "file": str(path),
        "format": path.suffix.lstrip("."),
        "site": vector.site,
        "hidden_size": vector.hidden_size,
        "num_heads": vector.num_heads,
        "head_dim": vector.head_dim,
        "layers": vector.layers,
        "norms": norms,
        "architecture": vector.architecture,
        "num_layers": vector.num_layers,
        "method": vector.method,
        "description": vector.description,
        "metadata": dict(vector.extra),
    }


def _format_info(info: dict[str, Any]) -> str:
    norms = list(info["norms"].values())
    width = f"{info['hidden_size']}"
    if info["site"] == "heads":
        width += f" ({info['num_heads']} heads x {info['head_dim']})"
    lines = [
        info["file"],
        f"  format       {info['format']}",
        f"  site         {info['site']}, width {width}",
        f"  layers       {_ranges(info['layers'])} ({len(info['layers'])} of "
        f"{info['num_layers'] if info['num_layers'] is not None else '?'})",
        f"  norm         {min(norms):.4g} .. {max(norms):.4g}",
    ]
    for key in ("architecture", "method", "description"):
        if info[key] is not None:
            lines.append(f"  {key:<12} {info[key]}")
    for key, value in info["metadata"].items():
        lines.append(f"  {key:<12} {value}")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    status = 0
    described = []
    for name in args.files:
        path = Path(name)
        try:
            described.append(describe(path, read_any(path)))
        except (OSError, VectorFileError) as e:
            print(f"steerserve vectors info: {path}: {e}", file=sys.stderr)
            status = 1
    if args.json:
        print(json.dumps(described, indent=2))
    else:
        print("\n\n".join(_format_info(d) for d in described))
    return status


def convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if dst.suffix not in SUFFIXES:
        sys.exit(f"steerserve vectors convert: {dst}: write .safetensors or .gguf")
    try:
        vector = read_any(src)
        changes = {k: getattr(args, k) for k in ("architecture", "num_layers", "description")
                   if getattr(args, k) is not None}  # fmt: skip
        vector = dataclasses.replace(vector, **changes)  # re-checked (layers vs num_layers)
        if dst.suffix == ".gguf":
            export_gguf(vector, dst)
        else:
            save_vector(vector, dst)
    except (OSError, VectorFileError) as e:
        sys.exit(f"steerserve vectors convert: {e}")
    print(f"wrote {dst} (layers {_ranges(vector.layers)})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve vectors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what a vector file holds")
    p.add_argument("files", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=info)
    p = sub.add_parser("convert", help="GGUF <-> safetensors")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--architecture", help="the model class it is for (GGUF has only a hint)")
    p.add_argument("--num-layers", type=int, help="the model's layer count (not in GGUF)")
    p.add_argument("--description")
    p.set_defaults(run=convert)
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    sys.exit(args.run(args))
