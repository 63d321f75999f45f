"""Long chunked prompts and preempted, recomputed requests against the reference oracle.

Prompts of 129-200 tokens span three or four prefill steps (MAX_BATCHED_TOKENS = 64), so
every intervention kind meets position classes that change inside a chunk or at its edge
(a 129-token prompt's last row is a chunk of its own, a 192-token one's ends a full
chunk). On the `features-tight` engine (10 blocks of 32 tokens) long requests are
preempted and recomputed, prompt and generated rows alike; each must still equal the
reference: tokens, log-probs, readout values (one per generated token and prompt row,
each position once) and decoding reports (one layer per token). A capture engine with
the same tight cache checks capture requests preempted mid-prompt.

Preemption is proved from vLLM's own scheduler: `Preemptions` records each call of the
in-process engine core's `Scheduler._preempt_request` (the engines run in-process, see
conftest), with how far the request had got.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from conftest import (
    BLOCK_SIZE,
    ENGINE_KW,
    MAX_BATCHED_TOKENS,
    assert_close,
    assert_decoded_close,
    assert_matches_reference,
    generate_one,
    prompt_ids,
    random_vector,
    sampling,
)

from steering.engine.request_ids import api_request_key
from steering.engine.worker import readouts, reports

V1 = random_vector(41).tolist()
V2 = random_vector(42).tolist()
R1 = random_vector(43).tolist()
R2 = random_vector(44).tolist()


def head_vector(seed: int, width: int = 256, norm: float = 8.0) -> list[float]:
    """A direction on the Llama test model's o_proj input (4 heads x 64)."""
    v = np.random.default_rng(seed).standard_normal(width)
    return (v * (norm / np.linalg.norm(v))).tolist()


def _tokens_and_logprobs(out) -> tuple[list[int], list[float]]:
    o = out.outputs[0]
    lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs, strict=True)]
    return list(o.token_ids), lps


def _check_readout(ref, raw, prompt, tokens, got, what: str) -> None:
    """A request's readout values vs the reference: one finite value per generated token
    and entry and, for entries with `prompt`, one per prompt row (NaN marks a row no step
    read; a duplicate would make the list too long)."""
    entries = raw["readout"]
    spec = ref.spec(raw, max_readouts=4)
    rows = ref.readout(prompt + tokens[:-1], len(prompt), spec)
    p = len(prompt)
    generated = np.array(got["generated"], dtype=np.float64)
    assert generated.shape == (len(tokens), len(entries)), f"{what}: {generated.shape}"
    assert np.isfinite(generated).all(), f"{what}: a generated token was never read"
    assert np.abs(generated).max() > 0.1  # not a table of zeros
    assert_close(generated, rows[p - 1 : p - 1 + len(tokens)], f"{what} readout")
    wants_prompt = [bool(e.get("prompt")) for e in entries]
    if not any(wants_prompt):
        assert got["prompt"] is None
        return
    values = np.array(got["prompt"], dtype=np.float64)
    assert values.shape == (p, len(entries)), f"{what}: prompt values {values.shape}"
    for k in np.flatnonzero(wants_prompt):
        assert np.isfinite(values[:, k]).all(), f"{what}: a prompt row was never read"
        assert_close(values[:, k], rows[:p, k], f"{what} prompt readout {k}")


# --- 1. long chunked prompts, every intervention kind ------------------------------------

LONG_CASES = {
    # (a) output head masks, one switching on at the first generated row
    "output-head-mask": (
        150,
        {
            "heads": [
                {"layer": 1, "heads": [1], "scale": 0.0},
                {"layer": 2, "heads": [0, 3], "scale": 2.5, "positions": "generated"},
                {"layer": 3, "heads": [2], "scale": 0.0, "positions": "from_last_prompt"},
            ]
        },
    ),
    # (b) query masks: sharpened on the prompt, uniform from the last prompt row on
    "query-head-mask": (
        170,
        {
            "heads": [
                {
                    "layer": 0,
                    "heads": [0, 2],
                    "scale": 4.0,
                    "target": "query",
                    "positions": "prompt",
                },
                {"layer": 2, "heads": [1], "target": "query", "positions": "from_last_prompt"},
                {"layer": 3, "heads": [3], "scale": 0.5, "target": "query"},
            ]
        },
    ),
    # (c) head-site vectors: an add on two heads, a mix on the last prompt row
    "head-site-vectors": (
        129,
        {
            "vectors": [
                {
                    "site": "heads",
                    "data": {"1": head_vector(1), "2": head_vector(2)},
                    "heads": [1, 2],
                    "scale": 1.5,
                },
                {
                    "site": "heads",
                    "op": "mix",
                    "weight": 0.7,
                    "positions": "last_prompt",
                    "data": {"3": head_vector(3)},
                },
            ]
        },
    ),
}
# (f) residual ops on the last prompt row, from it on, and on generated rows; the last
# prompt row alone in the third chunk (129) and closing a full third chunk (192).
RESIDUAL = {
    "vectors": [
        {"data": {"1": V1}, "scale": 2.0, "positions": "last_prompt"},
        {"data": {"2": V2}, "scale": 0.8, "positions": "generated"},
        {"data": {"2": V1}, "op": "clamp", "value": 3.0, "positions": "from_last_prompt"},
    ]
}
LONG_CASES["residual-classes-129"] = (129, RESIDUAL)
LONG_CASES["residual-classes-192"] = (192, RESIDUAL)


