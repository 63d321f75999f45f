"""`steerserve features`: look at sparse autoencoders, convert them, search their features.

    steerserve features info PATH [PATH ...] [--layer N] [--json]
    steerserve features convert SRC DST.safetensors [--layer N]
    steerserve features search --sae PATH [--layer N] (--vector NAME_OR_FILE
                               | --positive FILE --negative FILE --model M [engine flags])
                               [--top 20] [--template raw|chat] [--plot OUT.png] [--json]

PATH/SRC is any SAE steerserve reads (`steering.sae.read_any`): our .safetensors, a Gemma
Scope params.npz / .safetensors, or an SAELens (cfg.json + sae_weights.safetensors),
sparsify (cfg.json + sae.safetensors) or Gemma Scope directory. Gemma Scope files do not
record their layer and sparsify keeps it only in the directory name (`layers.<i>`): give
`--layer` when the path does not say it. `convert` writes our format, which records
everything (layer, activation, k, labels), so the server reads it without flags.

`search --vector` ranks features by the cosine of their decoder row with the vector's
direction at the SAE's layer (no engine). `search --positive/--negative` runs the model
(`steering.capture`, vLLM's forward pass) over both prompt sets, encodes the SAE layer's
stream (a leading BOS left out), averages each prompt's activations over its tokens, and
ranks features by the difference of the two sets' means, with its effect size (Cohen's d
over prompts). Both report the strongest features of either sign.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.file_info import print_file_info
from steering.sae import SaeFileError, SparseAutoencoder, read_any, save_sae

# Labelled features shown by `info` without --json (the JSON has them all).
SHOWN_LABELS = 10


def describe(path: Path, sae: SparseAutoencoder) -> dict[str, Any]:
    threshold = None
    if sae.threshold is not None:
        t = sae.threshold.astype(np.float64)
        threshold = {"min": float(t.min()), "mean": float(t.mean()), "max": float(t.max())}
    return {
        "file": str(path),
        "format": sae.source_format,
        "layer": sae.layer,
        "hidden_size": sae.hidden_size,
        "width": sae.width,
        "activation": sae.activation,
        "k": sae.k,
        "threshold": threshold,
        "subtract_b_dec": sae.subtract_b_dec,
        "architecture": sae.architecture,
        "description": sae.description,
        "has_typical": sae.typical is not None,
        "labels": {str(f): label for f, label in sorted(sae.labels.items())},
        "metadata": dict(sae.extra),
    }


def _format_info(info: dict[str, Any]) -> str:
    activation = info["activation"]
    if info["k"] is not None:
        activation += f", k={info['k']}"
    if info["threshold"] is not None:
        t = info["threshold"]
        activation += f", threshold {t['min']:.4g} .. {t['max']:.4g} (mean {t['mean']:.4g})"
    encoder_input = "h - b_dec" if info["subtract_b_dec"] else "h"
    labels = info["labels"]
    lines = [
        info["file"],
        f"  format       {info['format']}",
        f"  layer        {info['layer']} (the residual stream after decoder layer {info['layer']})",
        f"  hidden       {info['hidden_size']}",
        f"  width        {info['width']} features",
        f"  activation   {activation}",
        f"  encodes      {encoder_input}",
        f"  labelled     {len(labels)} of {info['width']} features",
    ]
    for feature, label in list(labels.items())[:SHOWN_LABELS]:
        lines.append(f"    {feature:>8}  {label}")
    if len(labels) > SHOWN_LABELS:
        lines.append(f"    ... and {len(labels) - SHOWN_LABELS} more (--json lists them all)")
    if info["has_typical"]:
        lines.append("  typical      per-feature typical activations included")
    for key in ("architecture", "description"):
        if info[key] is not None:
            lines.append(f"  {key:<12} {info[key]}")
    for key, value in info["metadata"].items():
        lines.append(f"  {key:<12} {value}")
    return "\n".join(lines)


def info(args: argparse.Namespace) -> int:
    return print_file_info(
        "features",
        args.paths,
        lambda path: describe(path, read_any(path, args.layer)),
        (SaeFileError,),
        _format_info,
        args.json,
    )


def convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if dst.suffix != ".safetensors":
        sys.exit(f"steerserve features convert: {dst}: write a .safetensors file (our format)")
    if src.resolve() == dst.resolve():
        sys.exit(f"steerserve features convert: {dst} is the input itself")
    try:
        sae = read_any(src, args.layer)
        save_sae(sae, dst)
    except (OSError, SaeFileError) as e:
        sys.exit(f"steerserve features convert: {e}")
    k = f", k={sae.k}" if sae.k is not None else ""
    print(
        f"wrote {dst} ({sae.source_format} SAE: layer {sae.layer}, hidden {sae.hidden_size}, "
        f"{sae.width} features, {sae.activation}{k})"
    )
    return 0


# --- search ----------------------------------------------------------------------------


@dataclass
class FeatureScore:
    """One feature's place in a search: `score` is the cosine with the vector, or the
    difference of mean activation (positive prompts minus negative ones)."""

    feature: int
    label: str | None
    score: float
    mean_pos: float | None = None
    mean_neg: float | None = None
    effect: float | None = None  # the difference over the pooled per-prompt std (Cohen's d)

    def row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        return {k: v for k, v in row.items() if v is not None or k == "label"}


def decoder_cosines(sae: SparseAutoencoder, direction: np.ndarray) -> np.ndarray:
    """[width]: the cosine of each decoder row with `direction`."""
    v = direction.astype(np.float64)
    norm = np.linalg.norm(v)
    if norm == 0:
        raise ValueError("the vector is all zeros: it has no direction")
    w = sae.w_dec.astype(np.float64)
    rows = np.linalg.norm(w, axis=1)
    # A zero decoder row (a pruned feature) matches nothing rather than dividing by zero.
    return np.divide(w @ v, rows * norm, out=np.zeros(len(w)), where=rows > 0)


def activation_difference(
    pos: np.ndarray, neg: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From per-prompt mean activations [prompts, width] of each side: the difference of
    the sides' means, both means, and the effect size (the difference over the pooled
    per-prompt standard deviation; 0 where a feature does not vary)."""
    pos, neg = pos.astype(np.float64), neg.astype(np.float64)
    mean_pos, mean_neg = pos.mean(axis=0), neg.mean(axis=0)
    diff = mean_pos - mean_neg
    var_pos = pos.var(axis=0, ddof=1) if len(pos) > 1 else np.zeros_like(mean_pos)
    var_neg = neg.var(axis=0, ddof=1) if len(neg) > 1 else np.zeros_like(mean_neg)
    pooled = np.sqrt((var_pos + var_neg) / 2)
    effect = np.divide(diff, pooled, out=np.zeros_like(diff), where=pooled > 0)
    return diff, mean_pos, mean_neg, effect


