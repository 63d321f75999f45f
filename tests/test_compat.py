"""The vLLM internals the extension relies on are where it expects them."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from steering.engine import compat


def test_pinned_internals_present():
    compat.check_static()
    compat.check_openai_server()


def test_choice_index_follows_vllm_request_ids():
    from steering.engine.request_ids import api_request_key, choice_index

    assert choice_index("cmpl-ab_1-1a2b3c4d", "cmpl-ab_1") == 0
    assert choice_index("3_cmpl-ab_1-1a2b3c4d", "cmpl-ab_1") == 3
    assert choice_index("cmpl-ab_10-1a2b3c4d", "cmpl-ab_1") is None
    assert choice_index("cmpl-ab_1", "cmpl-ab_1") is None
    assert api_request_key("cmpl-ab_1-1a2b3c4d") == "cmpl-ab_1"
    assert api_request_key("3_cmpl-ab_1-1a2b3c4d") == "3_cmpl-ab_1"


def test_plugin_entry_point_registered():
    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "steering.engine.plugin:register" in names


def test_moved_internal_fails_loudly(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def _prepare_inputs(self, batch):  # a signature vLLM might move to
        raise AssertionError

    monkeypatch.setattr(GPUModelRunner, "_prepare_inputs", _prepare_inputs)
    with pytest.raises(compat.IncompatibleVLLM, match="_prepare_inputs"):
        compat.check_static()


def test_hooks_installed_on_runner_classes(engines):
    engines.get("llama")  # starting an engine loads the plugin
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for fn in (
        GPUModelRunner._prepare_inputs,
        GPUModelRunner._on_request_state_removed,
        CPUModelRunner.load_model,
        InputProcessor.process_inputs,
    ):
        assert getattr(fn, "_steerserve_original", None) is not None, fn


def test_env_switch_patches_nothing():
    """STEERSERVE_DISABLE=1: the plugin loads but the process stays plain vLLM."""
    import os
    import subprocess
    import sys

    code = (
        "from vllm.plugins import load_general_plugins; load_general_plugins();"
        "from vllm.v1.worker.gpu_model_runner import GPUModelRunner as R;"
        "from vllm.v1.engine.input_processor import InputProcessor as P;"
        "print(hasattr(R._prepare_inputs, '_steerserve_original'),"
        " hasattr(P.process_inputs, '_steerserve_original'))"
    )
    for env, want in (("1", "False False"), ("0", "True True")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=dict(os.environ, STEERSERVE_DISABLE=env),
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip().splitlines()[-1] == want, out.stderr[-2000:]


class OwnExtension:  # a user's worker extension that does not carry steerserve's calls
    def my_call(self) -> int:
        return 1


def test_worker_calls_are_an_extension_class(engines):
    from steering.engine import worker

    llm = engines.get("llama")
    parallel = llm.llm_engine.vllm_config.parallel_config
    assert parallel.worker_extension_cls == worker.EXTENSION
    [stats] = llm.collective_rpc("steerserve_stats")
    assert stats["slots"] == 16 and stats["live_slots"] >= 0
    assert worker.reports(llm, "no-such-request") == {}
    with pytest.raises(ValueError, match="without additional_config.steerserve.capture"):
        worker.captures(llm, ["k"])
    # Nothing is patched onto vLLM's WorkerBase any more.
    from vllm.v1.worker.worker_base import WorkerBase

    assert not any(name.startswith("steerserve") for name in vars(WorkerBase))


def test_foreign_worker_extension_is_refused_and_a_subclass_accepted():
    from steering.engine.worker import EXTENSION, SteeringWorkerExtension, check_extension

    assert check_extension("") == EXTENSION
    with pytest.raises(ValueError, match="inherit from steering.engine.worker"):
        check_extension("test_compat.OwnExtension")
    globals()["Both"] = type("Both", (OwnExtension, SteeringWorkerExtension), {})
    assert check_extension("test_compat.Both") == "test_compat.Both"