@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_prompt_interventions_equal_the_reference(engines, case):
    llm, ref = engines.get("llama", "readout"), engines.reference("llama")
    length, raw = LONG_CASES[case]
    assert length > 2 * MAX_BATCHED_TOKENS  # three prefill chunks or more
    prompt = prompt_ids(seed=sum(map(ord, case)) % 997, length=length)
    spec = ref.spec(raw)
    run = generate_one(llm, prompt, sampling(raw, max_tokens=8, prompt_logprobs=True))
    plain = generate_one(llm, prompt, sampling(None, max_tokens=8))
    # Every prompt row's log-prob too: the rows on both sides of each chunk boundary.
    assert_matches_reference(run, ref, prompt, spec, case)
    changed = np.abs(np.array(run.logprobs) - np.array(plain.logprobs)).max()
    assert run.tokens != plain.tokens or changed > 1e-3, f"{case} had no effect"


DECODING = {
    "fuse-auto": {"mode": "fuse", "layer": "auto", "weight": 0.6},
    "contrast": {"mode": "contrast", "layers": [0, 2]},
}


@pytest.mark.parametrize("case", list(DECODING))
def test_long_prompt_decoding_equals_the_reference(engines, case):
    """(d) Fuse "auto" picks its layer at the last prompt row, in the fourth chunk of a
    200-token prompt; contrast scores every generated row. Steered too, so the rows the
    layers capture carry the steering."""
    llm, ref = engines.get("llama", "readout"), engines.reference("llama")
    raw = {
        "decoding": DECODING[case],
        "vectors": [{"data": {"1": V1}, "scale": 0.6, "positions": "generated"}],
    }
    prompt = prompt_ids(seed=70 + len(case), length=200)
    spec = ref.spec(raw)
    [out] = llm.generate([{"prompt_token_ids": prompt}], sampling(raw, 8), use_tqdm=False)
    tokens, lps = _tokens_and_logprobs(out)
    want_tokens, want_lps = ref.greedy(prompt, 8, spec)
    assert tokens == want_tokens
    assert_close(lps, want_lps, f"{case} log-probs")
    report = reports(llm, out.request_id)[0]
    if case == "fuse-auto":
        assert report["layer"] == ref.last_fuse_layer
    else:
        assert report["layers"] == ref.last_contrast_layers
        assert len(report["layers"]) == 8


READOUT = {
    "vectors": [{"data": {"1": V1}, "scale": 1.5}],
    "readout": [
        {"data": R1, "layer": 1, "prompt": True},
        {"data": R2, "layer": 3, "prompt": True},
        {"data": V1, "layer": 2},
    ],
}


def test_long_prompt_readout_equals_the_reference(engines):
    """(e) Readout at three layers (two with prompt values) of a steered 190-token
    prompt: every prompt row once over four chunks, and every generated token."""
    llm, ref = engines.get("llama", "readout"), engines.reference("llama")
    prompt = prompt_ids(seed=80, length=190)
    [out] = llm.generate([{"prompt_token_ids": prompt}], sampling(READOUT, 8), use_tqdm=False)
    tokens, lps = _tokens_and_logprobs(out)
    want_tokens, want_lps = ref.greedy(prompt, 8, ref.spec(READOUT, max_readouts=4))
    assert tokens == want_tokens
    assert_close(lps, want_lps, "readout log-probs")
    got = readouts(llm, out.request_id)[0]
    _check_readout(ref, READOUT, prompt, tokens, got, "long prompt")


# --- 2. preemption and recomputation -----------------------------------------------------


