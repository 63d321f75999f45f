"""The slot bank at its limit, and more distinct specs than vLLM runs at once (queueing at
max_num_seqs): every request still gets its own spec."""

from __future__ import annotations

import pytest
import torch
from conftest import ENGINE_KW, generate, prompt_ids, random_vector, sampling

from steering.compile import compile_spec
from steering.engine.hooks import runtime_of
from steering.engine.tables import SlotBank, SteeringTables


def _compiled(ref, seed: int):
    spec = ref.spec({"vectors": [{"data": {"1": random_vector(seed).tolist()}}]})
    return compile_spec(spec, ref.shape)


def test_slot_bank_refuses_more_distinct_specs_than_rows_in_one_step(engines):
    ref = engines.reference("llama")
    tables = SteeringTables(
        num_layers=ref.shape.num_layers,
        hidden_size=ref.shape.hidden_size,
        num_slots=3,  # the identity and two rows
        max_proj=2,
        max_tokens=16,
        dtype=torch.float32,
        device=torch.device("cpu"),
    )
    bank = SlotBank(tables)
    a, b, c = (_compiled(ref, 70 + i) for i in range(3))
    slots = {bank.acquire(a, step=1), bank.acquire(b, step=1)}
    assert slots == {1, 2}
    with pytest.raises(RuntimeError, match="slot bank exhausted"):
        bank.acquire(c, step=1)
    assert bank.acquire(a, step=1) in slots  # still resident: no reload
    assert bank.loads == 2
    # Next step: c takes the least recently used slot; b, used at step 2 too, keeps its own.
    b_slot = bank.acquire(b, step=2)
    c_slot = bank.acquire(c, step=2)
    assert c_slot != b_slot and bank.slot_of.get(a.key) is None and bank.loads == 3
    bank.release(c.key)  # warm: the first to be recycled
    assert bank.acquire(a, step=3) == c_slot


def test_more_distinct_specs_than_running_rows_queue_and_each_gets_its_own(engines):
    llm = engines.get("llama")
    n = 3 * ENGINE_KW["max_num_seqs"]
    prompts = [prompt_ids(400 + i, 6 + i % 9) for i in range(n)]
    specs = [
        {"vectors": [{"data": {str(i % 4): random_vector(500 + i).tolist()}, "scale": 0.7}]}
        for i in range(n)
    ]
    loads = llm.collective_rpc(_slot_loads)[0]
    together = generate(llm, prompts, [sampling(s, max_tokens=6) for s in specs])
    assert len(together) == n
    # 16 slots for 48 specs: each loaded once as its request was scheduled, none twice.
    assert llm.collective_rpc(_slot_loads)[0] - loads == n
    for i in range(0, n, 7):  # a sample of them, each against its own solo run
        alone = generate(llm, [prompts[i]], sampling(specs[i], max_tokens=6))[0]
        assert together[i].tokens == alone.tokens, i
        gaps = [abs(x - y) for x, y in zip(together[i].logprobs, alone.logprobs, strict=True)]
        assert max(gaps) < 1e-4, i
    # The last finished request is released with the next step (as vLLM tells workers).
    generate(llm, [prompts[0]], sampling(None, max_tokens=1))
    stats = llm.collective_rpc("steerserve_stats")[0]
    assert stats["slots"] == ENGINE_KW["max_num_seqs"] and stats["live_slots"] == 0


def _slot_loads(worker) -> int:
    return runtime_of(worker.model_runner).bank.loads
