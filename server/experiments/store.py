"""Durable records of experiments: definitions and their versions, assignments, feedback.

SQLAlchemy Core over SQLite (WAL, `synchronous=FULL`: a committed transaction survives a
crash of the process and of the machine) by default, or PostgreSQL given a
`postgresql+psycopg://` URL so that several replicas share one store. The request path
never calls this module directly: `writer.BatchWriter` groups its writes into one
transaction per batch, and reads (reports, admin) run in a worker thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from .definition import ExperimentDef
from .report import ArmData


def _data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "steerserve"


# Absolute, so that a server and `steerserve experiments report` started from different
# directories find the same records.
DEFAULT_DATABASE_URL = f"sqlite:///{_data_dir() / 'experiments.db'}"
Status = Literal["running", "paused", "stopped"]
STATUSES: tuple[Status, ...] = ("running", "paused", "stopped")

metadata = MetaData()

experiments = Table(
    "experiments",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, nullable=False),  # the current version
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

experiment_versions = Table(
    "experiment_versions",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("definition", JSON, nullable=False),
    Column("created_at", Float, nullable=False),
)

assignments = Table(
    "assignments",
    metadata,
    Column("response_id", String(255), primary_key=True),
    Column("experiment", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("arm", String(64), nullable=False),
    Column("unit", String(255)),  # None: assigned per request
    Column("model", String(255)),
    Column("created_at", Float, nullable=False),
    # The outcome, written when the request ends (None until then, or if it never does).
    Column("status", Integer),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("ttft", Float),
    Column("latency", Float),
    Index("ix_assignments_experiment", "experiment", "version", "arm"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("response_id", String(255), primary_key=True),
    Column("metric", String(64), primary_key=True),
    Column("value", Float, nullable=False),
    Column("is_bool", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
)


class StoreError(ValueError):
    """A request the store refuses (unknown experiment, stopped, ...); `status` is HTTP's."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExperimentRecord:
    name: str
    version: int
    status: Status
    definition: ExperimentDef
    created_at: float
    updated_at: float

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "definition": self.definition.frozen(),
        }


# What the writer thread hands to `write_batch`, in arrival order.
@dataclass(frozen=True)
class Assignment:
    response_id: str
    experiment: str
    version: int
    arm: str
    unit: str | None
    model: str | None
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Outcome:
    response_id: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None
    latency: float | None


@dataclass(frozen=True)
class Feedback:
    response_id: str
    metric: str
    value: float
    is_bool: bool


@dataclass(frozen=True)
class FeedbackResult:
    """`recorded` (also for an identical repeat), `conflict` (another value is stored),
    `unknown_id`, or `bad_metric` (not declared, or of the other kind)."""

    outcome: Literal["recorded", "conflict", "unknown_id", "bad_metric"]
    experiment: str | None = None
    version: int | None = None
    arm: str | None = None
    stored: float | bool | None = None
    message: str = ""


Write = Assignment | Outcome | Feedback


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged commit survives a power cut
    cur.execute("PRAGMA busy_timeout=30000")  # other replicas' writers
    cur.close()


