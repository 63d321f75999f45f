"""Readout over HTTP: each token's projections, fetched from the worker as tokens arrive.

The worker reads a token's values in the step that samples it (steering/engine/readout.py),
before the token reaches this process. So when the engine's output stream hands a request
tokens it holds no values for yet, one pull from the worker gets them; it happens before the
tokens go on to vLLM's handler, so every chunk the handler writes can carry its tokens'
values. Pulls of all requests that wait at the same moment share one `collective_rpc` (the
engine answers utility calls between steps: one call per step, not one per request).

Response shapes (docs/spec.md, "Readout"):

    choices[i].readout = [{"name", "layer", "values": [per token], "prompt_values"?}]
    (a top-k entry: {"sae", "top_k", "layer", "values": [per token: [[feature, activation]]]})
    stream chunk choice.readout = [{"name", "layer", "start", "values", "prompt_values"?}]

A stream chunk carries the values of the tokens delivered since that choice's previous
chunk, `start` being the first one's index; a choice's values that no chunk carried (a
final token whose text the handler held back) come in one chunk before `[DONE]`. Joining a
choice's chunks by `start` gives the non-streamed lists.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from steering.engine import openai_server as vllm_api
from steering.spec import ReadoutEntry

from .applied import readout_item

# A pull that finds fewer values than tokens is repeated (the worker is a step behind);
# past this many tries the missing values are sent as null rather than holding the stream.
MAX_PULLS = 4


class ReadoutFeed:
    """Batches the readout pulls of all running requests into one worker call."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.pending: list[tuple[tuple, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def pull(self, request_id: str, n: int, held: list[int], done: list[int]) -> dict:
        """See ReadoutBook.pull: per choice, {"start", "generated", "prompt"}."""
        future = asyncio.get_running_loop().create_future()
        self.pending.append(((request_id, n, held, done), future))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._drain())
        answer = await future
        return {int(k): v for k, v in answer.items()}

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                answers = await vllm_api.worker_readout_pull(
                    self.engine, [query for query, _ in batch]
                )
                if answers is None or len(answers) != len(batch):
                    raise RuntimeError("the engine has no readout (steering off?)")
            except Exception as e:  # every waiter fails with it; the feed keeps going
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():  # not cancelled (its client left)
                    future.set_result(answer)


@dataclass
class ChoiceValues:
    values: list[list[float | None]] = field(default_factory=list)  # per token: per entry
    prompt: list[list[float | None]] | None = None  # per prompt token: per entry
    tokens: int = 0  # tokens given to vLLM's handler so far
    finished: bool = False
    released: bool = False  # the worker was told to drop it
    streamed: int = 0  # values already put into stream chunks
    prompt_streamed: bool = False


class RequestReadout:
    """The readout values of one engine call's choices (all prompts of it, `n` each)."""

    def __init__(self, feed: ReadoutFeed, entries: list[ReadoutEntry], n: int):
        self.feed = feed
        self.entries = entries
        self.n = n
        self.choices: dict[int, ChoiceValues] = {}

    async def observe(self, output: Any, engine_id: str, prompt_index: int) -> None:
        """Hold the values of every token in `output` (a RequestOutput) before it is used."""
        base = prompt_index * self.n
        for o in output.outputs:
            c = self.choices.setdefault(base + o.index, ChoiceValues())
            c.tokens += len(o.token_ids)
            c.finished = c.finished or o.finish_reason is not None
        for _ in range(MAX_PULLS):
            mine = [(child, self.choices.get(base + child)) for child in range(self.n)]
            short = [ch for ch, c in mine if c is not None and len(c.values) < c.tokens]
            finishing = [ch for ch, c in mine if c is not None and c.finished and not c.released]
            if not short and not finishing:
                return
            held = [len(c.values) if c is not None else 0 for _, c in mine]
            answer = await self.feed.pull(engine_id, self.n, held, finishing)
            for child, got in answer.items():
                c = self.choices.get(base + child)
                if c is None:
                    continue
                c.values.extend(_clean(v) for v in got["generated"][len(c.values) - got["start"] :])
                if got["prompt"] is not None and c.prompt is None:
                    c.prompt = [_clean(v) for v in got["prompt"]]
            for child in finishing:  # dropped by the worker: what it did not have, it never will
                c = self.choices[base + child]
                c.released = True
                self._pad(c)
        for _, c in mine:  # the worker fell behind MAX_PULLS times
            if c is not None:
                self._pad(c)

    def _pad(self, c: ChoiceValues) -> None:
        c.values.extend([[None] * len(self.entries)] * (c.tokens - len(c.values)))

    def whole(self, choice: int) -> list[dict]:
        """`choices[i].readout` of a non-streamed response."""
        c = self.choices.get(choice, ChoiceValues())
        return self._format(c.values[: c.tokens], c.prompt)

    def delta(self, choice: int, final: bool = False) -> list[dict] | None:
        """The values of `choice` not yet streamed (None: nothing new); `final`: all of them."""
        c = self.choices.get(choice)
        if c is None:
            return None
        end = len(c.values) if final else min(c.tokens, len(c.values))
        prompt = None if c.prompt_streamed else c.prompt
        if end <= c.streamed and prompt is None:
            return None
        out = self._format(c.values[c.streamed : end], prompt, start=c.streamed)
        c.streamed = max(c.streamed, end)
        c.prompt_streamed = c.prompt_streamed or prompt is not None
        return out

    def unsent(self) -> list[int]:
        def left(c: ChoiceValues) -> bool:
            return c.streamed < len(c.values) or (c.prompt is not None and not c.prompt_streamed)

        return sorted(i for i, c in self.choices.items() if left(c))

    def _format(self, values: list, prompt: list | None, start: int | None = None) -> list[dict]:
        out = []
        for k, e in enumerate(self.entries):
            item: dict[str, Any] = readout_item(e)
            if start is not None:
                item["start"] = start
            item["values"] = [v[k] for v in values]
            if e.prompt and prompt is not None:
                item["prompt_values"] = [v[k] for v in prompt]
            out.append(item)
        return out


def _clean(row: list) -> list:
    # JSON has no NaN: a value the engine did not compute is null. A top-k entry's value
    # is its [[feature, activation], ...] list, or already None.
    return [v if v is None or isinstance(v, list) or math.isfinite(v) else None for v in row]


def rest_of_stream(readout: RequestReadout, *, chat: bool, index: int | None = None) -> list[dict]:
    """Chunk choices with the values no chunk carried yet (`index`: re-number them all)."""
    out = []
    for choice in readout.unsent():
        empty = {"delta": {}} if chat else {"text": ""}
        values = readout.delta(choice, final=True)
        out.append(
            {
                "index": choice if index is None else index,
                **empty,
                "logprobs": None,
                "finish_reason": None,
                "readout": values,
            }
        )
    return out
