"""The demo model's tasks as prompts and scores (benchmarks/steering_effect.py).

- chat: a user question (naming a topic noun, or open) -> an answer whose sentiment, topic
  and grammaticality the corpus's own word lists and grammar judge;
- recall: "remember: kiq pix biz . repeat:" -> the items again, which only copying (attention
  back to the earlier items) can do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from demo.corpus import OPEN_QUESTIONS, QUESTIONS, RECALL_ITEMS, SYMBOLS, TOPICS, topic_of


@dataclass(frozen=True)
class Question:
    text: str
    topic: str | None  # the topic the question names, None for an open question


def questions(n: int, seed: int, kind: str = "mixed") -> list[Question]:
    """`n` user questions: "named" (each names a topic noun), "open" (none does) or "mixed"
    (the corpus's own proportions: a quarter open)."""
    if kind not in ("named", "open", "mixed"):
        raise ValueError(f"kind: {kind!r} is not 'named', 'open' or 'mixed'")
    rng = random.Random(seed)
    nouns = sorted(w for t in TOPICS.values() for w in t["nouns"])
    out = []
    for _ in range(n):
        is_open = kind == "open" or (kind == "mixed" and rng.random() < 0.25)
        if is_open:
            out.append(Question(rng.choice(OPEN_QUESTIONS), None))
        else:
            noun = rng.choice(nouns)
            out.append(Question(rng.choice(QUESTIONS).format(noun=noun), topic_of(noun)))
    return out


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def recall_items(n: int, seed: int, lengths: range = RECALL_ITEMS) -> list[list[str]]:
    """`n` symbol lists with lengths drawn from `lengths` (by default, training's)."""
    rng = random.Random(seed)
    return [rng.choices(SYMBOLS, k=rng.choice(lengths)) for _ in range(n)]


def recall_prompt(items: list[str]) -> str:
    # Recall lines are plain documents in training: BOS, no chat markup.
    return f"<s>remember: {' '.join(items)} . repeat:"


def copied(text: str, items: list[str]) -> bool:
    """Whether a continuation of `recall_prompt(items)` repeats every item, in order."""
    return text.split()[: len(items)] == items


def rate_interval(hits: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate (good near 0 and 1, where the normal one is not)."""
    from scipy import stats

    ci = stats.binomtest(hits, n).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)
