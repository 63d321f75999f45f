"""steerserve's calls into vLLM workers: a worker extension class, one method per call.

vLLM mixes the class named by `--worker-extension-cls` (`ParallelConfig.worker_extension_cls`)
into its worker, and `collective_rpc(name, args)` then calls `name` on every worker. A
steered engine gets `SteeringWorkerExtension` set for it when its config is made
(`hooks._hook_create_engine_config`); a user who needs an extension class of their own
makes it inherit from this one. Each method reads the worker's steering runtime and
returns None when steering is off for the engine.

The functions below are the callers' side, for an offline `vllm.LLM` (`readouts`,
`reports`, `captures`) or an `AsyncLLM` (`stats_async`, ...), so that nobody spells a method name.
"""

from __future__ import annotations

from typing import Any

EXTENSION = "steering.engine.worker.SteeringWorkerExtension"


class SteeringWorkerExtension:
    """Methods vLLM's worker gains (`self` is the worker)."""

    def _steerserve_runtime(self):
        from steering.engine.hooks import runtime_of

        return runtime_of(self.model_runner)

    def steerserve_stats(self) -> dict[str, int] | None:
        """Slot gauges: live slots and slots in all."""
        runtime = self._steerserve_runtime()
        return None if runtime is None else runtime.stats()

    def steerserve_reports(self, request_id: str) -> dict[int, dict] | None:
        """What layer-reading decoding chose for each choice of an API request."""
        runtime = self._steerserve_runtime()
        return None if runtime is None else runtime.reports_for(request_id)

    def steerserve_conditions(self, request_id: str) -> dict[int, list[dict]] | None:
        """Each choice's conditions of an API request: value, fired, decided."""
        runtime = self._steerserve_runtime()
        return None if runtime is None else runtime.conditions_for(request_id)

    def steerserve_readouts(self, request_id: str) -> dict | None:
        """A finished request's readout values by choice, handed over once."""
        book = _book(self._steerserve_runtime(), "readouts", "readout")
        return None if book is None else book.fetch(request_id)

    def steerserve_readout_pull(self, wanted: Any) -> dict | None:
        """Readout values added since each caller's last pull (server/readouts.py)."""
        book = _book(self._steerserve_runtime(), "readouts", "readout")
        return None if book is None else book.pull(wanted)

    def steerserve_captures(self, keys: list[str]) -> dict | None:
        """Captured activations of `keys` (steering/capture.py), handed over once."""
        book = _book(self._steerserve_runtime(), "captures", "capture")
        return None if book is None else book.fetch(keys)


def _book(runtime: Any, attr: str, switch: str) -> Any:
    if runtime is None:
        return None
    book = getattr(runtime, attr)
    if book is None:
        raise ValueError(f"this engine was started without additional_config.steerserve.{switch}")
    return book


def check_extension(current: str) -> str:
    """The `worker_extension_cls` a steered engine runs with, given the user's choice."""
    if not current or current == EXTENSION:
        return EXTENSION
    from vllm.utils.import_utils import resolve_obj_by_qualname

    if not issubclass(resolve_obj_by_qualname(current), SteeringWorkerExtension):
        raise ValueError(
            f"--worker-extension-cls {current}: a steered engine's workers need steerserve's "
            f"calls; make that class inherit from {EXTENSION}, or start the engine with "
            'steering off (additional_config={"steerserve": {"enabled": false}})'
        )
    return current


def _first(results: list[Any]) -> Any:
    return results[0] if results else None


def readouts(llm: Any, request_id: str) -> dict | None:
    """An offline `LLM`'s readout values of a finished request: `{choice: {"generated":
    [[...] per entry], "prompt": [[...]] | None}}`, handed over once."""
    return _first(llm.collective_rpc("steerserve_readouts", args=(request_id,)))


def reports(llm: Any, request_id: str) -> dict[int, dict]:
    """An offline `LLM`'s decoding reports of a request, by choice (see decoding.py)."""
    return _first(llm.collective_rpc("steerserve_reports", args=(request_id,))) or {}


def captures(llm: Any, keys: list[str]) -> dict:
    return _first(llm.collective_rpc("steerserve_captures", args=(keys,))) or {}


async def stats_async(engine: Any) -> dict[str, int] | None:
    return _first(await engine.collective_rpc("steerserve_stats"))


async def reports_async(engine: Any, request_id: str) -> dict[int, dict] | None:
    return _first(await engine.collective_rpc("steerserve_reports", args=(request_id,)))


async def conditions_async(engine: Any, request_id: str) -> dict[int, list[dict]] | None:
    return _first(await engine.collective_rpc("steerserve_conditions", args=(request_id,)))


def conditions(llm: Any, request_id: str) -> dict[int, list[dict]] | None:
    """An offline `LLM`'s condition reports of a request, by choice index."""
    return _first(llm.collective_rpc("steerserve_conditions", args=(request_id,)))


async def readout_pull_async(engine: Any, wanted: Any) -> dict | None:
    return _first(await engine.collective_rpc("steerserve_readout_pull", args=(wanted,)))
