"""What an experiment is, as given in `--experiments FILE` or to the admin routes.

    name: tone
    salt: "2026-11"            # changes every unit's arm; default: the name
    control: plain             # default: the first arm
    arms:
      - {name: plain, weight: 1}                         # unsteered
      - {name: happy, weight: 1, steering: {vectors: [{name: happy, scale: 4}]}}
      - {name: calm, weight: 2, preset: calm}
    traffic: {share: 0.1, model: demo}   # optional: also enrol 10% of unnamed traffic
    metrics: {thumbs: boolean, rating: numeric}   # optional declaration

The definition (everything above) is what a version freezes: any change to it makes a new
version, so that results are never mixed across arm sets.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
MetricKind = Literal["boolean", "numeric"]
METRIC_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,63}$")


def _repeated(names: list[str]) -> str:
    return ", ".join(sorted({n for n in names if names.count(n) > 1}))


class Arm(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    steering: dict[str, Any] | None = None
    preset: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Arm:
        if self.steering is not None and self.preset is not None:
            raise ValueError("give steering or preset, not both")
        return self

    def raw_spec(self) -> dict[str, Any] | None:
        """The arm's steering as a request would send it (None: unsteered)."""
        if self.preset is not None:
            return {"preset": self.preset}
        return self.steering or None


class Traffic(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float = Field(gt=0, le=1, allow_inf_nan=False)
    model: str | None = None  # served model name; None: any


class ExperimentDef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    salt: str | None = Field(default=None, max_length=256)
    control: str | None = None
    arms: list[Arm] = Field(min_length=1, max_length=32)
    traffic: Traffic | None = None
    metrics: dict[str, MetricKind] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentDef:
        names = [a.name for a in self.arms]
        if dup := _repeated(names):
            # "<field>: ..." names the field for the API's error (errors.invalid).
            raise ValueError(f"arms: arm names must be unique (repeated: {dup})")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control: {self.control!r} is not an arm ({', '.join(names)})")
        bad = [m for m in self.metrics if not METRIC_PATTERN.match(m)]
        if bad:
            raise ValueError(f"metrics: metric names must match {METRIC_PATTERN.pattern}: {bad}")
        return self

    @property
    def effective_salt(self) -> str:
        return self.name if self.salt is None else self.salt

    @property
    def control_arm(self) -> str:
        return self.control or self.arms[0].name

    def frozen(self) -> dict[str, Any]:
        """The versioned content, normalised so equal definitions compare equal."""
        return self.model_dump(mode="json", exclude_none=False)


class ExperimentFile(BaseModel):
    """`--experiments FILE`: a list, or `{"experiments": [...]}`."""

    model_config = ConfigDict(extra="forbid")

    experiments: list[ExperimentDef]

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"experiments": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _unique(self) -> ExperimentFile:
        if dup := _repeated([e.name for e in self.experiments]):
            raise ValueError(f"experiment names must be unique (repeated: {dup})")
        return self
