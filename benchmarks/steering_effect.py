"""What steering does to the demo model, measured by the corpus's own classifiers.

1. Vectors: for each shipped vector, the share of sampled answers that carry its attribute
   (sentiment or topic, by the grammar's word lists) against steering scale, with Wilson 95%
   intervals, and the share of sentences the grammar can produce (fluency). Sentiment is
   measured on the corpus's mix of questions; a topic on open questions ("tell me a
   story."), since a question that names the cat pins the topic of its answer.
2. Head masks: every head masked alone (ablation scan) on recall prompts, where only copying
   gets the items right, and on chat; the heads whose loss costs copying most and chat
   grammar least are then masked, next to the heads that matter least for copying as a
   control, with what each does to the chat task (grammar, staying on the question's
   topic).
3. Decoding: recall with greedy, layer-fused and contrastive decoding, on lists of
   training's lengths and on longer ones.

    python benchmarks/steering_effect.py            # the shipped model and vectors, ~2 min
    python benchmarks/steering_effect.py --smoke    # a few samples (run by the tests)

Writes JSON, a markdown table and a PNG plot to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import in_process  # noqa: E402, F401 (before numpy, torch and vllm)

# isort: split
from benchmarks import recording  # noqa: E402
from demo import tasks  # noqa: E402
from demo.corpus import (  # noqa: E402
    RECALL_ITEMS,
    SENTIMENT,
    TOPICS,
    grammatical_fraction,
    sentiment_of,
    topic_of,
)

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
# Generated answers are 2-4 sentences of ~8 words: 64 tokens hold two or three of them.
MAX_TOKENS = 64


# Lists longer than any in training, for decoding on recall.
LONG_RECALL = range(RECALL_ITEMS.stop, 2 * RECALL_ITEMS.stop - 1)


def _span(lengths: range) -> str:
    return f"{lengths.start}-{lengths.stop - 1}"


def _classifier(attribute: str):
    return sentiment_of if attribute in SENTIMENT else topic_of


def _question_kind(attribute: str) -> str:
    # A question naming the cat pins its answer's topic: topics are measured on open ones.
    return "mixed" if attribute in SENTIMENT else "open"


def _sampled(spec: dict | None, n: int, seed: int) -> list:
    """Sampling for n chat answers; answer i has seed + i whatever the spec, so that a
    sweep's cells differ by the spec alone."""
    from vllm import SamplingParams

    extra = {"steering": spec} if spec else None
    return [
        SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=seed + i, extra_args=extra)
        for i in range(n)
    ]


def vector_sweep(llm, tokenizer, names: list[str], scales, samples: int, seed: int) -> list[dict]:
    """One row per (vector, scale): attribute rate with its interval, grammaticality."""
    prompts_of = {
        kind: [tasks.chat_prompt(tokenizer, q.text) for q in tasks.questions(samples, seed, kind)]
        for kind in ("mixed", "open")
    }
    cells = [(name, scale) for name in names for scale in scales]
    prompts, params = [], []
    for name, scale in cells:
        # All cells in one generate call: the engine batches across them.
        prompts += prompts_of[_question_kind(name)]
        params += _sampled(
            {"vectors": [{"name": name, "scale": scale}]} if scale else None, samples, seed
        )
    outputs = llm.generate(prompts, params, use_tqdm=True)
    rows = []
    for c, (name, scale) in enumerate(cells):
        texts = [o.outputs[0].text for o in outputs[c * samples : (c + 1) * samples]]
        hits = sum(_classifier(name)(t) == name for t in texts)
        grammatical = [grammatical_fraction(t) for t in texts]
        rows.append(
            {
                "vector": name,
                "scale": scale,
                "questions": _question_kind(name),
                "n": samples,
                "rate": hits / samples,
                "rate_ci": tasks.rate_interval(hits, samples),
                "grammatical": sum(grammatical) / samples,
                "fully_grammatical": sum(g == 1.0 for g in grammatical) / samples,
                "example": {"question": outputs[c * samples].prompt, "answer": texts[0]},
            }
        )
    return rows


