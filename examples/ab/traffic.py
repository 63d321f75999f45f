"""Simulated traffic and feedback for the A/B example (docs/ab-testing.md).

Each simulated user sends chat requests into the experiment (sticky by the OpenAI `user`
field), then rates each reply through `POST /v1/feedback`. The rater is a stand-in for real
users, stated plainly: it likes positive replies, as the demo corpus's own word lists judge
them (thumbs up with probability 0.75 instead of 0.35; 0.8 stars more on average), with
seeded noise. The replies themselves are the served model's (`make serve`'s
demo model), steered by whichever arm the user is in.

    python examples/ab/traffic.py --base-url http://localhost:8000 --users 300
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from demo.corpus import sentiment_of  # noqa: E402

PROMPTS = [
    "tell me about the cat.",
    "how was your day?",
    "describe the storm.",
    "what about the pizza?",
    "tell me a story.",
]


def rate(text: str, rng: random.Random) -> tuple[bool, float]:
    positive = sentiment_of(text) == "positive"
    thumbs = rng.random() < (0.75 if positive else 0.35)
    stars = min(5.0, max(1.0, round(rng.gauss(3.2 if positive else 2.4, 0.9))))
    return thumbs, stars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://localhost:8000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--experiment", default="tone")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--requests-per-user", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    client = OpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key)
    http = httpx.Client(
        base_url=args.base_url, timeout=120, headers={"Authorization": f"Bearer {args.api_key}"}
    )
    model = client.models.list().data[0].id

    def one(job: tuple[int, int]) -> str:
        user, k = job
        rng = random.Random(f"{args.seed}-{user}-{k}")
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
            max_tokens=args.max_tokens,
            temperature=0.8,
            seed=rng.randrange(2**31),
            user=f"user-{user}",
            extra_body={"experiment": args.experiment},
        )
        arm = r.model_extra["steering"]["arm"]
        thumbs, stars = rate(r.choices[0].message.content or "", rng)
        for metric, value in (("thumbs", thumbs), ("rating", stars)):
            fb = http.post("/v1/feedback", json={"id": r.id, "metric": metric, "value": value})
            fb.raise_for_status()
        return arm

    jobs = [(u, k) for u in range(args.users) for k in range(args.requests_per_user)]
    with ThreadPoolExecutor(args.concurrency) as pool:
        arms = Counter(tqdm(pool.map(one, jobs), total=len(jobs), desc="requests"))
    print("requests per arm:", dict(sorted(arms.items())))


if __name__ == "__main__":
    main()