class Preemptions:
    """Every preemption vLLM's scheduler makes while in use, as (API request id, tokens
    computed, tokens generated by then): the in-process engine core's own
    `Scheduler._preempt_request`, wrapped."""

    def __init__(self, llm, monkeypatch):
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        original = scheduler._preempt_request
        self.seen: list[tuple[str, int, int]] = []

        def preempt(request, *args, **kwargs):
            self.seen.append(
                (
                    api_request_key(request.request_id),
                    request.num_computed_tokens,
                    request.num_output_tokens,
                )
            )
            return original(request, *args, **kwargs)

        monkeypatch.setattr(scheduler, "_preempt_request", preempt)


def _greedy_check(ref, prompt, tokens, lps, spec) -> None:
    """Teacher-forced on the engine's tokens in one forward (not 100 greedy ones): each
    token must be the reference's argmax given the tokens before it, so the reference's
    greedy continuation is the same, and carry its log-prob."""
    lp = ref.logprobs(prompt + tokens, len(prompt), spec)
    rows = lp[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    assert tokens == rows.argmax(dim=-1).tolist(), "greedy tokens differ from the reference"
    want = [float(rows[j, t]) for j, t in enumerate(tokens)]
    assert_decoded_close(lps, ref, len(prompt) - 1, tokens, want, "log-probs")


PREEMPTED = [
    {  # residual position classes, prompt and generated readout
        "vectors": [
            {"data": {"1": V1}, "scale": 2.0, "positions": "last_prompt"},
            {"data": {"2": V2}, "scale": 0.7, "positions": "generated"},
        ],
        "readout": [{"data": R1, "layer": 1, "prompt": True}, {"data": R2, "layer": 3}],
    },
    {  # head masks and a clamp from the last prompt row on, prompt and generated readout
        "heads": [
            {"layer": 1, "heads": [0], "scale": 0.0},
            {"layer": 2, "heads": [1, 3], "scale": 2.0, "positions": "generated"},
        ],
        "vectors": [
            {"data": {"1": V2}, "op": "clamp", "value": 4.0, "positions": "from_last_prompt"}
        ],
        "readout": [{"data": R2, "layer": 2, "prompt": True}, {"data": R1, "layer": 0}],
    },
    {  # contrastive decoding, a query mask and a head-site add on generated rows
        "decoding": {"mode": "contrast", "layers": [0, 2]},
        "heads": [{"layer": 2, "heads": [2], "target": "query", "positions": "from_last_prompt"}],
        "vectors": [
            {
                "site": "heads",
                "data": {"1": head_vector(9)},
                "heads": [0, 1],
                "positions": "generated",
            }
        ],
        "readout": [{"data": V1, "layer": 3}],
    },
    {  # LFD on a steered request (its layer changes from token to token), prompt readout
        "decoding": {"mode": "lfd", "layers": [0, 1, 2]},
        "vectors": [{"data": {"2": V1}, "scale": 0.5, "positions": "from_last_prompt"}],
        "readout": [{"data": R1, "layer": 2, "prompt": True}],
    },
]


def test_preempted_requests_equal_the_reference(engines, monkeypatch):
    """Four 96-111-token requests generating 100 tokens each on a 320-token KV cache:
    vLLM preempts three of them after they have generated 18-31 tokens and recomputes
    their prompt and generated rows in chunks. Each request must equal the reference,
    its readout hold exactly one value per generated token and prompt row, and its
    decoding report one layer per generated token (the recomputation's unfinished
    chunks past the prompt sample nothing)."""
    import steering.engine.readout as readout_module

    llm, ref = engines.get("llama", "features-tight"), engines.reference("llama")
    preemptions = Preemptions(llm, monkeypatch)
    # Generated tokens whose readout row was read again: the request was recomputed
    # past its prompt (readout places them by index, so the same token is written over).
    reread = [0]
    put_token = readout_module.put_token

    def counting(tokens, g, *args):
        reread[0] += g < len(tokens)
        return put_token(tokens, g, *args)

    monkeypatch.setattr(readout_module, "put_token", counting)
    n = 100
    prompts = [prompt_ids(seed=110 + i, length=96 + 5 * i) for i in range(len(PREEMPTED))]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [sampling(raw, max_tokens=n) for raw in PREEMPTED],
        use_tqdm=False,
    )
    index = {o.request_id: i for i, o in enumerate(outs)}
    seen = [(index.get(r, r), c, k) for r, c, k in preemptions.seen]
    after_generating = {i for i, _, k in seen if k > 0}
    kinds = {
        "prompt readout": {i for i, raw in enumerate(PREEMPTED) if raw["readout"][0].get("prompt")},
        "head masks": {i for i, raw in enumerate(PREEMPTED) if raw.get("heads")},
        "decoding": {i for i, raw in enumerate(PREEMPTED) if raw.get("decoding")},
    }
    for kind, which in kinds.items():
        assert after_generating & which, f"no request with {kind} was preempted: {seen}"
    assert reread[0] > 0, "no generated row was recomputed"
    for i, (prompt, raw, out) in enumerate(zip(prompts, PREEMPTED, outs, strict=True)):
        tokens, lps = _tokens_and_logprobs(out)
        assert len(tokens) == n
        spec = ref.spec(raw, max_readouts=4)
        _greedy_check(ref, prompt, tokens, lps, spec)
        got = readouts(llm, out.request_id)[0]
        _check_readout(ref, raw, prompt, tokens, got, f"request {i}")
        if "decoding" in raw:
            # The reference's rows run one past the last token (the row after it).
            layers = reports(llm, out.request_id)[0]["layers"]
            assert layers == ref.last_contrast_layers[:n], f"request {i}: {len(layers)} layers"