def _recall_score(outputs, items_list) -> tuple[float, float]:
    """(exact copy rate, per-item accuracy)."""
    exact = item = 0.0
    for out, items in zip(outputs, items_list, strict=True):
        got = out.outputs[0].text.split()
        exact += tasks.copied(out.outputs[0].text, items)
        item += sum(a == b for a, b in zip(got, items, strict=False)) / len(items)
    return exact / len(items_list), item / len(items_list)


def _recall(llm, items_list, spec: dict | None) -> tuple[float, float]:
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max(map(len, items_list)) + 2,
        extra_args={"steering": spec} if spec else None,
    )
    prompts = [tasks.recall_prompt(items) for items in items_list]
    return _recall_score(llm.generate(prompts, params, use_tqdm=False), items_list)


def _chat_task(llm, tokenizer, questions, spec: dict | None, seed: int) -> dict:
    """Grammar and staying on the question's topic, over sampled answers."""
    prompts = [tasks.chat_prompt(tokenizer, q.text) for q in questions]
    params = _sampled(spec, len(questions), seed)
    texts = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    on_topic = sum(topic_of(t) == q.topic for t, q in zip(texts, questions, strict=True))
    return {
        "grammatical": sum(map(grammatical_fraction, texts)) / len(texts),
        "on_topic": on_topic / len(texts),
    }


def _mask(heads: list[tuple[int, int]]) -> dict:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return {
        "heads": [
            {"layer": i, "heads": sorted(h), "scale": 0.0} for i, h in sorted(by_layer.items())
        ]
    }


def head_scan(llm, tokenizer, cfg, samples: int, seed: int, keep: int) -> dict:
    """Mask each head alone, on recall and on chat. Heads rank as copy heads by what their
    loss costs copying minus what it costs chat grammar (a head every task needs, such as a
    previous-token head, is not what makes copying); the top 1..`keep` are masked together,
    and the `keep` heads that matter least for copying as a control."""
    from tqdm import tqdm

    items_list = tasks.recall_items(samples, seed)
    questions = tasks.questions(samples, seed, "named")
    none = _condition(llm, tokenizer, items_list, questions, None, seed)
    heads = [(i, h) for i in range(cfg.num_hidden_layers) for h in range(cfg.num_attention_heads)]
    scan = []
    for layer, head in tqdm(heads, desc="head scan"):
        row = _condition(llm, tokenizer, items_list, questions, _mask([(layer, head)]), seed)
        grammar_cost = none["grammatical"] - row["grammatical"]
        row["selectivity"] = none["copy"] - row["copy"] - grammar_cost
        scan.append({"layer": layer, "head": head, **row})
    by_selectivity = sorted(scan, key=lambda r: -r["selectivity"])
    by_copy_cost = sorted(scan, key=lambda r: (-r["copy"], -r["item_accuracy"]))
    chosen = {f"top {k} copy head{'s' * (k > 1)}": by_selectivity[:k] for k in range(1, keep + 1)}
    chosen[f"control: {keep} heads least used for copying"] = by_copy_cost[:keep]
    conditions = {"none": {"heads": [], **none}}
    for label, rows in chosen.items():
        masked = [(r["layer"], r["head"]) for r in rows]
        conditions[label] = {
            "heads": masked,
            **_condition(llm, tokenizer, items_list, questions, _mask(masked), seed),
        }
    return {"n": samples, "scan": scan, "conditions": conditions}


def _condition(llm, tokenizer, items_list, questions, spec: dict | None, seed: int) -> dict:
    exact, item = _recall(llm, items_list, spec)
    return {
        "copy": exact,
        "item_accuracy": item,
        **_chat_task(llm, tokenizer, questions, spec, seed),
    }


