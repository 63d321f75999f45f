"""A synthetic English corpus whose attributes are known word by word.

Every conversation is about one topic and carries one sentiment, in a small grammar with
enough variety to be worth learning (subjects, verbs, objects, places, times, clauses);
the user's question names the topic but never the sentiment, so an unsteered model
answers positively about half the time and a sentiment direction has something to move.
Copy/recall lines ("remember: kiq pix biz . repeat: kiq pix biz .") over random symbols teach
the copying that induction heads do. Everything is drawn from one seeded generator.

The word lists double as the classifier: `sentiment_of(text)` and `topic_of(text)` count
the grammar's own words, so an attribute rate needs no model to measure it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

TOPICS: dict[str, dict[str, list[str]]] = {
    "animals": {
        "nouns": [
            "cat",
            "dog",
            "horse",
            "rabbit",
            "fox",
            "owl",
            "bear",
            "deer",
            "duck",
            "wolf",
            "goat",
            "mouse",
        ],
        "verbs": ["chases", "watches", "follows", "feeds", "finds", "hides from"],
        "places": [
            "in the forest",
            "near the barn",
            "by the pond",
            "on the farm",
            "under the old tree",
            "in the field",
        ],
    },
    "food": {
        "nouns": [
            "bread",
            "soup",
            "cake",
            "apple",
            "cheese",
            "pasta",
            "salad",
            "pie",
            "rice",
            "tea",
            "coffee",
            "pizza",
        ],
        "verbs": ["cooks", "tastes", "serves", "bakes", "shares", "orders"],
        "places": [
            "in the kitchen",
            "at the market",
            "at the cafe",
            "on the table",
            "at the bakery",
            "at dinner",
        ],
    },
    "weather": {
        "nouns": [
            "rain",
            "snow",
            "wind",
            "storm",
            "sun",
            "fog",
            "cloud",
            "frost",
            "thunder",
            "breeze",
            "sky",
            "ice",
        ],
        "verbs": ["covers", "sweeps over", "reaches", "fills", "crosses", "settles on"],
        "places": [
            "over the hills",
            "across the valley",
            "over the city",
            "along the coast",
            "above the lake",
            "in the mountains",
        ],
    },
    "sports": {
        "nouns": [
            "team",
            "runner",
            "player",
            "coach",
            "ball",
            "race",
            "match",
            "goal",
            "swimmer",
            "score",
            "game",
            "crowd",
        ],
        "verbs": ["wins", "plays", "trains for", "watches", "joins", "starts"],
        "places": [
            "at the stadium",
            "on the track",
            "in the pool",
            "on the field",
            "at the gym",
            "in the park",
        ],
    },
}

SENTIMENT: dict[str, dict[str, list[str]]] = {
    "positive": {
        "adjectives": [
            "wonderful",
            "lovely",
            "happy",
            "bright",
            "beautiful",
            "great",
            "delightful",
            "cheerful",
            "pleasant",
            "excellent",
        ],
        "feelings": ["love", "enjoy", "adore", "like"],
        "adverbs": ["gladly", "warmly", "proudly", "happily"],
        "closers": ["what a joy", "it made my day", "i feel so good", "everyone smiled"],
    },
    "negative": {
        "adjectives": [
            "terrible",
            "awful",
            "sad",
            "gloomy",
            "ugly",
            "horrible",
            "miserable",
            "dreadful",
            "nasty",
            "boring",
        ],
        "feelings": ["hate", "dislike", "dread", "despise"],
        "adverbs": ["sadly", "coldly", "angrily", "bitterly"],
        "closers": ["what a mess", "it ruined my day", "i feel so bad", "everyone frowned"],
    },
}

TIMES = [
    "today",
    "this morning",
    "every day",
    "last night",
    "in the evening",
    "at noon",
    "on sunday",
    "again",
]
SUBJECTS = [
    "the old man",
    "my friend",
    "a little girl",
    "the teacher",
    "my sister",
    "a young boy",
    "our neighbor",
    "the farmer",
]
# Recall symbols: letters only, so that byte-level BPE (which splits letters from digits)
# learns each as one token and copying is token-for-token. No grammar word among them.
_GRAMMAR_WORDS = {w for t in TOPICS.values() for ws in t.values() for p in ws for w in p.split()}
SYMBOLS = [
    s
    for s in (a + v + z for a in "bdfgkmpstvz" for v in "aeiou" for z in "xzq")
    if s not in _GRAMMAR_WORDS
][:120]

RECALL_ITEMS = range(3, 9)  # items per recall line
QUESTIONS = [
    "tell me about the {noun}.",
    "what about the {noun}?",
    "say something about the {noun}.",
    "how was the {noun}?",
    "describe the {noun}.",
]
# A quarter of the questions name no topic: there the unsteered topic rate is about 1/4
# and a topic direction has something to move (a question naming the cat pins the topic).
OPEN_QUESTIONS = [
    "tell me something.",
    "what happened today?",
    "say something nice or not.",
    "tell me a story.",
    "how was your day?",
]


@dataclass(frozen=True)
class Conversation:
    topic: str
    sentiment: str
    user: str
    assistant: str


def _sentence(rng: random.Random, topic: str, sentiment: str) -> str:
    t, s = TOPICS[topic], SENTIMENT[sentiment]
    noun, other = rng.sample(t["nouns"], 2)
    adj = rng.choice(s["adjectives"])
    form = rng.randrange(6)
    if form == 0:
        return f"the {adj} {noun} {rng.choice(t['verbs'])} the {other} {rng.choice(t['places'])}."
    if form == 1:
        who, feels = rng.choice(SUBJECTS), rng.choice(s["feelings"])
        return f"{who} {feels}s the {noun} {rng.choice(TIMES)}."
    if form == 2:
        return f"the {noun} {rng.choice(t['places'])} was {adj} {rng.choice(TIMES)}."
    if form == 3:
        return f"i {rng.choice(s['feelings'])} the {noun} because it is {adj}."
    if form == 4:
        return (
            f"{rng.choice(SUBJECTS)} {rng.choice(s['adverbs'])} {rng.choice(t['verbs'])} "
            f"the {adj} {noun}."
        )
    return f"{rng.choice(s['closers'])}, the {noun} was so {adj}."


def conversation(
    rng: random.Random, topic: str | None = None, sentiment: str | None = None
) -> Conversation:
    """A random conversation (of the given topic / sentiment). Two calls with equal draws
    and different topics or sentiments give parallel sentences: the word lists of every
    topic, and of both sentiments, have the same lengths."""
    topic = topic or rng.choice(sorted(TOPICS))
    sentiment = sentiment or rng.choice(sorted(SENTIMENT))
    noun = rng.choice(TOPICS[topic]["nouns"])
    open_question = rng.random() < 0.25
    question = rng.choice(OPEN_QUESTIONS if open_question else QUESTIONS)
    user = question.format(noun=noun)
    answer = " ".join(_sentence(rng, topic, sentiment) for _ in range(rng.randint(2, 4)))
    return Conversation(topic, sentiment, user, answer)


def contrast_pairs(attribute: str, count: int, seed: int) -> Iterator[dict]:
    """`{"positive": messages, "negative": messages}` for `steerserve vectors train`: the
    same conversation with the attribute (a sentiment or a topic) and without it (the other
    sentiment, or another topic), sentence for sentence."""
    rng = random.Random(seed)
    for _ in range(count):
        draw = rng.randrange(1 << 30)
        if attribute in SENTIMENT:
            topic = rng.choice(sorted(TOPICS))
            other = next(s for s in sorted(SENTIMENT) if s != attribute)
            sides = [(topic, attribute), (topic, other)]
        else:
            sentiment = rng.choice(sorted(SENTIMENT))
            other = rng.choice([t for t in sorted(TOPICS) if t != attribute])
            sides = [(attribute, sentiment), (other, sentiment)]
        pos, neg = (conversation(random.Random(draw), t, s) for t, s in sides)
        yield {
            side: [
                {"role": "user", "content": c.user},
                {"role": "assistant", "content": c.assistant},
            ]
            for side, c in (("positive", pos), ("negative", neg))
        }


def recall_line(rng: random.Random) -> str:
    items = rng.choices(SYMBOLS, k=rng.randint(RECALL_ITEMS.start, RECALL_ITEMS.stop - 1))
    return f"remember: {' '.join(items)} . repeat: {' '.join(items)} ."


def documents(seed: int, conversations: int, recall_lines: int) -> Iterator[dict]:
    """`{"kind": "chat", ...}` and `{"kind": "recall", "text": ...}`, shuffled, by seed."""
    rng = random.Random(seed)
    kinds = ["chat"] * conversations + ["recall"] * recall_lines
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "chat":
            c = conversation(rng)
            yield {
                "kind": "chat",
                "topic": c.topic,
                "sentiment": c.sentiment,
                "user": c.user,
                "assistant": c.assistant,
            }
        else:
            yield {"kind": "recall", "text": recall_line(rng)}


_WORD = re.compile(r"[a-z]+")


SENTIMENT_WORDS = {
    w: label
    for label, lists in SENTIMENT.items()
    for key in ("adjectives", "feelings", "adverbs")
    for w in lists[key]
}
TOPIC_WORDS = {w: topic for topic, lists in TOPICS.items() for w in lists["nouns"]}


def _vote(text: str, lexicon: dict[str, str]) -> str | None:
    counts: dict[str, int] = {}
    for w in _WORD.findall(text.lower()):
        # "loves" and "hates" are the feelings with a verb ending
        label = lexicon.get(w) or (lexicon.get(w[:-1]) if w.endswith("s") else None)
        if label is not None:
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    winners = [k for k, v in counts.items() if v == best]
    return winners[0] if len(winners) == 1 else None


def sentiment_of(text: str) -> str | None:
    """ "positive", "negative", or None (no sentiment words, or a tie)."""
    return _vote(text, SENTIMENT_WORDS)


def topic_of(text: str) -> str | None:
    return _vote(text, TOPIC_WORDS)


def _any(words: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _sentence_patterns() -> list[re.Pattern]:
    """One regex per sentence form of `_sentence`, for any topic and sentiment (a sentence
    is grammatical if it is one the generator could have produced, topic and sentiment
    mixed or not)."""
    nouns = _any([w for t in TOPICS.values() for w in t["nouns"]])
    verbs = _any([w for t in TOPICS.values() for w in t["verbs"]])
    places = _any([w for t in TOPICS.values() for w in t["places"]])
    adj = _any([w for s in SENTIMENT.values() for w in s["adjectives"]])
    feel = _any([w for s in SENTIMENT.values() for w in s["feelings"]])
    adv = _any([w for s in SENTIMENT.values() for w in s["adverbs"]])
    closer = _any([w for s in SENTIMENT.values() for w in s["closers"]])
    who, when = _any(SUBJECTS), _any(TIMES)
    forms = [
        rf"the {adj} {nouns} {verbs} the {nouns} {places}\.",
        rf"{who} {feel}s the {nouns} {when}\.",
        rf"the {nouns} {places} was {adj} {when}\.",
        rf"i {feel} the {nouns} because it is {adj}\.",
        rf"{who} {adv} {verbs} the {adj} {nouns}\.",
        rf"{closer}, the {nouns} was so {adj}\.",
    ]
    return [re.compile(f) for f in forms]


_PATTERNS = _sentence_patterns()
_SPLIT = re.compile(r"(?<=\.)\s+")


def grammatical_fraction(text: str) -> float:
    """The share of `text`'s sentences that the grammar can produce (0.0 for no sentence).
    A last sentence without its full stop (cut by max_tokens) is not counted."""
    parts = [p.strip() for p in _SPLIT.split(text.strip()) if p.strip()]
    if parts and not parts[-1].endswith("."):
        parts = parts[:-1]
    if not parts:
        return 0.0
    return sum(any(p.fullmatch(s) for p in _PATTERNS) for s in parts) / len(parts)
