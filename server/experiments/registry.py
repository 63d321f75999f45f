"""The experiments a server enrols requests into, held in memory for the request path.

Definitions live in the store; this is a read-through copy, reloaded after every change
made here and, for changes made by another replica on a shared database, whenever the
store's revision moves (polled every `REFRESH_SECONDS`). Enrolment itself is a hash
(`assignment.py`): no database read on the request path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from steering.spec import SteeringSpec

from .assignment import arm_index, enrolled
from .definition import ExperimentDef
from .store import ExperimentRecord, ExperimentStore

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0

# Checks an arm's raw spec against the served model; returns it parsed (None: unsteered).
ArmParser = Callable[[Mapping | None, str], SteeringSpec | None]


@dataclass(frozen=True)
class LiveExperiment:
    record: ExperimentRecord
    specs: tuple[SteeringSpec | None, ...]  # per arm, in the definition's order

    @property
    def defn(self) -> ExperimentDef:
        return self.record.definition


@dataclass(frozen=True)
class Enrollment:
    """What a request got from an experiment. `arm` is None when it is not running."""

    experiment: str
    version: int
    status: str
    arm: str | None = None
    spec: SteeringSpec | None = None
    unit: str | None = None

    def echo(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "experiment": self.experiment,
            "arm": self.arm,
            "version": self.version,
        }
        if self.status != "running":
            out["experiment_status"] = self.status
        return out

    def headers(self) -> dict[str, str]:
        out = {"x-experiment": self.experiment, "x-experiment-version": str(self.version)}
        if self.arm is not None:
            out["x-experiment-arm"] = self.arm
        if self.status != "running":
            out["x-experiment-status"] = self.status
        return out


class UnknownExperiment(LookupError):
    pass


class UnavailableExperiment(RuntimeError):
    """Stored, but its arms do not fit this server now (e.g. a vector was removed)."""


def check_definition(defn: ExperimentDef, parse_arm: ArmParser) -> tuple[SteeringSpec | None, ...]:
    """Each arm's spec, validated against the served model (raises naming the arm)."""
    return tuple(
        parse_arm(arm.raw_spec(), f"arms[{i}].{'preset' if arm.preset else 'steering'}")
        for i, arm in enumerate(defn.arms)
    )


class ExperimentRegistry:
    def __init__(self, store: ExperimentStore, parse_arm: ArmParser):
        self.store = store
        self.parse_arm = parse_arm
        self._live: dict[str, LiveExperiment] = {}
        self._unavailable: dict[str, str] = {}  # name -> why its arms cannot run here
        self._revision: tuple[Any, ...] | None = None
        self._task: asyncio.Task | None = None

    # -- request path -----------------------------------------------------------------

    def enroll(
        self,
        name: str | None,
        *,
        model: str | None,
        unit: str | None,
        request_key: str,
        steered: bool,
    ) -> Enrollment | None:
        """The arm for this request: of the experiment it names, or of the first running
        experiment whose traffic share takes it (only requests with no steering of their
        own and no experiment named; oldest experiment first)."""
        key = unit if unit is not None else f"request:{request_key}"
        if name is not None:
            live = self._live.get(name)
            if live is None:
                if name in self._unavailable:
                    raise UnavailableExperiment(self._unavailable[name])
                raise UnknownExperiment(name)
            return self._assign(live, key, unit)
        if steered:
            return None
        for live in self._live.values():
            traffic = live.defn.traffic
            if (
                traffic is not None
                and live.record.status == "running"
                and (traffic.model is None or traffic.model == model)
                and enrolled(live.defn.name, live.defn.effective_salt, key, traffic.share)
            ):
                return self._assign(live, key, unit)
        return None

    @staticmethod
    def _assign(live: LiveExperiment, key: str, unit: str | None) -> Enrollment:
        rec, defn = live.record, live.defn
        if rec.status != "running":
            return Enrollment(rec.name, rec.version, rec.status, unit=unit)
        i = arm_index(defn.name, defn.effective_salt, key, [a.weight for a in defn.arms])
        return Enrollment(rec.name, rec.version, rec.status, defn.arms[i].name, live.specs[i], unit)

    def get(self, name: str) -> LiveExperiment | None:
        return self._live.get(name)

    def unavailable(self, name: str) -> str | None:
        return self._unavailable.get(name)

    # -- changes (run in a worker thread: they touch the database) --------------------

    def load_file(self, defs: list[ExperimentDef]) -> None:
        """Start-up: store the file's definitions (new versions where they changed)."""
        for defn in defs:
            try:
                check_definition(defn, self.parse_arm)
            except Exception as e:
                raise ValueError(f"experiment {defn.name!r}: {getattr(e, 'message', e)}") from None
            record, changed = self.store.put(defn)
            if changed:
                log.info(
                    "experiment %s: version %d from the experiments file",
                    record.name,
                    record.version,
                )
        self.reload()

    def reload(self) -> None:
        revision = self.store.revision()
        live: dict[str, LiveExperiment] = {}
        unavailable: dict[str, str] = {}
        for record in self.store.all():
            try:
                specs = check_definition(record.definition, self.parse_arm)
            except Exception as e:  # e.g. a vector deleted since: keep serving the others
                why = (
                    f"experiment {record.name!r} v{record.version} cannot run on this "
                    f"server: {getattr(e, 'message', e)}"
                )
                if self._unavailable.get(record.name) != why:
                    log.error("%s", why)
                unavailable[record.name] = why
                continue
            live[record.name] = LiveExperiment(record, specs)
        self._live = live
        self._unavailable = unavailable
        self._revision = revision

    def refresh_if_changed(self) -> None:
        if self.store.revision() != self._revision:
            self.reload()

    # -- background refresh -----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await asyncio.to_thread(self.refresh_if_changed)
            except Exception as e:  # a database hiccup must not end the polling
                log.warning("experiment registry refresh failed: %s", e)
