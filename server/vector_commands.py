"""`steerserve vectors`: make vectors, check them, look at files and convert them.

    steerserve vectors train --model M --pairs PAIRS.jsonl -o OUT.safetensors
                             [--method pca_diff] [--layers all] [--positions last]
                             [--template raw|chat] [--export gguf] [engine flags]
    steerserve vectors eval  --model M --pairs PAIRS.jsonl VECTOR [--plot OUT.png] [--json]
    steerserve vectors info FILE [FILE ...] [--json]
    steerserve vectors convert IN OUT [--architecture A] [--num-layers N] [--description D]

train and eval run the model in a vLLM engine (`steering.capture`); info and convert need
no engine.

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

from server.file_info import print_file_info
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
    return print_file_info(
        "vectors",
        args.files,
        lambda path: describe(path, read_any(path)),
        (VectorFileError,),
        _format_info,
        args.json,
    )


def convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if dst.suffix not in SUFFIXES:
        sys.exit(f"steerserve vectors convert: {dst}: write .safetensors or .gguf")
    try:
        vector = read_any(src)
        changes = {
            k: getattr(args, k)
            for k in ("architecture", "num_layers", "description")
            if getattr(args, k) is not None
        }
        vector = dataclasses.replace(vector, **changes)  # re-checked (layers vs num_layers)
        if dst.suffix == ".gguf":
            export_gguf(vector, dst)
        else:
            save_vector(vector, dst)
    except (OSError, VectorFileError) as e:
        sys.exit(f"steerserve vectors convert: {e}")
    print(f"wrote {dst} (layers {_ranges(vector.layers)})")
    return 0


# --- train / eval ----------------------------------------------------------------------


def _layers(text: str, num_layers: int) -> list[int]:
    """'all', or comma-separated layers and ranges ('2,4-6')."""
    if text == "all":
        return list(range(num_layers))
    layers: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            layers.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            sys.exit(f"--layers: {text!r} is not 'all' or a list like 2,4-6")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        sys.exit(f"--layers: {bad} out of range 0..{num_layers - 1}")
    return sorted(set(layers))


def _capturer(args: argparse.Namespace):
    from steering.capture import CaptureFailed, Capturer

    kw = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k) is not None}
    try:
        return Capturer(args.model, **kw)
    except CaptureFailed as e:
        sys.exit(f"steerserve vectors: {e}")


def _capture(args: argparse.Namespace, capturer, pairs, layers: list[int]):
    from tqdm import tqdm

    from steering.training import capture_pairs

    with tqdm(total=2 * len(pairs), unit="prompt", desc="capturing", disable=args.quiet) as bar:
        return capture_pairs(capturer, pairs, layers, args.positions, args.template, bar)


def _load_pairs(path: str):
    from steering.training import PairsError, load_pairs

    try:
        return load_pairs(path)
    except (OSError, PairsError) as e:
        sys.exit(f"--pairs: {e}")


def train(args: argparse.Namespace) -> int:
    from steering.training import directions, provenance

    out = Path(args.output)
    if out.suffix != ".safetensors":
        sys.exit(f"-o/--output: {out}: write a .safetensors file (add --export gguf for GGUF)")
    pairs = _load_pairs(args.pairs)
    capturer = _capturer(args)
    shape = capturer.shape
    layers = _layers(args.layers, shape.num_layers)
    pos, neg = _capture(args, capturer, pairs, layers)
    vectors = directions(pos, neg, args.method)
    vector = SteeringVector(
        directions=dict(zip(layers, vectors, strict=True)),
        hidden_size=shape.hidden_size,
        architecture=shape.architecture,
        num_layers=shape.num_layers,
        method=args.method,
        description=args.description,
        extra=provenance(args.model, len(pairs), args.method, args.positions, args.template),
    )
    save_vector(vector, out)
    written = [out]
    if args.export == "gguf":
        # llama.cpp cannot load a direction for layer 0 (see vectors.export_gguf).
        kept = {i: v for i, v in vector.directions.items() if i != 0}
        if not kept:
            sys.exit("--export gguf: layer 0 alone cannot be written to GGUF")
        if len(kept) < len(vector.directions):
            print("--export gguf: layer 0 left out of the GGUF (llama.cpp cannot load it)")
        gguf_vector = dataclasses.replace(vector, directions=kept)
        written.append(
            export_gguf(gguf_vector, out.with_suffix(".gguf"), model_hint=shape.architecture)
        )
    stats = capturer.stats
    print(
        f"wrote {', '.join(map(str, written))}: {args.method} over {len(pairs)} pairs, "
        f"layers {_ranges(layers)}; captured {stats.prompt_tokens} tokens in "
        f"{stats.seconds:.1f} s ({stats.tokens_per_second:,.0f} tokens/s)"
    )
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from steering.training import separation

    try:
        vector = read_any(Path(args.vector))
    except (OSError, VectorFileError) as e:
        sys.exit(f"steerserve vectors eval: {e}")
    pairs = _load_pairs(args.pairs)
    capturer = _capturer(args)
    problem = vector.fits(capturer.shape)
    if problem:
        sys.exit(f"steerserve vectors eval: {args.vector} {problem}")
    layers = vector.layers
    pos, neg = _capture(args, capturer, pairs, layers)
    seps = [
        separation(layer, vector.directions[layer], pos[:, k], neg[:, k])
        for k, layer in enumerate(layers)
    ]
    if args.json:
        print(json.dumps([s.row() for s in seps], indent=2))
    else:
        print(f"{args.vector} on {len(pairs)} pairs ({args.positions} token, {args.template})")
        print(f"{'layer':>5}  {'accuracy':>8}  {'gap':>10}  {'effect d':>8}")
        best = max(seps, key=lambda s: s.effect_size)
        for s in seps:
            mark = "  <- best" if s is best else ""
            print(f"{s.layer:>5}  {s.accuracy:>8.3f}  {s.gap:>10.4g}  {s.effect_size:>8.3f}{mark}")
    if args.plot:
        plot_separation(seps, args.plot, title=f"{Path(args.vector).name} on {args.pairs}")
    return 0


def plot_separation(seps, path: str, title: str) -> None:
    """Per layer: the pairs' projections (positive vs negative) and the effect size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(max(6, 0.5 * len(seps) + 3), 6), sharex=True, height_ratios=(3, 1)
    )
    x = np.arange(len(seps))
    for offset, side, color in ((-0.15, "pos", "tab:green"), (0.15, "neg", "tab:red")):
        for i, s in enumerate(seps):
            values = getattr(s, side)
            top.scatter(
                np.full(len(values), x[i] + offset),
                values,
                s=8,
                alpha=0.5,
                color=color,
                label=("positive" if side == "pos" else "negative") if i == 0 else None,
            )
    top.set_ylabel("projection on the unit vector")
    top.legend(loc="best")
    top.set_title(title)
    bottom.bar(x, [s.effect_size for s in seps], color="tab:blue")
    bottom.set_ylabel("effect size d")
    bottom.set_xticks(x, [str(s.layer) for s in seps])
    bottom.set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ENGINE_FLAGS = (
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "tensor_parallel_size",
    "kv_cache_memory_bytes",
    "gpu_memory_utilization",
    "seed",
    "enforce_eager",
    "trust_remote_code",
)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (as for vllm serve)")
    g.add_argument("--model", required=True, help="model directory (or name in the HF cache)")
    g.add_argument("--dtype")
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--tensor-parallel-size", type=int)
    g.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        help="KV cache budget (default on CPU: 256 MiB, whatever else runs)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="vLLM's share of device memory (on CPU: of the NUMA node's RAM)",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--trust-remote-code", action="store_true", default=None)