@pytest.fixture(scope="session")
def tight_capturer(model_dirs):
    """A capture engine with the KV cache of `features-tight` (10 blocks of 32 tokens) and
    32-token steps, so a prompt's prefill lasts long enough for a growing request to
    preempt it. Session-scoped like every in-process engine (conftest.compiled_capturer)."""
    from steering.capture import Capturer

    kw = {k: v for k, v in ENGINE_KW.items() if k != "enable_prefix_caching"}
    kw.update(
        kv_cache_memory_bytes=10 * BLOCK_SIZE * 4096, max_model_len=256, max_num_batched_tokens=32
    )
    return Capturer(str(model_dirs["llama"]), enforce_eager=True, **kw)


CAPTURE_LAYERS = [3, 0, 2]


def _layer_outputs(ref, prompt: list[int]) -> np.ndarray:
    """[prompt_len, CAPTURE_LAYERS, hidden]: HF's decoder layer outputs (as test_capture)."""
    seen: dict[int, torch.Tensor] = {}
    layers = ref.model.model.layers

    def keep(i):
        return lambda mod, args, out: seen.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    hooks = [layers[i].register_forward_hook(keep(i)) for i in CAPTURE_LAYERS]
    try:
        with torch.no_grad():
            ref.model(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    return np.stack([seen[i][0].float().numpy() for i in CAPTURE_LAYERS], axis=1)


def test_preempted_capture_equals_hf(tight_capturer, engines, monkeypatch):
    """Three 96-token capture requests behind two requests generating 100 tokens: a
    generator that needs a block preempts the first capture mid-prompt (no prefix cache:
    it is recomputed from position 0). Each prompt row must count once: "mean" (a sum,
    where a doubled row would show), "all" and "last" equal HF's hidden states."""
    from vllm import SamplingParams

    from steering.engine.capture import REQUEST_KEY, decode
    from steering.engine.worker import captures

    llm, ref = tight_capturer.llm, engines.reference("llama")
    preemptions = Preemptions(llm, monkeypatch)
    # Lengths chosen (by vLLM's scheduling, which depends on nothing else) so that the
    # first capture is running its prefill when generator 0 crosses into a new block.
    generating = [prompt_ids(seed=130 + i, length=n) for i, n in enumerate((93, 90))]
    captured = [prompt_ids(seed=140 + i, length=96) for i in range(3)]
    positions = ["mean", "all", "last"]
    keys = [f"preempted-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(captured))]
    params = [sampling(None, max_tokens=100)] * len(generating) + [
        SamplingParams(
            max_tokens=1,
            temperature=0.0,
            extra_args={REQUEST_KEY: {"key": k, "layers": CAPTURE_LAYERS, "positions": pos}},
        )
        for k, pos in zip(keys, positions, strict=True)
    ]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in generating + captured], params, use_tqdm=False
    )
    results = captures(llm, keys)
    index = {o.request_id: i for i, o in enumerate(outs)}
    seen = [(index.get(r, r), c, k) for r, c, k in preemptions.seen]
    assert any(i >= len(generating) and 0 < c < 96 for i, c, _ in seen), (
        f"no capture request was preempted mid-prompt: {seen}"
    )
    for prompt, key, pos in zip(captured, keys, positions, strict=True):
        assert isinstance(results.get(key), dict), results.get(key)
        states = _layer_outputs(ref, prompt)
        want = {"last": states[-1], "mean": states.mean(axis=0), "all": states}[pos]
        assert_close(decode(results[key]), want, f"capture {pos}")
