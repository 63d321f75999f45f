"""From a request's `steering` field to what the engine runs, and what the response echoes.

Order of composition, documented in docs/serving.md: the server's default spec (its preset
expanded first), then the request's preset, then the request's own entries; entries apply
in that order inside each layer, and the last `decoding` given wins. A request opts out of
the default with `"steering": {"default": false}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from steering.compile import CompiledSpec
from steering.engine.frontend import SPEC_KEY, SteeringFrontend, SteeringValidationError
from steering.spec import SpecError, SteeringSpec, compose

from .errors import APIError

KIND_NONE = "none"


@dataclass(frozen=True)
class Applied:
    """The steering of one request, after composition and compilation."""

    spec: SteeringSpec
    compiled: CompiledSpec | None
    preset: str | None
    default: bool  # whether the server's default spec took part

    @property
    def kind(self) -> str:
        """Metric label: which intervention families the request uses ("vectors+heads")."""
        parts = [
            name
            for name, used in (
                ("vectors", bool(self.spec.vectors)),
                ("heads", bool(self.spec.heads)),
                ("features", bool(self.spec.features)),
                ("decoding", self.spec.decoding is not None),
                ("readout", bool(self.spec.readout)),
            )
            if used
        ]
        return "+".join(parts) or KIND_NONE

    @property
    def reports_decoding(self) -> bool:
        """Whether the engine runs layer-reading decoding for it (and has reports)."""
        return self.compiled is not None and self.spec.decoding is not None

    @property
    def reports_conditions(self) -> bool:
        """Whether responses carry each condition's value and whether it fired."""
        return self.compiled is not None and bool(self.spec.conditions)

    @property
    def reports_at_end(self) -> bool:
        """Whether the engine has something to report once the request is done."""
        return self.reports_decoding or self.reports_conditions

    @property
    def reads(self) -> bool:
        """Whether responses carry readout values (spec `readout`)."""
        return self.compiled is not None and bool(self.spec.readout)

    @property
    def fingerprint(self) -> str | None:
        return self.compiled.fingerprint if self.compiled is not None else None

    def echo(self) -> dict[str, Any]:
        """The response's `steering` object."""
        out: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "preset": self.preset,
            "default": self.default,
            "kind": self.kind,
            "vectors": [shown_name(e) for e in self.spec.vectors],
            "heads": len(self.spec.heads),
        }
        if self.spec.decoding is not None:
            out["decoding"] = {"mode": self.spec.decoding.mode}
        if self.spec.features:
            out["features"] = [
                {"sae": f.sae, "feature": f.feature, "op": f.op, "layer": f.layer}
                | (
                    {"label": f.resolved_sae.label(f.feature)}
                    if f.resolved_sae.label(f.feature)
                    else {}
                )
                for f in self.spec.features
            ]
        if self.spec.readout:
            out["readout"] = [readout_item(e) for e in self.spec.readout]
        if self.spec.conditions:
            out["conditions"] = {"names": [c.name for c in self.spec.conditions]}
        return out


def readout_item(entry: Any) -> dict[str, Any]:
    """How responses name a readout entry: its vector and layer, or its SAE feature."""
    if entry.sae is None:
        return {"name": shown_name(entry), "layer": entry.layer}
    if entry.top_k is not None:
        return {"sae": entry.sae, "top_k": entry.top_k, "layer": entry.layer}
    item = {"sae": entry.sae, "feature": entry.feature, "layer": entry.layer}
    if entry.label is not None:
        item["label"] = entry.label
    return item


def shown_name(entry: Any) -> str:
    """A vector or readout entry as responses name it: its vector, or `<inline>` for data."""
    return entry.name if entry.name is not None else "<inline>"


UNSTEERED = Applied(SteeringSpec(), None, None, False)


class SteeringResolver:
    """Validates `steering` fields against the served model and the server's registries."""

    def __init__(self, frontend: SteeringFrontend | None, default_raw: Mapping | None):
        self.frontend = frontend
        self.default: SteeringSpec | None = None
        if default_raw is not None:
            if frontend is None:
                raise ValueError("--default-steering needs steering enabled in the engine")
            self.default = frontend.parse(dict(default_raw))
            frontend.compile(self.default)  # refuse at start what every request would fail

    def resolve(
        self, raw: Any, *, prompt_logprobs: bool = False, base: SteeringSpec | None = None
    ) -> Applied:
        """Compose default, then `base` (an experiment arm), then the request's `raw`."""
        use_default = True
        if isinstance(raw, Mapping) and "default" in raw:
            flag = raw["default"]
            if not isinstance(flag, bool):
                raise APIError(400, "must be true or false", f"{SPEC_KEY}.default")
            use_default = flag
            raw = {k: v for k, v in raw.items() if k != "default"}
        default = self.default if use_default else None
        if base is not None and not (
            base.vectors or base.heads or base.features or base.decoding or base.readout
        ):
            base = None
        if raw is None or (isinstance(raw, Mapping) and not raw):
            if default is None and base is None:
                return UNSTEERED
            raw = None
        if self.frontend is None:
            raise APIError(400, "steering is disabled on this server", SPEC_KEY)
        try:
            spec = self.frontend.parse(raw) if raw is not None else SteeringSpec()
            if base is not None:
                spec = compose(base, spec, self.frontend.context, what="arm plus request")
            if default is not None:
                spec = compose(default, spec, self.frontend.context, what="default plus request")
            compiled = self.frontend.compile(spec, prompt_logprobs=prompt_logprobs)
        except (SteeringValidationError, SpecError) as e:  # the latter from compose
            raise _as_api_error(e) from None
        return Applied(
            spec=spec,
            compiled=None if compiled.is_identity else compiled,
            preset=spec.preset,
            default=default is not None,
        )

    def parse_arm(self, raw: Mapping | None, root: str) -> SteeringSpec | None:
        """An experiment arm's spec, checked as a request would be (None: unsteered)."""
        if raw is None:
            return None
        if self.frontend is None:
            raise APIError(400, "steering is disabled on this server", root)
        try:
            spec = self.frontend.parse(dict(raw), root=root)
            spec_with_default = (
                compose(self.default, spec, self.frontend.context, root=root)
                if self.default is not None
                else spec
            )
            self.frontend.compile(spec_with_default)
        except (SteeringValidationError, SpecError) as e:
            raise _as_api_error(e) from None
        _refuse_readout(spec, root)
        return spec


def _message(errors: list[tuple[str, str]]) -> str:
    return "; ".join(f"{loc}: {msg}" for loc, msg in errors)


def _as_api_error(e: SteeringValidationError | SpecError) -> APIError:
    status = 400
    if "too_large" in e.kinds:
        status = 413
    elif "unknown_preset" in e.kinds:
        status = 404
    return APIError(status, _message(e.errors), e.errors[0][0])


def _refuse_readout(spec: SteeringSpec, root: str) -> None:
    # An arm changes what the model does for its users; values they did not ask for would
    # change the shape of their responses (a request can still ask for readout itself).
    if spec.readout:
        raise APIError(
            400,
            "an experiment arm cannot read out (ask for readout in the request)",
            f"{root}.readout",
        )
