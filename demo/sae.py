"""The demo model's sparse autoencoder: a ReLU SAE on the residual stream after layer 2.

    python -m demo.sae --out demo/saes            # rewrites demo/saes/demo.safetensors + .json
    python -m demo.sae --out /tmp/s --steps 100   # a quick look

Activations come from `steering.capture.Capturer`, i.e. vLLM's own forward pass: the
server applies the SAE to the stream its kernels compute, so it is trained on that stream
rather than on a second model load through HF transformers (which would also cost the
time of loading and running a second implementation). Texts are demo-corpus conversations
through the model's chat template, as the server renders a chat, plus recall lines with
the BOS the model was trained with. The BOS position is left out everywhere: it is the same
token, with the same (outsized) activation, in every text, and would only teach the SAE
one constant.

Training (torch, on CPU) takes its loss and initialisation from Anthropic's April 2024
update, at a small scale, with SAELens' b_dec-subtracting encoder: inputs
scaled so that their mean norm is sqrt(hidden size), W_enc initialised as W_dec^T,
loss = ||x - x_hat||^2 + l1 * sum_f a_f ||W_dec[f]||, the L1 coefficient warmed up and the
learning rate decayed linearly at the end. The saved SAE reads the raw stream: the input
scale and the decoder norms are folded into the weights, so decoder rows are unit vectors
and activations are in units of the stream itself.

Labels come from the corpus's known attributes on held-out conversations: per attribute
(a sentiment or a topic) the features whose mean activation (over tokens, then texts) on
conversations with the attribute most exceeds that on conversations without it get
"<attribute>", "<attribute>#2", ... -- the same ranking `steerserve features search`
computes from prompt files. `typical` is each feature's mean activation where it is > 0.

Seeded: the corpus, the initialisation and the batch order all come from --seed. On a
fixed thread count torch's CPU kernels and vLLM's are deterministic, so one seed gives one
file on one machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from demo.corpus import SENTIMENT, TOPICS, conversation, documents
from steering.sae import SparseAutoencoder, save_sae

LAYER = 2
WIDTH = 1024
NAME = "demo"
ATTRIBUTES = (*SENTIMENT, *TOPICS)
BOS = "<s>"
ENGINE_KW: dict[str, Any] = dict(dtype="float32", enforce_eager=True, max_model_len=512)
# Data seeds are offsets of --seed, away from the model's own training corpus (seed 0).
TRAIN_DATA_SEED = 1000
LABEL_DATA_SEED = 2000


@dataclass
class Texts:
    prompts: list[str]
    topics: list[str | None]  # None for recall lines
    sentiments: list[str | None]


def chat_text(tokenizer: Any, user: str, assistant: str) -> str:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def training_texts(tokenizer: Any, seed: int, conversations: int, recall: int) -> Texts:
    texts = Texts([], [], [])
    for doc in documents(TRAIN_DATA_SEED + seed, conversations, recall):
        if doc["kind"] == "chat":
            texts.prompts.append(chat_text(tokenizer, doc["user"], doc["assistant"]))
            texts.topics.append(doc["topic"])
            texts.sentiments.append(doc["sentiment"])
        else:
            texts.prompts.append(BOS + doc["text"])
            texts.topics.append(None)
            texts.sentiments.append(None)
    return texts


def label_texts(tokenizer: Any, seed: int, per_cell: int) -> Texts:
    """Held-out conversations, `per_cell` for each (topic, sentiment), so that every
    attribute is compared against a balanced rest."""
    rng = random.Random(LABEL_DATA_SEED + seed)
    texts = Texts([], [], [])
    for topic in sorted(TOPICS):
        for sentiment in sorted(SENTIMENT):
            for _ in range(per_cell):
                c = conversation(rng, topic, sentiment)
                texts.prompts.append(chat_text(tokenizer, c.user, c.assistant))
                texts.topics.append(topic)
                texts.sentiments.append(sentiment)
    return texts


def capture_streams(capturer: Any, prompts: list[str], desc: str) -> list[np.ndarray]:
    """Per prompt: [tokens, hidden] at LAYER, BOS left out."""
    from tqdm import tqdm

    with tqdm(total=len(prompts), unit="prompt", desc=desc) as bar:
        got = capturer.capture(prompts, [LAYER], "all", progress=bar)
    return [g[1:, 0] for g in got]


# --- training ----------------------------------------------------------------------------


@dataclass
class TrainArgs:
    seed: int
    steps: int
    batch: int
    lr: float
    l1: float
    l1_warmup: float  # share of steps over which the L1 coefficient ramps up
    lr_decay: float  # share of steps at the end over which the learning rate decays to 0
    init_norm: float


def train(x: np.ndarray, args: TrainArgs) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """A ReLU SAE on the rows of x (raw stream); returns it and the loss curve."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    hidden = x.shape[1]
    # A scale, not a standardisation: the same L1 coefficient then means the same thing
    # whatever the stream's norm (about 300 here).
    scale = math.sqrt(hidden) / float(np.linalg.norm(x, axis=1).mean())
    data = torch.from_numpy(x * scale)

    w_dec = torch.randn(WIDTH, hidden, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True) * args.init_norm
    params = {
        "w_dec": w_dec.clone().requires_grad_(),
        "w_enc": w_dec.T.clone().requires_grad_(),
        "b_enc": torch.zeros(WIDTH, requires_grad=True),
        "b_dec": data.mean(dim=0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=args.lr, betas=(0.9, 0.999))
    warmup = max(1, int(args.l1_warmup * args.steps))
    decay_from = int((1 - args.lr_decay) * args.steps)
    curve: list[dict[str, float]] = []
    window: list[tuple[float, float, float]] = []
    bar = tqdm(range(args.steps), desc="train SAE", unit="step")
    for step in bar:
        idx = torch.randint(0, len(data), (args.batch,), generator=gen)
        batch = data[idx]
        l1 = args.l1 * min(1.0, (step + 1) / warmup)
        lr = (
            args.lr
            if step < decay_from
            else args.lr * (args.steps - step) / (args.steps - decay_from)
        )
        for group in opt.param_groups:
            group["lr"] = lr
        acts = torch.relu((batch - params["b_dec"]) @ params["w_enc"] + params["b_enc"])
        recon = acts @ params["w_dec"] + params["b_dec"]
        mse = (recon - batch).pow(2).sum(dim=1).mean()
        sparsity = (acts * params["w_dec"].norm(dim=1)).sum(dim=1).mean()
        loss = mse + l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        with torch.no_grad():
            window.append((mse.item(), sparsity.item(), (acts > 0).float().sum(1).mean().item()))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            m, s, l0 = (float(np.mean(v)) for v in zip(*window, strict=True))
            curve.append({"step": step + 1, "mse": m, "l1": s, "l0": l0, "l1_coef": l1})
            bar.set_postfix(mse=f"{m:.3g}", l0=f"{l0:.1f}")
            window = []

    with torch.no_grad():
        norms = params["w_dec"].norm(dim=1).clamp_min(1e-12)
        # Unit decoder rows, raw-stream units (see the module docstring for the algebra):
        # a_raw = a_scaled * ||W_dec[f]|| / scale.
        sae = SparseAutoencoder(
            w_enc=(params["w_enc"] * norms).numpy(),
            b_enc=(params["b_enc"] * norms / scale).numpy(),
            w_dec=(params["w_dec"] / norms[:, None]).numpy(),
            b_dec=(params["b_dec"] / scale).numpy(),
            layer=LAYER,
            activation="relu",
        )
    return sae, {"input_scale": scale, "curve": curve}


# --- evaluation and labels -----------------------------------------------------------------


def quality(sae: SparseAutoencoder, streams: list[np.ndarray]) -> dict[str, Any]:
    """Fraction of variance explained, mean L0, dead features, typical activations."""
    x = np.concatenate(streams).astype(np.float64)
    acts = sae.encode(x)
    residual = x - sae.decode(acts)
    fve = 1.0 - float((residual**2).sum() / ((x - x.mean(axis=0)) ** 2).sum())
    fired = acts > 0
    counts = fired.sum(axis=0)
    typical = np.where(counts > 0, acts.sum(axis=0) / np.maximum(counts, 1), 0.0)
    return {
        "tokens": int(len(x)),
        "fve": fve,
        "mse": float((residual**2).sum(axis=1).mean()),
        "l0": float(fired.sum(axis=1).mean()),
        "dead": int((counts == 0).sum()),
        "typical": typical.astype(np.float32),
        "firing_rate": counts / len(x),
    }


def text_means(sae: SparseAutoencoder, streams: list[np.ndarray]) -> np.ndarray:
    """[texts, width]: each text's mean activation over its tokens."""
    return np.stack([sae.encode(s).mean(axis=0) for s in streams])


def rank(means: np.ndarray, inside: np.ndarray) -> list[dict[str, float]]:
    """Every feature, by how much its mean over texts inside exceeds that outside: the
    ranking `steerserve features search --positive/--negative` reports."""
    from server.feature_commands import activation_difference

    diff, mean_in, mean_out, effect = activation_difference(means[inside], means[~inside])
    order = np.argsort(-diff, kind="stable")
    return [
        {
            "feature": int(f),
            "score": float(diff[f]),
            "mean_in": float(mean_in[f]),
            "mean_out": float(mean_out[f]),
            "effect": float(effect[f]),
        }
        for f in order
    ]


def label(
    means: np.ndarray, texts: Texts, per_attribute: int, min_effect: float
) -> tuple[dict[int, str], dict[str, list[dict[str, Any]]]]:
    """Labels for the best `per_attribute` features of each attribute, and every
    attribute's top of the ranking. A feature keeps one label, the attribute it separates
    best (by effect size), and a feature with a small effect gets none: a high-magnitude
    feature that fires a little more on food is not a food feature."""
    ranked: dict[str, list[dict[str, Any]]] = {}
    for attribute in ATTRIBUTES:
        column = texts.sentiments if attribute in SENTIMENT else texts.topics
        inside = np.array([value == attribute for value in column])
        ranked[attribute] = rank(means, inside)
    best_effect: dict[int, tuple[float, str]] = {}
    for attribute, rows in ranked.items():
        for row in rows:
            f = row["feature"]
            if row["effect"] > best_effect.get(f, (-math.inf, ""))[0]:
                best_effect[f] = (row["effect"], attribute)
    labels: dict[int, str] = {}
    for attribute, rows in ranked.items():
        n = 0
        for row in rows:
            if n == per_attribute or row["score"] <= 0:
                break
            f = row["feature"]
            if row["effect"] < min_effect or best_effect[f][1] != attribute:
                continue
            n += 1
            labels[f] = attribute if n == 1 else f"{attribute}#{n}"
            row["label"] = labels[f]
    # The ranking's head, and every labelled feature wherever it ranks.
    top = {
        a: [dict(r, rank=i + 1) for i, r in enumerate(rows) if i < 10 or "label" in r]
        for a, rows in ranked.items()
    }
    for rows in top.values():
        for row in rows:
            row.setdefault("label", labels.get(row["feature"]))
    return labels, top


def main(argv: list[str] | None = None) -> None:
    from server.demo import DEMO_MODEL, DEMO_SAES_DIR, demo_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, help="checkpoint dir (default: the shipped demo model)")
    p.add_argument("--out", type=Path, default=DEMO_SAES_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--conversations", type=int, default=2400, help="training conversations")
    p.add_argument("--recall-lines", type=int, default=600, help="training recall lines")
    p.add_argument(
        "--label-per-cell",
        type=int,
        default=60,
        help="held-out conversations per "
        "(topic, sentiment) for FVE, typical activations and labels",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument("--labels-per-attribute", type=int, default=3)
    p.add_argument(
        "--min-effect",
        type=float,
        default=1.0,
        help="smallest effect size (Cohen's d over texts) that earns a label",
    )
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from steering.capture import Capturer

    # Thread count fixed: CPU reductions are only reproducible for one thread count.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    model = args.model or demo_model()
    tokenizer = AutoTokenizer.from_pretrained(model)
    train_set = training_texts(tokenizer, args.seed, args.conversations, args.recall_lines)
    held_out = label_texts(tokenizer, args.seed, args.label_per_cell)

    capturer = Capturer(str(model), **ENGINE_KW)
    engine_seconds = time.perf_counter() - started
    train_streams = capture_streams(capturer, train_set.prompts, "capture (train)")
    label_streams = capture_streams(capturer, held_out.prompts, "capture (held out)")
    capture_stats = capturer.stats
    # The engine's memory and threads are not needed for training.
    capturer.llm.llm_engine.engine_core.shutdown()
    del capturer
    capture_seconds = time.perf_counter() - started - engine_seconds

    x = np.concatenate(train_streams)
    train_args = TrainArgs(
        seed=args.seed,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        l1=args.l1,
        l1_warmup=0.05,
        lr_decay=0.2,
        init_norm=0.1,
    )
    t = time.perf_counter()
    sae, history = train(x, train_args)
    train_seconds = time.perf_counter() - t

    q = quality(sae, label_streams)
    train_q = quality(sae, train_streams[:500])
    means = text_means(sae, label_streams)
    labels, top = label(means, held_out, args.labels_per_attribute, args.min_effect)
    sae.labels = labels
    sae.typical = q["typical"]
    sae.description = (
        f"demo model: ReLU SAE, {WIDTH} features, on the residual stream after decoder layer "
        f"{LAYER}; trained on {len(x)} tokens of demo.corpus conversations (chat template) "
        f"and recall lines captured through vLLM, seed {args.seed}; labels from the corpus's "
        f"topics and sentiments on held-out conversations. Rebuild: python -m demo.sae "
        f"--out demo/saes"
    )
    sae.extra = {
        "model": DEMO_MODEL if args.model is None else str(args.model),
        "trained_with": "python -m demo.sae",
        "seed": str(args.seed),
        "fve": f"{q['fve']:.4f}",
        "l0": f"{q['l0']:.2f}",
        "dead": str(q["dead"]),
    }
    sae.check()
    args.out.mkdir(parents=True, exist_ok=True)
    path = save_sae(sae, args.out / f"{NAME}.safetensors")
    total = time.perf_counter() - started

    curve = history["curve"]
    sidecar = {
        "file": path.name,
        "layer": LAYER,
        "width": WIDTH,
        "activation": "relu",
        "activations_from": "steering.capture.Capturer (vLLM's forward pass), BOS left out",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "train": {
            **vars(train_args),
            "tokens": int(len(x)),
            "texts": len(train_set.prompts),
            "input_scale": history["input_scale"],
        },
        "loss_curve": {
            "first": curve[0],
            "last": curve[-1],
            "every_50_steps": [{k: round(v, 5) for k, v in point.items()} for point in curve],
        },
        "held_out": {k: q[k] for k in ("tokens", "fve", "mse", "l0", "dead")}
        | {"texts": len(held_out.prompts)},
        "train_sample": {k: train_q[k] for k in ("tokens", "fve", "l0", "dead")},
        "labels": {str(f): name for f, name in sorted(labels.items(), key=lambda kv: kv[1])},
        "top_features": top,
        "seconds": {
            "engine_start": engine_seconds,
            "capture": capture_seconds,
            "capture_tokens_per_second": capture_stats.tokens_per_second,
            "train": train_seconds,
            "total": total,
        },
    }
    (args.out / f"{NAME}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(
        f"wrote {path}: FVE {q['fve']:.3f}, L0 {q['l0']:.1f}, {q['dead']} dead of {WIDTH} "
        f"(held out, {q['tokens']} tokens); {total:.0f} s"
    )
    for attribute in ATTRIBUTES:
        named = [r for r in top[attribute] if r.get("label")]
        shown = ", ".join(
            f"{r['label']}={r['feature']} (diff {r['score']:.3g}, d {r['effect']:.2f})"
            for r in named
        )
        print(f"  {attribute:<9} {shown or '(no feature passes --min-effect)'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
