"""Every engine steerserve starts on CPU gets a KV budget that fits beside other engines,
and a start that still fails says which flag sets it."""

from __future__ import annotations

import subprocess
import sys

from server.cli import engine_argv
from steering.engine import memory


def test_cpu_default_fills_only_an_unset_budget():
    assert memory.is_cpu()
    assert memory.with_cpu_kv_budget({"dtype": "float32"}, 5 << 20) == {
        "dtype": "float32",
        "kv_cache_memory_bytes": 5 << 20,
    }
    for chosen in ({"kv_cache_memory_bytes": 1 << 20}, {"gpu_memory_utilization": 0.1}):
        assert memory.with_cpu_kv_budget(chosen, 5 << 20) == chosen
    # None is how the vectors CLI passes a flag it was not given.
    unset = {"kv_cache_memory_bytes": None}
    assert memory.with_cpu_kv_budget(unset, 7)["kv_cache_memory_bytes"] == 7


def test_serve_argv_budget():
    argv, default = engine_argv(["--model", "/m"])
    assert argv[-2:] == ["--kv-cache-memory-bytes", str(memory.SERVE_KV_BYTES)]
    assert default == memory.SERVE_KV_BYTES
    argv, default = engine_argv([])  # the demo model
    assert argv[-2:] == ["--kv-cache-memory-bytes", str(memory.SMALL_KV_BYTES)]
    for flag in (["--gpu-memory-utilization", "0.3"], ["--kv-cache-memory-bytes=123"]):
        argv, default = engine_argv(["--model", "/m", *flag])
        assert default is None and "--kv-cache-memory-bytes" not in argv[-2:-1]
        assert argv[-len(flag) :] == flag


def _train(model_dir, tmp_path, *flags: str) -> subprocess.CompletedProcess:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"positive": "good day", "negative": "bad day"}\n'
        '{"positive": "a kind cat", "negative": "a cruel cat"}\n'
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "vectors",
            "train",
            "--model",
            str(model_dir),
            "--pairs",
            str(pairs),
            "-o",
            str(tmp_path / "v.safetensors"),
            "--enforce-eager",
            "--max-model-len",
            "256",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_vectors_train_without_budget_flags_starts_with_the_small_default(model_dirs, tmp_path):
    """What failed in CI: `vectors train` with vLLM's default share of RAM beside other
    engines. Now it reserves 256 MiB, whatever this session's engines hold."""
    r = _train(model_dirs["llama"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Explicitly set (0.25/" in r.stderr + r.stdout


def test_vectors_train_that_does_not_fit_names_the_flag(model_dirs, tmp_path):
    """vLLM's own default on CPU (0.92 of the node's RAM) cannot start beside this test
    session's engines; asking for it explicitly shows the message users get."""
    r = _train(model_dirs["llama"], tmp_path, "--gpu-memory-utilization", "0.999")
    assert r.returncode != 0
    assert "steerserve vectors: the engine did not start" in r.stderr, r.stderr[-3000:]
    assert "--kv-cache-memory-bytes" in r.stderr
