"""Residual-stream capture in the engine equals HF transformers' hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_LAYERS

from steering.capture import CaptureFailed, Capturer
from steering.engine.frontend import SteeringValidationError

# One prompt longer than max_num_batched_tokens (64): its rows arrive over three steps.
PROMPTS = [
    [5, 17, 250, 33, 91, 12, 400, 8],
    [7, 7, 300],
    [int(x) for x in np.random.default_rng(0).integers(10, 480, 150)],
    [42],
]
LAYERS = [3, 0, 2]  # any order: results follow it


def _hf_states(engines, prompt: list[int]) -> np.ndarray:
    """[prompt_len, LAYERS, hidden]: the output of HF's decoder layer i (hidden_states[i + 1]
    except for the last layer, where HF's hidden_states holds the final-normed stream)."""
    model = engines.reference("llama").model
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].register_forward_hook(
            lambda mod, args, out, i=i: seen.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i in LAYERS
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([prompt]))
    finally:
        for h in hooks:
            h.remove()
    return np.stack([seen[i][0].float().numpy() for i in LAYERS], axis=1)


@pytest.mark.parametrize("positions", ["last", "mean", "all"])
def test_capture_equals_hf_hidden_states(capturer: Capturer, engines, positions):
    got = capturer.capture(PROMPTS, LAYERS, positions, batch_size=3)
    assert len(got) == len(PROMPTS)
    for prompt, g in zip(PROMPTS, got, strict=True):
        ref = _hf_states(engines, prompt)
        want = {"last": ref[-1], "mean": ref.mean(axis=0), "all": ref}[positions]
        assert g.shape == want.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)


def test_capture_counts_tokens_and_rejects_bad_arguments(capturer: Capturer):
    before = capturer.stats.prompt_tokens
    capturer.capture(PROMPTS[:2], [1])
    assert capturer.stats.prompt_tokens - before == len(PROMPTS[0]) + len(PROMPTS[1])
    with pytest.raises(ValueError, match="out of range"):
        capturer.capture(PROMPTS[:1], [NUM_LAYERS])
    with pytest.raises(ValueError, match="positions"):
        capturer.capture(PROMPTS[:1], [1], "first")


def test_engine_validates_capture_requests(capturer: Capturer, engines):
    from vllm import SamplingParams

    def ask(llm, raw):
        params = SamplingParams(max_tokens=1, extra_args={"steerserve_capture": raw})
        return llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)

    # A serving engine has no capture buffers: refused, naming the switch.
    with pytest.raises(SteeringValidationError, match="capture on"):
        ask(engines.get("llama"), {"key": "k", "layers": [1]})
    # A capture engine validates the request before it reaches the worker.
    with pytest.raises(SteeringValidationError, match=r"steerserve_capture.layers.*out of range"):
        ask(capturer.llm, {"key": "k", "layers": [9]})
    with pytest.raises(SteeringValidationError, match=r"steerserve_capture.positions"):
        ask(capturer.llm, {"key": "k", "layers": [1], "positions": "first"})
    # Unfetched results of a failed call do not leak into the next one.
    got = capturer.capture(PROMPTS[:1], [1])
    assert got[0].shape == (1, 128)


def test_capture_failure_names_the_prompt(capturer: Capturer, monkeypatch):
    # A result that never comes back (e.g. an engine restarted between generate and fetch).
    real = capturer.llm.collective_rpc
    monkeypatch.setattr(capturer.llm, "collective_rpc", lambda *a, **k: [{}])
    with pytest.raises(CaptureFailed, match="prompt 0: no capture came back"):
        capturer.capture(PROMPTS[:1], [1])
    monkeypatch.setattr(capturer.llm, "collective_rpc", real)


def test_compiled_capture_engine_captures_the_same(capturer: Capturer, compiled_capturer):
    # `steerserve vectors train` runs vLLM's default, the torch.compile'd forward.
    for positions in ("last", "all"):
        got = compiled_capturer.capture(PROMPTS, LAYERS, positions)
        want = capturer.capture(PROMPTS, LAYERS, positions)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