def prompt_means(sae: SparseAutoencoder, streams: list[np.ndarray], progress: Any = None):
    """[prompts, width]: each prompt's SAE activations averaged over its tokens, so that a
    long prompt counts as much as a short one."""
    out = np.zeros((len(streams), sae.width))
    for i, stream in enumerate(streams):
        if len(stream):
            out[i] = sae.encode(stream).mean(axis=0)
        if progress is not None:
            progress.update(1)
    return out


def _split(
    sae: SparseAutoencoder, scores: np.ndarray, top: int, extra: dict[str, np.ndarray]
) -> tuple[list[FeatureScore], list[FeatureScore]]:
    """The `top` highest scores (> 0) and the `top` lowest (< 0), strongest first."""
    order = np.argsort(-scores, kind="stable")

    def score(f: int) -> FeatureScore:
        values = {k: float(v[f]) for k, v in extra.items()}
        return FeatureScore(int(f), sae.label(int(f)), float(scores[f]), **values)

    high = [score(f) for f in order[:top] if scores[f] > 0]
    low = [score(f) for f in order[::-1][:top] if scores[f] < 0]
    return high, low


def _find_vector(name: str, vectors_dir: str | None):
    from steering.vectors import VectorFileError
    from steering.vectors import read_any as read_vector

    path = Path(name)
    candidates = [path] if path.suffix in (".safetensors", ".gguf") or path.exists() else []
    if not candidates and vectors_dir:
        candidates = [Path(vectors_dir) / f"{name}{suffix}" for suffix in (".safetensors", ".gguf")]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return candidate, read_vector(candidate)
            except (OSError, VectorFileError) as e:
                sys.exit(f"steerserve features search: --vector {candidate}: {e}")
    where = f" or in {vectors_dir}" if vectors_dir else ""
    sys.exit(f"steerserve features search: --vector {name}: no such file{where}")


def _search_vector(args: argparse.Namespace, sae: SparseAutoencoder) -> dict[str, Any]:
    path, vector = _find_vector(args.vector, args.vectors_dir)
    if vector.site != "residual":
        sys.exit(
            f"steerserve features search: {path} steers the {vector.site} site; an SAE "
            "reads the residual stream"
        )
    if sae.layer not in vector.directions:
        sys.exit(
            f"steerserve features search: {path} has no direction at the SAE's layer "
            f"{sae.layer} (it has layers {vector.layers})"
        )
    direction = vector.directions[sae.layer]
    if direction.shape != (sae.hidden_size,):
        sys.exit(
            f"steerserve features search: {path} is {direction.shape[0]} wide at layer "
            f"{sae.layer}, the SAE reads {sae.hidden_size}"
        )
    try:
        cosines = decoder_cosines(sae, direction)
    except ValueError as e:
        sys.exit(f"steerserve features search: {path}: {e}")
    high, low = _split(sae, cosines, args.top, {})
    return {
        "mode": "vector",
        "vector": str(path),
        "score": "cosine of the decoder row with the vector",
        "aligned": high,
        "opposed": low,
    }


