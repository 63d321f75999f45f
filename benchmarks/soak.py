"""Soak: many concurrent mixed streams against one `steerserve serve` for a while.

A fixed set of greedy request templates (plain, named vectors, head masks, an SAE feature
clamp, readout, a conditional spec, `variants`, an experiment's units) is first run one at a
time for its reference answer. Then `--concurrency` clients loop for `--duration` seconds,
each picking templates at random, half of them streamed, and a share of the streams
dropped after their first chunk (a disconnect). Every completed answer must equal its
template's solo answer (text, and readout values to 1e-4). Every `--sample` seconds the
server's RSS (engine processes included), steerserve's active slots and vLLM's running
requests are read; at the end, once idle, the slots must be back to zero and the RSS must
not have grown past `--max-rss-growth` over the run's second half.

    python benchmarks/soak.py                          # demo model, 64 clients, 10 minutes
    python benchmarks/soak.py --smoke                  # 8 clients, 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import recording  # noqa: E402
from benchmarks.server_process import free_port, running_server, steerserve_command  # noqa: E402

MODEL = "steerserve-demo"
ADMIN = "k-soak"
EXPERIMENT = {
    "name": "soak",
    "arms": [
        {"name": "plain", "steering": {"vectors": []}},
        {"name": "positive", "steering": {"vectors": [{"name": "positive", "scale": 1.0}]}},
    ],
}
QUESTIONS = ("tell me about the food.", "how was your day?", "what do you think of the cat?")


def templates(max_tokens: int) -> list[dict]:
    """(name, body, headers) of each request kind; greedy, so each has one right answer."""
    specs = {
        "plain": None,
        "positive": {"vectors": [{"name": "positive", "scale": 1.5}]},
        "negative-heads": {
            "vectors": [{"name": "negative", "scale": 1.0}],
            "heads": [{"layer": 1, "heads": [0, 2]}],
        },
        "feature": {"features": [{"sae": "demo", "feature": 91, "op": "clamp", "value": 20.0}]},
        "readout": {"readout": [{"name": "positive", "layer": 2}, {"name": "food", "layer": 3}]},
        "conditional": {
            "conditions": [{"name": "food", "vector": "food", "layer": 0, "threshold": 0.078}],
            "vectors": [
                {"name": "positive", "scale": 1.5, "positions": "generated", "when": "food"}
            ],
        },
    }
    out = []
    for q, question in enumerate(QUESTIONS):
        base = {
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        for name, spec in specs.items():
            body = dict(base, steering=spec) if spec else dict(base)
            out.append({"name": f"{name}/{q}", "body": body, "headers": {}})
        variants = [specs["positive"], None, specs["negative-heads"]]
        out.append({"name": f"variants/{q}", "body": dict(base, variants=variants), "headers": {}})
        for unit in ("u-1", "Zoë"):
            out.append(
                {
                    "name": f"experiment-{unit}/{q}",
                    "body": dict(base, user=unit),
                    "headers": {"X-Experiment": "soak"},
                }
            )
    return out


def _merge_readout(into: dict[int, list], choice: dict) -> None:
    for k, entry in enumerate(choice.get("readout") or []):
        values = into.setdefault(k, [])
        start = entry.get("start", len(values))
        values[start : start + len(entry["values"])] = entry["values"]


async def ask(client: httpx.AsyncClient, t: dict, stream: bool, drop: bool) -> dict | None:
    """The answer's texts (per choice) and readout values; None for a dropped stream."""
    body = dict(t["body"], stream=stream)
    if not stream:
        r = await client.post("/v1/chat/completions", json=body, headers=t["headers"])
        r.raise_for_status()
        data = r.json()
        texts = {c["index"]: c["message"]["content"] for c in data["choices"]}
        readout = {
            c["index"]: {k: e["values"] for k, e in enumerate(c.get("readout") or [])}
            for c in data["choices"]
        }
        return {"texts": texts, "readout": readout}
    texts: dict[int, str] = {}
    readout: dict[int, dict[int, list]] = {}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=t["headers"]) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if drop:  # a client that goes away mid-stream
                return None
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            for c in event.get("choices", []):
                delta = c.get("delta") or {}
                texts[c["index"]] = texts.get(c["index"], "") + (delta.get("content") or "")
                _merge_readout(readout.setdefault(c["index"], {}), c)
    return {"texts": texts, "readout": readout}


def same(got: dict, want: dict) -> bool:
    if got["texts"] != want["texts"]:
        return False
    for i, entries in want["readout"].items():
        for k, values in entries.items():
            other = got["readout"].get(i, {}).get(k, [])
            if len(other) != len(values) or any(
                (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-4)
                for a, b in zip(other, values, strict=True)
            ):
                return False
    return True


def rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def metric(text: str, name: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def soak(base: str, proc: psutil.Process, args: argparse.Namespace) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency + 8)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        pool = templates(args.max_tokens)
        solo = {}
        for t in pool:  # one at a time: each template's reference answer
            solo[t["name"]] = await ask(client, t, stream=False, drop=False)
        counts = {"completed": 0, "dropped": 0, "mismatched": 0, "errors": 0}
        mismatches: list[str] = []
        samples: list[dict] = []
        started = time.monotonic()
        deadline = started + args.duration
        rng = random.Random(args.seed)

        async def worker(i: int) -> None:
            local = random.Random(rng.random())
            while time.monotonic() < deadline:
                t = local.choice(pool)
                stream = local.random() < 0.5
                drop = stream and local.random() < args.drop_share
                try:
                    got = await ask(client, t, stream, drop)
                except httpx.HTTPError as e:
                    counts["errors"] += 1
                    mismatches.append(f"{t['name']}: {type(e).__name__} {e}")
                    continue
                if got is None:
                    counts["dropped"] += 1
                elif same(got, solo[t["name"]]):
                    counts["completed"] += 1
                else:
                    counts["mismatched"] += 1
                    mismatches.append(f"{t['name']} (stream={stream}): {got['texts']}")

        async def sampler() -> None:
            while time.monotonic() < deadline:
                text = (await client.get("/metrics")).text
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 1),
                        "rss_mib": rss(proc) / 2**20,
                        "slots_active": metric(text, "steerserve:intervention_slots_active"),
                        "running": metric(text, "vllm:num_requests_running"),
                        **counts,
                    }
                )
                await asyncio.sleep(args.sample)

        await asyncio.gather(sampler(), *(worker(i) for i in range(args.concurrency)))
        # Idle again: one more request carries the last finished ones' release to the worker.
        await asyncio.sleep(2)
        await ask(client, pool[0], stream=False, drop=False)
        text = (await client.get("/metrics")).text
        end = {
            "rss_mib": rss(proc) / 2**20,
            "slots_active": metric(text, "steerserve:intervention_slots_active"),
            "running": metric(text, "vllm:num_requests_running"),
        }
    half = [s["rss_mib"] for s in samples if s["t"] >= args.duration / 2] or [end["rss_mib"]]
    return {
        "templates": len(pool),
        "counts": counts,
        "mismatches": mismatches[:20],
        "samples": samples,
        "end": end,
        "rss_growth_second_half_mib": max(half) - half[0],
        "peak_slots_active": max((s["slots_active"] for s in samples), default=0),
        "peak_running": max((s["running"] for s in samples), default=0),
    }


def table(result: dict) -> str:
    c, end, growth = result["counts"], result["end"], result["rss_growth_second_half_mib"]
    return "\n".join(
        [
            "| measure | value |",
            "|---|---:|",
            f"| duration, clients | {result['config']['duration']} s, "
            f"{result['config']['concurrency']} |",
            f"| completed, each equal to its solo run | {c['completed']:,} |",
            f"| differing from the solo run | {c['mismatched']} |",
            f"| dropped mid-stream (disconnects) | {c['dropped']:,} |",
            f"| errors | {c['errors']} |",
            f"| peak running requests / active slots | {result['peak_running']:.0f} / "
            f"{result['peak_slots_active']:.0f} |",
            f"| active slots once idle | {end['slots_active']:.0f} |",
            f"| server RSS at the end | {end['rss_mib']:,.0f} MiB |",
            f"| RSS growth over the second half | {growth:+.1f} MiB |",
        ]
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    t = [x["t"] for x in s]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a.plot(t, [x["rss_mib"] for x in s], label="server RSS (MiB)")
    a.set_ylabel("MiB")
    a.legend()
    b.plot(t, [x["slots_active"] for x in s], label="active slots")
    b.plot(t, [x["running"] for x in s], label="running requests")
    b.set_xlabel("seconds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--drop-share", type=float, default=0.1, help="streams dropped mid-way")
    p.add_argument("--sample", type=float, default=10, help="seconds between samples")
    p.add_argument("--max-rss-growth", type=float, default=64, help="MiB, second half")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="8 clients for 20 s")
    p.add_argument("--out", help="JSON results path (default: benchmarks/results/<stamp>.json)")
    args = p.parse_args()
    if args.smoke:
        args.duration, args.concurrency, args.sample, args.max_tokens = 20, 8, 5, 8
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "experiments.yaml").write_text(json.dumps([EXPERIMENT]))
    port = free_port()
    serve = [
        "--admin-key",
        ADMIN,
        "--experiments",
        str(work / "experiments.yaml"),
        "--database-url",
        f"sqlite:///{work / 'soak.db'}",
        "--max-num-seqs",
        str(max(16, args.concurrency)),
    ]
    with running_server(steerserve_command(serve, port), port, work / "serve.log") as (base, proc):
        result = asyncio.run(soak(base, psutil.Process(proc.pid), args))
    result = {**recording.header(MODEL, args), **result}
    recording.write(result, args.out, "soak", table(result), plot)
    ok = (
        result["counts"]["mismatched"] == 0
        and result["counts"]["errors"] == 0
        and result["end"]["slots_active"] == 0
        and result["rss_growth_second_half_mib"] <= args.max_rss_growth
    )
    if not ok:
        print("SOAK FAILED:", json.dumps(result["mismatches"][:5], ensure_ascii=False))
        sys.exit(1)


if __name__ == "__main__":
    main()
