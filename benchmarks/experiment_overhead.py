"""What being in an A/B experiment costs a request, and how fast feedback is taken.

Against a running server with an admin key; the experiment it creates has two unsteered
arms, so that only the experiment machinery (enrolment, the durable assignment, outcome
records, per-arm metrics) differs between the two conditions:

    steerserve serve --admin-key secret --database-url sqlite:////tmp/ab.db &
    python benchmarks/experiment_overhead.py --base-url http://localhost:8000 --admin-key secret

It creates `overhead` (two unsteered arms), then sends requests alternately inside and
outside it (interleaved, so drift hits both alike) and reports the latency of each, then
posts feedback on every experiment response from concurrent clients.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from tqdm import tqdm

EXPERIMENT = {"name": "overhead", "arms": [{"name": "a"}, {"name": "b"}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://localhost:8000")
    parser.add_argument("--admin-key", required=True)
    parser.add_argument("--requests", type=int, default=200, help="per condition")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--feedback-clients", type=int, default=16)
    args = parser.parse_args()

    http = httpx.Client(base_url=args.base_url, timeout=120)
    admin = {"Authorization": f"Bearer {args.admin_key}"}
    r = http.put(f"/v1/admin/experiments/{EXPERIMENT['name']}", json=EXPERIMENT, headers=admin)
    r.raise_for_status()
    model = http.get("/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "prompt": "tell me about the river",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }

    latency: dict[str, list[float]] = {"outside": [], "inside": []}
    ids: list[str] = []
    for i in tqdm(range(2 * args.requests), desc="requests"):
        inside = i % 2 == 1
        extra = {"experiment": EXPERIMENT["name"], "user": f"u{i}"} if inside else {}
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json={**body, **extra})
        latency["inside" if inside else "outside"].append(time.perf_counter() - t0)
        r.raise_for_status()
        if inside:
            ids.append(r.json()["id"])

    def feedback(rid: str) -> None:
        r = http.post("/v1/feedback", json={"id": rid, "metric": "liked", "value": True})
        r.raise_for_status()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.feedback_clients) as pool:
        list(pool.map(feedback, ids))
    feedback_seconds = time.perf_counter() - t0

    out = {
        name: {
            "p50_ms": 1e3 * float(np.percentile(v, 50)),
            "p95_ms": 1e3 * float(np.percentile(v, 95)),
            "n": len(v),
        }
        for name, v in latency.items()
    }
    out["inside_minus_outside_p50_ms"] = out["inside"]["p50_ms"] - out["outside"]["p50_ms"]
    out["feedback_per_second"] = len(ids) / feedback_seconds
    out["feedback_clients"] = args.feedback_clients
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