def open_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class ExperimentStore:
    def __init__(self, url: str = DEFAULT_DATABASE_URL):
        self.url = url
        self.engine = open_engine(url)
        metadata.create_all(self.engine)
        self._insert = (
            postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        )
        self._definitions: dict[tuple[str, int], ExperimentDef] = {}  # versions never change

    def close(self) -> None:
        self.engine.dispose()

    # -- definitions -------------------------------------------------------------------

    def put(
        self, defn: ExperimentDef, *, create_only: bool = False
    ) -> tuple[ExperimentRecord, bool]:
        """Store a definition: a new experiment, a new version if it changed, else nothing.

        Returns the record and whether anything was written. A new version (re)starts the
        experiment; an unchanged one keeps its status, so a restart with the same file does
        not resume what an admin paused or stopped.
        """
        for _ in range(3):  # another replica may write the same row at the same moment
            try:
                return self._put(defn, create_only)
            except IntegrityError:
                continue
        raise StoreError(409, f"experiment {defn.name!r} is being changed concurrently")

    def _put(self, defn: ExperimentDef, create_only: bool) -> tuple[ExperimentRecord, bool]:
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(select(experiments).where(experiments.c.name == defn.name)).first()
            if row is not None:
                if create_only:
                    raise StoreError(409, f"experiment {defn.name!r} exists (PUT changes it)")
                current = self._definition(conn, defn.name, row.version)
                if current.frozen() == defn.frozen():
                    return self._record(row, current), False
                version = row.version + 1
                conn.execute(
                    update(experiments)
                    .where(experiments.c.name == defn.name)
                    .values(version=version, status="running", updated_at=now)
                )
            else:
                version = 1
                conn.execute(
                    experiments.insert().values(
                        name=defn.name,
                        version=1,
                        status="running",
                        created_at=now,
                        updated_at=now,
                    )
                )
            conn.execute(
                experiment_versions.insert().values(
                    name=defn.name, version=version, definition=defn.frozen(), created_at=now
                )
            )
            row = conn.execute(select(experiments).where(experiments.c.name == defn.name)).one()
        return self._record(row, defn), True

    def set_status(self, name: str, status: Status) -> ExperimentRecord:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(experiments).where(experiments.c.name == name).with_for_update()
            ).first()
            if row is None:
                raise StoreError(404, f"unknown experiment {name!r}")
            if row.status == "stopped" and status != "stopped":
                raise StoreError(
                    409,
                    f"experiment {name!r} is stopped; PUT a changed definition to start "
                    "a new version",
                )
            conn.execute(
                update(experiments)
                .where(experiments.c.name == name)
                .values(status=status, updated_at=time.time())
            )
            row = conn.execute(select(experiments).where(experiments.c.name == name)).one()
            return self._record(row, self._definition(conn, name, row.version))

    def get(self, name: str) -> ExperimentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(experiments).where(experiments.c.name == name)).first()
            return (
                None
                if row is None
                else self._record(row, self._definition(conn, name, row.version))
            )

    def all(self) -> list[ExperimentRecord]:
        """Every experiment, oldest first (the order traffic enrolment tries them in)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(experiments).order_by(experiments.c.created_at, experiments.c.name)
            ).all()
            return [self._record(r, self._definition(conn, r.name, r.version)) for r in rows]

    def versions(self, name: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(experiment_versions)
                .where(experiment_versions.c.name == name)
                .order_by(experiment_versions.c.version)
            ).all()
        return [
            {"version": r.version, "created_at": r.created_at, "definition": r.definition}
            for r in rows
        ]

    def revision(self) -> tuple[Any, ...]:
        """Changes whenever any experiment does: replicas poll it to reload."""
        with self.engine.connect() as conn:
            return tuple(
                conn.execute(
                    select(func.count(), func.max(experiments.c.updated_at)).select_from(
                        experiments
                    )
                ).one()
            )

    def definition(self, name: str, version: int) -> ExperimentDef:
        with self.engine.connect() as conn:
            return self._definition(conn, name, version)

    def _definition(self, conn: Any, name: str, version: int) -> ExperimentDef:
        key = (name, version)
        if key not in self._definitions:
            row = conn.execute(
                select(experiment_versions.c.definition).where(
                    experiment_versions.c.name == name, experiment_versions.c.version == version
                )
            ).first()
            if row is None:
                raise StoreError(404, f"experiment {name!r} has no version {version}")
            self._definitions[key] = ExperimentDef.model_validate(row.definition)
        return self._definitions[key]

    @staticmethod
    def _record(row: Any, defn: ExperimentDef) -> ExperimentRecord:
        return ExperimentRecord(
            row.name, row.version, row.status, defn, row.created_at, row.updated_at
        )

    # -- writes, one transaction per batch (called by the writer thread) --------------

    def write_batch(self, items: Sequence[Write]) -> list[Any]:
        """Apply the batch in one transaction; one result per item (None but for feedback).

        Assignments go first, then outcomes, then feedback, so that feedback arriving in
        the same batch as its assignment finds it.
        """
        results: list[Any] = [None] * len(items)
        with self.engine.begin() as conn:
            rows = [vars(i) for i in items if isinstance(i, Assignment)]
            if rows:
                conn.execute(self._insert(assignments).on_conflict_do_nothing(), rows)
            for item in items:
                if isinstance(item, Outcome):
                    conn.execute(
                        update(assignments)
                        .where(assignments.c.response_id == item.response_id)
                        .values(
                            status=item.status,
                            prompt_tokens=item.prompt_tokens,
                            completion_tokens=item.completion_tokens,
                            ttft=item.ttft,
                            latency=item.latency,
                        )
                    )
            fb = [(i, item) for i, item in enumerate(items) if isinstance(item, Feedback)]
            if fb:
                for i, result in zip(
                    (i for i, _ in fb), self._feedback(conn, [f for _, f in fb]), strict=True
                ):
                    results[i] = result
        return results

    def _feedback(self, conn: Any, items: list[Feedback]) -> list[FeedbackResult]:
        ids = sorted({f.response_id for f in items})
        owners = {
            r.response_id: r
            for r in conn.execute(
                select(
                    assignments.c.response_id,
                    assignments.c.experiment,
                    assignments.c.version,
                    assignments.c.arm,
                ).where(assignments.c.response_id.in_(ids))
            )
        }
        results: list[FeedbackResult | None] = [None] * len(items)
        new: list[dict[str, Any]] = []
        stored: dict[tuple[str, str], Any] = {}
        now = time.time()
        for k, f in enumerate(items):
            owner = owners.get(f.response_id)
            if owner is None:
                results[k] = FeedbackResult(
                    "unknown_id", message=(f"no experiment response has id {f.response_id!r}")
                )
                continue
            declared = self._definition(conn, owner.experiment, owner.version).metrics
            kind = declared.get(f.metric)
            problem = None
            if declared and kind is None:
                problem = (
                    f"experiment {owner.experiment!r} declares metrics "
                    f"{sorted(declared)}, not {f.metric!r}"
                )
            elif kind == "boolean" and not (f.is_bool or f.value in (0.0, 1.0)):
                problem = f"metric {f.metric!r} is boolean: send true/false (or 0/1)"
            elif kind == "numeric" and f.is_bool:
                problem = f"metric {f.metric!r} is numeric: send a number"
            if problem:
                results[k] = FeedbackResult(
                    "bad_metric", owner.experiment, owner.version, owner.arm, message=problem
                )
                continue
            is_bool = f.is_bool or kind == "boolean"
            new.append(
                {
                    "response_id": f.response_id,
                    "metric": f.metric,
                    "value": f.value,
                    "is_bool": is_bool,
                    "created_at": now,
                }
            )
        if new:
            conn.execute(self._insert(feedback).on_conflict_do_nothing(), new)
            keys = sorted({(r["response_id"], r["metric"]) for r in new})
            stored = {
                (r.response_id, r.metric): r
                for r in conn.execute(
                    select(feedback).where(
                        tuple_(feedback.c.response_id, feedback.c.metric).in_(keys)
                    )
                )
            }
        for k, f in enumerate(items):
            if results[k] is not None:
                continue
            owner = owners[f.response_id]
            row = stored[(f.response_id, f.metric)]
            value: float | bool = bool(row.value) if row.is_bool else row.value
            same = row.value == f.value
            results[k] = FeedbackResult(
                "recorded" if same else "conflict",
                owner.experiment,
                owner.version,
                owner.arm,
                value,
                ""
                if same
                else f"metric {f.metric!r} of {f.response_id!r} is already recorded as {value!r}",
            )
        return results  # type: ignore[return-value]

    # -- reads for reports -------------------------------------------------------------

    def assignment(self, response_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(assignments).where(assignments.c.response_id == response_id)
            ).first()
        return None if row is None else dict(row._mapping)

    def report_data(
        self, name: str, version: int | None = None
    ) -> tuple[ExperimentRecord, int, list[ArmData], dict[str, str]]:
        """The rows a report is computed from, per arm in the definition's order."""
        record = self.get(name)
        if record is None:
            raise StoreError(404, f"unknown experiment {name!r}")
        version = record.version if version is None else version
        with self.engine.connect() as conn:
            defn = self._definition(conn, name, version)
            where = (assignments.c.experiment == name, assignments.c.version == version)
            rows = conn.execute(
                select(
                    assignments.c.arm,
                    assignments.c.unit,
                    assignments.c.status,
                    assignments.c.completion_tokens,
                    assignments.c.latency,
                    assignments.c.ttft,
                ).where(*where)
            ).all()
            fb_rows = conn.execute(
                select(assignments.c.arm, feedback.c.metric, feedback.c.value, feedback.c.is_bool)
                .join(feedback, feedback.c.response_id == assignments.c.response_id)
                .where(*where)
                .order_by(feedback.c.created_at, feedback.c.response_id)
            ).all()
        kinds = dict(defn.metrics)
        seen_numeric = {r.metric for r in fb_rows if not r.is_bool}
        for r in fb_rows:  # undeclared metrics: boolean only if every value was
            kinds.setdefault(r.metric, "numeric" if r.metric in seen_numeric else "boolean")
        arms = [_arm_data(a.name, rows, fb_rows) for a in defn.arms]
        return record, version, arms, kinds


def _floats(values: Iterable[Any]) -> np.ndarray:
    return np.array([v for v in values if v is not None], dtype=np.float64)


def _arm_data(arm: str, rows: Sequence[Any], fb_rows: Sequence[Any]) -> ArmData:
    mine = [r for r in rows if r.arm == arm]
    ok = [r for r in mine if r.status == 200]
    units = {r.unit for r in mine if r.unit is not None}
    metrics: dict[str, list[float]] = {}
    for r in fb_rows:
        if r.arm == arm:
            metrics.setdefault(r.metric, []).append(r.value)
    return ArmData(
        name=arm,
        requests=len(mine),
        units=len(units) + sum(r.unit is None for r in mine),
        errors=sum(r.status is not None and r.status != 200 for r in mine),
        completion_tokens=_floats(r.completion_tokens for r in ok),
        latency=_floats(r.latency for r in ok),
        ttft=_floats(r.ttft for r in ok),
        feedback={m: np.array(v, dtype=np.float64) for m, v in metrics.items()},
    )
