"""Seeded sampling with chunked prefill on CPU: undo a discarded sample exactly.

When a request's prompt is split over several steps, vLLM samples a token for it at every
step and discards the samples of unfinished chunks; for a request with its own `seed` it
then rewinds that request's generator by its Philox offset
(`GPUModelRunner._bookkeeping_sync`: `gen.set_offset(gen.get_offset() - 4)`). A CPU
`torch.Generator` (Mersenne Twister) has no offset: the call raises "CPU Generator does
not use offset", the engine dies, and every request on the server with it. Any seeded
request with a prompt longer than the step's token budget, or arriving beside other
prefills, triggers it; `variants` always send a seed.

For the CPU generators of discarded rows this saves the full generator state before
sampling and restores it after, which undoes the discarded draw exactly, and keeps
vLLM's offset rewind away from them. GPU generators are left to vLLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def _discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    if not generators:
        return {}
    discard = runner.discard_request_mask.np[:num_reqs].nonzero()[0]
    return {
        int(i): generators[int(i)]
        for i in discard
        if int(i) in generators and generators[int(i)].device.type == "cpu"
    }


@contextlib.contextmanager
def restore_discarded(runner: Any) -> Iterator[None]:
    """Around sampling: the discarded rows' CPU generators end where they started."""
    saved = {i: g.get_state() for i, g in _discarded_cpu_generators(runner).items()}
    try:
        yield
    finally:
        for i, state in saved.items():
            runner.input_batch.generators[i].set_state(state)


@contextlib.contextmanager
def without_offset_rewind(runner: Any) -> Iterator[None]:
    """Around vLLM's bookkeeping: hide the generators already restored above."""
    hidden = _discarded_cpu_generators(runner)
    for i in hidden:
        del runner.input_batch.generators[i]
    try:
        yield
    finally:
        runner.input_batch.generators.update(hidden)