def _pair_flags(p: argparse.ArgumentParser) -> None:
    from steering.engine.capture import POSITIONS
    from steering.training import TEMPLATES

    p.add_argument("--pairs", required=True, help='JSONL of {"positive": ..., "negative": ...}')
    p.add_argument(
        "--positions",
        choices=[x for x in POSITIONS if x != "all"],
        default="last",
        help="which prompt token(s) to read: the last one, or the prompt mean",
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="raw",
        help="raw: the text as is; chat: through the model's chat template",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _engine_flags(p)


def _parser() -> argparse.ArgumentParser:
    from steering.training import METHODS

    parser = argparse.ArgumentParser(prog="steerserve vectors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="vectors from contrastive pairs")
    p.add_argument("-o", "--output", required=True, help="OUT.safetensors")
    p.add_argument("--method", choices=METHODS, default="pca_diff")
    p.add_argument("--layers", default="all", help='"all" or e.g. 2,4-6')
    p.add_argument("--export", choices=["gguf"], help="also write OUT.gguf (llama.cpp/repeng)")
    p.add_argument("--description")
    _pair_flags(p)
    p.set_defaults(run=train)
    p = sub.add_parser("eval", help="how well a vector separates pairs, per layer")
    p.add_argument("vector", help="a .safetensors or .gguf vector")
    p.add_argument("--plot", help="write a PNG of the projections and effect sizes")
    p.add_argument("--json", action="store_true")
    _pair_flags(p)
    p.set_defaults(run=evaluate)
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