def load_prompts(path: str | Path) -> list[Any]:
    """One prompt per line, or JSONL whose lines carry "prompt" (a string, or a list of
    chat messages). Blank lines are skipped."""
    prompts: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.lstrip().startswith("{"):
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON: {e}") from None
                prompt = row.get("prompt") if isinstance(row, dict) else None
                if not (isinstance(prompt, str) and prompt) and not isinstance(prompt, list):
                    raise ValueError(
                        f'{path}:{number}: a JSON line needs "prompt": a non-empty string '
                        "or a list of chat messages"
                    )
                prompts.append(prompt)
            else:
                prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _token_ids(prompts: list[Any], tokenizer: Any, template: str) -> list[list[int]]:
    from steering.training import render

    # A chat template writes its own special tokens (BOS among them), as the server's chat
    # route does; raw text gets the tokenizer's, as its completions route does.
    special = template == "raw"
    return [
        tokenizer(render(p, tokenizer, template), add_special_tokens=special)["input_ids"]
        for p in prompts
    ]


def _streams(capturer: Any, ids: list[list[int]], layer: int, bar: Any) -> list[np.ndarray]:
    """[tokens, hidden] per prompt at `layer`, without a leading BOS: every prompt's BOS
    has the same outsized activation, which would only add a length-dependent constant
    to each prompt's mean."""
    got = capturer.capture(ids, [layer], "all", progress=bar)
    bos = capturer.tokenizer.bos_token_id
    return [
        g[1:, 0] if bos is not None and p and p[0] == bos else g[:, 0]
        for g, p in zip(got, ids, strict=True)
    ]


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 pointed at stderr: vLLM logs to stdout, from this process and from
    the engine processes it starts (which inherit the descriptor), and stdout is where the
    table or the JSON goes."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _search_activations(args: argparse.Namespace, sae: SparseAutoencoder) -> dict[str, Any]:
    from tqdm import tqdm

    from steering.capture import CaptureFailed, Capturer
    from steering.training import PairsError

    from .vector_commands import ENGINE_FLAGS

    try:
        sides = [load_prompts(args.positive), load_prompts(args.negative)]
    except (OSError, ValueError) as e:
        sys.exit(f"steerserve features search: {e}")
    kw = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k, None) is not None}
    with _stdout_to_stderr():
        try:
            capturer = Capturer(args.model, **kw)
        except CaptureFailed as e:
            sys.exit(f"steerserve features search: {e}")
        problem = sae.fits(capturer.shape)
        if problem:
            sys.exit(f"steerserve features search: the SAE {problem}")
        try:
            ids = [_token_ids(side, capturer.tokenizer, args.template) for side in sides]
        except PairsError as e:
            sys.exit(f"steerserve features search: {e}")
        total = sum(map(len, ids))
        try:
            with tqdm(total=total, unit="prompt", desc="capturing", disable=args.quiet) as bar:
                streams = [_streams(capturer, side, sae.layer, bar) for side in ids]
        except (CaptureFailed, ValueError) as e:
            # e.g. a prompt longer than --max-model-len, refused by vLLM
            sys.exit(f"steerserve features search: {e}")
    with tqdm(total=total, unit="prompt", desc="encoding", disable=args.quiet) as bar:
        pos, neg = (prompt_means(sae, s, bar) for s in streams)
    diff, mean_pos, mean_neg, effect = activation_difference(pos, neg)
    extra = {"mean_pos": mean_pos, "mean_neg": mean_neg, "effect": effect}
    high, low = _split(sae, diff, args.top, extra)
    return {
        "mode": "activations",
        "positive": str(args.positive),
        "negative": str(args.negative),
        "prompts": [len(pos), len(neg)],
        "tokens": capturer.stats.prompt_tokens,
        "score": "mean activation on --positive minus on --negative (per prompt, then mean)",
        "aligned": high,
        "opposed": low,
    }


