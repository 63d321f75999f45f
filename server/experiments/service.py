"""The experiments part of a running server: registry, store, writer and per-arm metrics,
behind the few calls the routes make."""

from __future__ import annotations

import asyncio
import atexit
import logging
from concurrent.futures import Future
from typing import Any

from ..metrics import ExperimentMetrics
from .definition import ExperimentDef
from .registry import ArmParser, Enrollment, ExperimentRegistry, check_definition
from .report import build_report
from .store import Assignment, ExperimentStore, Feedback, FeedbackResult, Outcome, Status
from .writer import BatchWriter

log = logging.getLogger(__name__)


class Experiments:
    def __init__(
        self,
        database_url: str,
        parse_arm: ArmParser,
        metrics: ExperimentMetrics,
        file_defs: list[ExperimentDef] | None = None,
    ):
        self.store = ExperimentStore(database_url)
        self.registry = ExperimentRegistry(self.store, parse_arm)
        self.registry.load_file(file_defs or [])
        self.writer = BatchWriter(self.store)
        self.metrics = metrics
        # Commit what is queued when the server exits normally (acknowledged writes are
        # committed already; this saves the outcomes still in flight).
        atexit.register(self.close)

    def start(self) -> None:
        self.registry.start()

    def close(self) -> None:
        self.writer.close()
        self.store.close()

    # -- request path -----------------------------------------------------------------

    def enroll(self, name: str | None, **kw: Any) -> Enrollment | None:
        return self.registry.enroll(name, **kw)

    def record(self, enrollment: Enrollment, response_id: str, model: str | None) -> Future:
        """Queue the assignment; the response must not complete before the future does."""
        assert enrollment.arm is not None
        return self.writer.submit(
            Assignment(
                response_id,
                enrollment.experiment,
                enrollment.version,
                enrollment.arm,
                enrollment.unit,
                model,
            )
        )

    def finish(
        self,
        enrollment: Enrollment,
        response_id: str,
        status: int,
        prompt_tokens: int,
        generation_tokens: int,
        ttft: float | None,
        latency: float,
    ) -> None:
        """The request's outcome: metrics now, the database row in the next batch."""
        assert enrollment.arm is not None
        self.metrics.observe(
            enrollment.experiment,
            enrollment.version,
            enrollment.arm,
            status,
            prompt_tokens,
            generation_tokens,
            ttft,
            latency,
        )
        try:
            self.writer.submit(
                Outcome(response_id, status, prompt_tokens, generation_tokens, ttft, latency)
            )
        except RuntimeError as e:  # shutting down
            log.warning("outcome of %s not recorded: %s", response_id, e)

    async def feedback(self, item: Feedback) -> FeedbackResult:
        return await self.writer.write(item)

    # -- admin and reports (database work off the event loop) -------------------------

    async def put(self, defn: ExperimentDef, *, create_only: bool) -> tuple[Any, bool]:
        check_definition(defn, self.registry.parse_arm)
        result = await asyncio.to_thread(self.store.put, defn, create_only=create_only)
        await asyncio.to_thread(self.registry.reload)
        return result

    async def set_status(self, name: str, status: Status) -> Any:
        record = await asyncio.to_thread(self.store.set_status, name, status)
        await asyncio.to_thread(self.registry.reload)
        return record

    async def report(self, name: str, version: int | None) -> dict[str, Any]:
        return await asyncio.to_thread(report, self.store, name, version)


def report(store: ExperimentStore, name: str, version: int | None = None) -> dict[str, Any]:
    """The report of one version (default: the current one), from the stored rows."""
    record, version, arms, kinds = store.report_data(name, version)
    defn = store.definition(name, version)
    out = build_report(name, version, defn.control_arm, arms, kinds)
    out["status"] = record.status if version == record.version else "superseded"
    out["current_version"] = record.version
    return out
