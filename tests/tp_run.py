"""Run specs through a tensor_parallel_size=2 engine; write JSON (for test_tensor_parallel).

A separate process: TP workers are processes of their own, and vLLM's CPU backend needs its
OpenMP threads bound one core per rank (VLLM_CPU_OMP_THREADS_BIND, set by the caller).
"""

from __future__ import annotations

import json
import sys


def _local_heads(worker) -> list[int]:
    from steering.engine.hooks import runtime_of

    heads = runtime_of(worker.model_runner).tables.heads
    return [heads.start, heads.stop]


def main() -> None:
    from vllm import LLM, SamplingParams

    job = json.load(sys.stdin)
    llm = LLM(job["model"], tensor_parallel_size=2, **job["engine"])
    params = [
        SamplingParams(
            max_tokens=job["max_tokens"],
            temperature=0.0,
            ignore_eos=True,
            logprobs=1,
            extra_args={"steering": spec} if spec is not None else None,
        )
        for spec in job["specs"]
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params, use_tqdm=False)
    runs = []
    for out in outs:
        o = out.outputs[0]
        lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs, strict=True)]
        runs.append({"tokens": list(o.token_ids), "logprobs": lps})
    result = {"runs": runs, "local_heads": llm.collective_rpc(_local_heads)}
    with open(job["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