def decoding_on_recall(llm, cfg, samples: int, seed: int) -> list[dict]:
    """Copying with greedy, fused and contrastive decoding: lists of training's lengths
    (RECALL_ITEMS) and longer ones (LONG_RECALL)."""
    n = cfg.num_hidden_layers
    modes = {
        "greedy": None,
        f"fuse, layer {n - 2}, weight 0.3": {
            "decoding": {"mode": "fuse", "layer": n - 2, "weight": 0.3}
        },
        'contrast (DoLa), "low" layers': {"decoding": {"mode": "contrast", "layers": "low"}},
        'contrast (DoLa), "high" layers': {"decoding": {"mode": "contrast", "layers": "high"}},
    }
    buckets = {
        _span(RECALL_ITEMS): tasks.recall_items(samples, seed + 1, RECALL_ITEMS),
        _span(LONG_RECALL): tasks.recall_items(samples, seed + 2, LONG_RECALL),
    }
    rows = []
    for label, spec in modes.items():
        row = {"decoding": label, "n": samples}
        for bucket, items_list in buckets.items():
            row[bucket] = dict(
                zip(("copy", "item_accuracy"), _recall(llm, items_list, spec), strict=True)
            )
        rows.append(row)
    return rows


def _fmt_rate(row: dict) -> str:
    lo, hi = row["rate_ci"]
    return f"{row['rate']:.2f} ({lo:.2f}-{hi:.2f})"