def _format_search(result: dict[str, Any]) -> str:
    activations = result["mode"] == "activations"
    if activations:
        head = f"{'feature':>8}  {'label':<16} {'score':>9} {'mean_pos':>9} {'mean_neg':>9} "
        head += f"{'effect':>7}"
        titles = ("higher on --positive", "higher on --negative")
    else:
        head = f"{'feature':>8}  {'label':<16} {'cosine':>9}"
        titles = ("aligned with the vector", "opposed to the vector")
    lines = [
        f"{result['sae']} (layer {result['layer']}, {result['width']} features): {result['score']}"
    ]
    for title, key in zip(titles, ("aligned", "opposed"), strict=True):
        lines += ["", title, head]
        for s in result[key]:
            line = f"{s.feature:>8}  {(s.label or '-'):<16} {s.score:>9.4g}"
            if activations:
                line += f" {s.mean_pos:>9.4g} {s.mean_neg:>9.4g} {s.effect:>7.2f}"
            lines.append(line)
        if not result[key]:
            lines.append("  (none)")
    return "\n".join(lines)


def plot_search(result: dict[str, Any], path: str) -> None:
    """Horizontal bars: the top features of both signs, strongest at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = result["aligned"] + result["opposed"][::-1]
    names = [f"{s.feature} {s.label}" if s.label else str(s.feature) for s in shown]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(shown) + 1.2)))
    y = np.arange(len(shown))
    colors = ["tab:green" if s.score > 0 else "tab:red" for s in shown]
    ax.barh(y, [s.score for s in shown], color=colors)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    if result["mode"] == "vector":
        what = Path(result["vector"]).name
    else:
        what = f"{Path(result['positive']).name} vs {Path(result['negative']).name}"
    ax.set_title(f"{Path(result['sae']).name} layer {result['layer']}: {what}")
    ax.set_xlabel(result["score"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def search(args: argparse.Namespace) -> int:
    if (args.vector is None) == (args.positive is None and args.negative is None):
        sys.exit("steerserve features search: give --vector, or --positive and --negative")
    if args.vector is None and (args.positive is None or args.negative is None):
        sys.exit("steerserve features search: --positive and --negative go together")
    if args.vector is None and args.model is None:
        sys.exit("steerserve features search: --positive/--negative need --model")
    if args.top < 1:
        sys.exit("steerserve features search: --top must be at least 1")
    try:
        sae = read_any(Path(args.sae), args.layer)
    except (OSError, SaeFileError) as e:
        sys.exit(f"steerserve features search: {args.sae}: {e}")
    result = _search_vector(args, sae) if args.vector else _search_activations(args, sae)
    result |= {"sae": str(args.sae), "layer": sae.layer, "width": sae.width}
    if args.json:
        rows = {k: [s.row() for s in result[k]] for k in ("aligned", "opposed")}
        print(json.dumps(result | rows, indent=2))
    else:
        print(_format_search(result))
    if args.plot:
        plot_search(result, args.plot)
    return 0


def _search_flags(p: argparse.ArgumentParser) -> None:
    from steering.training import TEMPLATES

    from .demo import SHIPPED_VECTORS_DIR

    p.add_argument("--sae", required=True, help="any SAE steerserve reads (as for info)")
    _layer_flag(p)
    what = p.add_argument_group("what to match (one of)")
    what.add_argument("--vector", help="a vector file, or a name in --vectors-dir")
    what.add_argument("--positive", help='prompts (one a line, or JSONL with "prompt")')
    what.add_argument("--negative", help="prompts to contrast --positive with")
    p.add_argument(
        "--vectors-dir",
        default=os.environ.get("STEERSERVE_VECTORS_DIR") or str(SHIPPED_VECTORS_DIR),
        help="where --vector NAME is looked up (default: as for serve)",
    )
    p.add_argument("--top", type=int, default=20, help="features shown per sign")
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        default="raw",
        help="raw: prompts as written; chat: each through the model's chat template",
    )
    p.add_argument("--plot", help="write a PNG bar chart of the top features")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("engine (--positive/--negative only; as for vllm serve)")
    g.add_argument("--model", help="model directory (or name in the HF cache)")
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
    g.add_argument("--gpu-memory-utilization", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--trust-remote-code", action="store_true", default=None)


def _layer_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layer",
        type=int,
        help="the layer it reads (Gemma Scope files and renamed sparsify directories do not "
        "say; for other formats it must agree with the file)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve features")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="what an SAE file or directory holds")
    p.add_argument("paths", nargs="+", metavar="PATH")
    _layer_flag(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=info)
    p = sub.add_parser("convert", help="any supported SAE -> our .safetensors")
    p.add_argument("input", metavar="SRC")
    p.add_argument("output", metavar="DST.safetensors")
    _layer_flag(p)
    p.set_defaults(run=convert)
    p = sub.add_parser("search", help="features that match a vector, or tell prompt sets apart")
    _search_flags(p)
    p.set_defaults(run=search)
    return parser


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    sys.exit(args.run(args))
