"""The demo corpus: deterministic by seed, varied, and labelled by its own word lists."""

from __future__ import annotations

import random

from demo.corpus import (
    SENTIMENT,
    TOPICS,
    conversation,
    documents,
    recall_line,
    sentiment_of,
    topic_of,
)


def test_same_seed_same_corpus_other_seed_other_corpus():
    a = list(documents(0, 300, 100))
    assert a == list(documents(0, 300, 100))
    assert a != list(documents(1, 300, 100))
    assert sum(d["kind"] == "recall" for d in a) == 100


def test_word_lists_label_every_generated_answer():
    rng = random.Random(7)
    seen, open_questions = set(), 0
    for _ in range(3000):
        c = conversation(rng)
        assert sentiment_of(c.assistant) == c.sentiment, c
        assert topic_of(c.assistant) == c.topic, c
        assert sentiment_of(c.user) is None  # the question never gives the sentiment away
        assert topic_of(c.user) in (None, c.topic)
        open_questions += topic_of(c.user) is None
        seen.add((c.topic, c.sentiment))
    assert seen == {(t, s) for t in TOPICS for s in SENTIMENT}
    assert 600 < open_questions < 900  # a quarter name no topic


def test_enough_variety_to_be_worth_learning():
    rng = random.Random(3)
    sentences = set()
    for _ in range(40_000):
        sentences.update(s.strip() for s in conversation(rng).assistant.split(".") if s.strip())
    assert len(sentences) > 100_000 * 0.5  # most of the ~120k drawn sentences are distinct


def test_recall_lines_repeat_their_items():
    rng = random.Random(5)
    for _ in range(200):
        head, tail = recall_line(rng).removeprefix("remember: ").split(" . repeat: ")
        assert head == tail.removesuffix(" .") and 3 <= len(head.split()) <= 8


def test_classifier_ties_and_empty_text_are_none():
    assert sentiment_of("the cat sat.") is None
    assert sentiment_of("a lovely but terrible day") is None
    assert sentiment_of("she loves it, it is lovely") == "positive"


def test_grammar_accepts_what_it_generates_and_refuses_word_salad():
    from demo.corpus import grammatical_fraction

    rng = random.Random(11)
    for _ in range(500):
        assert grammatical_fraction(conversation(rng).assistant) == 1.0
    assert grammatical_fraction("the cat the the dog. i love the cake because it is") == 0.0
    assert grammatical_fraction("i love the cake because it is lovely. cat dog fox.") == 0.5


def test_contrast_pairs_differ_only_in_their_attribute():
    from demo.corpus import contrast_pairs

    for attribute, classify in (("positive", sentiment_of), ("food", topic_of)):
        pairs = list(contrast_pairs(attribute, 50, seed=2))
        for pair in pairs:
            pos, neg = pair["positive"][1]["content"], pair["negative"][1]["content"]
            assert classify(pos) == attribute and classify(neg) not in (attribute, None)
            assert pos.count(".") == neg.count(".")  # sentence for sentence
        assert pairs == list(contrast_pairs(attribute, 50, seed=2))