def table(result: dict) -> str:
    sweep = result["vectors"]
    scales = sorted({r["scale"] for r in sweep})
    names = list(dict.fromkeys(r["vector"] for r in sweep))
    cell = {(r["vector"], r["scale"]): r for r in sweep}
    n = sweep[0]["n"]
    lines = [
        f"### Attribute rate vs scale ({n} samples per cell, temperature 1, {MAX_TOKENS} tokens; "
        "rate with Wilson 95% interval; grammatical = share of sentences the grammar produces)",
        "",
        "| vector | questions | | " + " | ".join(f"scale {s:g}" for s in scales) + " |",
        "|---|---|---|" + "---:|" * len(scales),
    ]
    for name in names:
        rows = [cell[name, s] for s in scales]
        lines.append(
            f"| {name} | {rows[0]['questions']} | rate | "
            + " | ".join(_fmt_rate(r) for r in rows)
            + " |"
        )
        lines.append(
            "| | | grammatical | " + " | ".join(f"{r['grammatical']:.2f}" for r in rows) + " |"
        )
    heads = result["heads"]
    lines += [
        "",
        f"### Head masks ({heads['n']} recall prompts of {_span(RECALL_ITEMS)} items, greedy; "
        f"chat task on "
        f"{heads['n']} questions naming a topic, temperature 1)",
        "",
        "| masked | heads (layer.head) | copy exact | item accuracy | chat grammatical "
        "| chat on-topic |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, c in heads["conditions"].items():
        masked = ", ".join(f"{i}.{h}" for i, h in c["heads"]) or "-"
        lines.append(
            f"| {label} | {masked} | {c['copy']:.2f} | {c['item_accuracy']:.2f} | "
            f"{c['grammatical']:.2f} | {c['on_topic']:.2f} |"
        )
    dec = result["decoding"]
    spans = (_span(RECALL_ITEMS), _span(LONG_RECALL))
    lines += [
        "",
        f"### Decoding on recall ({dec[0]['n']} prompts per length bucket, greedy selection; "
        f"training saw {spans[0]} items)",
        "",
        "| decoding | "
        + " | ".join(f"{b} items: copy exact | item accuracy" for b in spans)
        + " |",
        "|---|" + "---:|---:|" * len(spans),
    ]
    for r in dec:
        cells = " | ".join(f"{r[b]['copy']:.2f} | {r[b]['item_accuracy']:.2f}" for b in spans)
        lines.append(f"| {r['decoding']} | {cells} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    sweep = result["vectors"]
    for ax, group, title in (
        (axes[0], SENTIMENT, "sentiment vectors (mixed questions)"),
        (axes[1], TOPICS, "topic vectors (open questions)"),
    ):
        for name in [n for n in dict.fromkeys(r["vector"] for r in sweep) if n in group]:
            rows = sorted((r for r in sweep if r["vector"] == name), key=lambda r: r["scale"])
            x = [r["scale"] for r in rows]
            y = np.array([r["rate"] for r in rows])
            ci = np.array([r["rate_ci"] for r in rows]).T
            line = ax.errorbar(
                x, y, yerr=[y - ci[0], ci[1] - y], marker="o", capsize=3, label=f"{name}: rate"
            )
            ax.plot(
                x,
                [r["grammatical"] for r in rows],
                ls="--",
                color=line[0].get_color(),
                alpha=0.6,
                label=f"{name}: grammatical",
            )
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set(title=title, xlabel="steering scale", ylabel="share of answers", ylim=(0, 1.02))
        ax.legend(fontsize=7, ncol=2)
    heads = result["heads"]
    layers = 1 + max(r["layer"] for r in heads["scan"])
    nheads = 1 + max(r["head"] for r in heads["scan"])
    grid, grammar = np.zeros((layers, nheads)), np.zeros((layers, nheads))
    for r in heads["scan"]:
        grid[r["layer"], r["head"]] = r["copy"]
        grammar[r["layer"], r["head"]] = r["grammatical"]
    im = axes[2].imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for (i, h), v in np.ndenumerate(grid):
        axes[2].text(
            h,
            i,
            f"{v:.2f}\n({grammar[i, h]:.2f})",
            ha="center",
            va="center",
            color="white" if v < 0.5 else "black",
            fontsize=8,
        )
    none = heads["conditions"]["none"]
    axes[2].set(
        title=f"one head masked: copy accuracy (chat grammar)\n"
        f"unmasked {none['copy']:.2f} ({none['grammatical']:.2f})",
        xlabel="head",
        ylabel="layer",
        xticks=range(nheads),
        yticks=range(layers),
    )
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from server.demo import SHIPPED_VECTORS_DIR, demo_model
    from steering.vectors import read_any

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="checkpoint dir (default: the shipped demo model)")
    p.add_argument("--vectors-dir", default=str(SHIPPED_VECTORS_DIR))
    p.add_argument("--vectors", help="comma-separated (default: every shipped one)")
    p.add_argument("--samples", type=int, default=240, help="answers per (vector, scale)")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    p.add_argument("--recall-samples", type=int, default=200)
    p.add_argument("--copy-heads", type=int, default=2, help="most heads masked together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="8 samples per cell: a minute")
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.samples, args.recall_samples, args.scales = 8, 8, "0,1"

    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    model = args.model or str(demo_model())
    cfg = AutoConfig.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    names = (
        args.vectors.split(",")
        if args.vectors
        else [
            name
            for name in (*SENTIMENT, *TOPICS)
            if (Path(args.vectors_dir) / f"{name}.safetensors").exists()
        ]
    )
    for name in names:  # fail before the engine starts, naming the file
        vector = read_any(Path(args.vectors_dir) / f"{name}.safetensors")
        if vector.hidden_size != cfg.hidden_size:
            sys.exit(
                f"--vectors: {name} has hidden size {vector.hidden_size}, "
                f"the model {cfg.hidden_size}"
            )
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        seed=args.seed,
        max_model_len=512,
        kv_cache_memory_bytes=512 << 20,
        max_num_seqs=256,
        additional_config={"steerserve": {"vectors_dir": args.vectors_dir, "decoding": True}},
    )
    scales = [float(s) for s in args.scales.split(",")]
    result = recording.header(model, args, vectors=names)
    result["vectors"] = vector_sweep(llm, tokenizer, names, scales, args.samples, args.seed)
    result["heads"] = head_scan(
        llm, tokenizer, cfg, args.recall_samples, args.seed, args.copy_heads
    )
    result["decoding"] = decoding_on_recall(llm, cfg, args.recall_samples, args.seed)
    recording.write(result, args.out, "steering-effect", table(result), plot)
    return result


if __name__ == "__main__":
    main()
