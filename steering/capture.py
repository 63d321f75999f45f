"""Collect residual-stream activations with vLLM's own forward pass (offline).

`Capturer` starts a vLLM engine with the extension's capture buffers on (see
`steering/engine/capture.py`) and runs prompts through it as 1-token generations, batched
by vLLM's scheduler like any other traffic: the activations come from the same kernels
and weights that serve, with no second model load through HF transformers.

Layer i is the stream at the output of decoder layer i (HF `hidden_states[i + 1]`), the
convention of the spec and of every vector file.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steering.engine.capture import REQUEST_KEY as CAPTURE_KEY
from steering.engine.capture import decode, parse_request
from steering.engine.worker import captures
from steering.spec import ModelShape

Prompt = str | list[int]


class CaptureFailed(RuntimeError):
    pass


@dataclass
class CaptureStats:
    prompt_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds else 0.0


class Capturer:
    """A vLLM engine that returns activations; `capture` is the one call.

    Engine keyword arguments go to `vllm.LLM` (dtype, max_model_len, tensor_parallel_size,
    ...). Prefix caching is off: a cached prompt prefix would not be recomputed, so its
    activations would not exist.
    """

    def __init__(self, model: str, **engine_kw: Any):
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the hooks live in V1
        from vllm import LLM

        from steering.engine.memory import SMALL_KV_BYTES, start_failure_hint, with_cpu_kv_budget

        extra = dict(engine_kw.pop("additional_config", None) or {})
        extra["steerserve"] = {**extra.get("steerserve", {}), "capture": True}
        engine_kw.setdefault("max_num_batched_tokens", 2048)
        budgeted = with_cpu_kv_budget(engine_kw, SMALL_KV_BYTES)
        defaulted = budgeted != engine_kw
        try:
            self.llm = LLM(
                model=model, enable_prefix_caching=False, additional_config=extra, **budgeted
            )
        except (RuntimeError, ValueError) as e:
            hint = start_failure_hint(SMALL_KV_BYTES if defaulted else None)
            raise CaptureFailed(f"the engine did not start: {e}\n{hint}") from e
        self.shape = ModelShape.from_hf_config(self.llm.llm_engine.model_config.hf_config)
        self.tokenizer = self.llm.get_tokenizer()
        self.stats = CaptureStats()

    def capture(
        self,
        prompts: Sequence[Prompt],
        layers: Sequence[int],
        positions: str = "last",
        *,
        batch_size: int = 256,
        progress: Any = None,
    ) -> list[np.ndarray]:
        """Per prompt: [len(layers), hidden] ("last", "mean") or [prompt_len, len(layers),
        hidden] ("all"), float32, layers in the order given.

        `progress`: a tqdm-like object updated by the number of prompts done, or None.
        """
        layers = [int(i) for i in layers]
        # The engine's own check, before any prompt is sent (CaptureError is a ValueError).
        parse_request({"key": "-", "layers": layers, "positions": positions}, self.shape.num_layers)
        out: list[np.ndarray] = []
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            out.extend(self._batch(batch, layers, positions, start))
            if progress is not None:
                progress.update(len(batch))
        return out

    def _batch(
        self, prompts: list[Prompt], layers: list[int], positions: str, offset: int
    ) -> list[np.ndarray]:
        from vllm import SamplingParams

        run = uuid.uuid4().hex[:12]
        keys = [f"{run}-{offset + i}" for i in range(len(prompts))]
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=0.0,
                extra_args={CAPTURE_KEY: {"key": k, "layers": layers, "positions": positions}},
            )
            for k in keys
        ]
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": list(p)} for p in prompts]
        started = time.perf_counter()
        outputs = self.llm.generate(inputs, params, use_tqdm=False)
        results = captures(self.llm, keys)
        self.stats.seconds += time.perf_counter() - started
        self.stats.prompt_tokens += sum(len(o.prompt_token_ids or ()) for o in outputs)
        arrays = []
        for i, key in enumerate(keys):
            result = results.get(key)
            if not isinstance(result, dict):
                why = result or "no capture came back (was the engine restarted?)"
                raise CaptureFailed(f"prompt {offset + i}: {why}")
            arrays.append(decode(result))
        return arrays
